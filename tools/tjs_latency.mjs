// Transformers.js in Node, timed call by call for tools/bench_latency.py.
//
// argv: <folder holding the export> <export folder name> <dtype: fp32|q8> <intra-op threads>
// Loads the export (Transformers.js layout: onnx/model.onnx, onnx/model_quantized.onnx) with
// AutoModelForSequenceClassification, remote models off, then serves a line protocol on stdin:
//   {"input_ids": [[...]], "attention_mask": [[...]], "token_type_ids": [[...]]}  -> "ok" (the inputs of later runs)
//   run                                                                          -> one forward; prints its ms
// Run from a folder whose node_modules holds @huggingface/transformers (bench_latency copies it there).
import { createInterface } from 'node:readline';
import { AutoModelForSequenceClassification, Tensor, env } from '@huggingface/transformers';

const [root, name, dtype, threads] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = root.endsWith('/') ? root : root + '/';
const model = await AutoModelForSequenceClassification.from_pretrained(name, {
  dtype,
  device: 'cpu',
  session_options: { intraOpNumThreads: Number(threads), interOpNumThreads: 1, graphOptimizationLevel: 'all' },
});

const tensor = (rows) => new Tensor('int64', BigInt64Array.from(rows.flat().map(BigInt)), [rows.length, rows[0].length]);
let feeds = null;
console.log('ready');
for await (const line of createInterface({ input: process.stdin })) {
  if (line === 'run') {
    const start = performance.now();
    await model(feeds);
    console.log((performance.now() - start).toFixed(4));
  } else {
    feeds = Object.fromEntries(Object.entries(JSON.parse(line)).map(([k, v]) => [k, tensor(v)]));
    console.log('ok');
  }
}
