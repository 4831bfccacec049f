// metatt.js: classify text with a metatt-deploy export from JavaScript (Node or a browser).
//
// Written into every export's web/ folder by metatt-deploy, next to metatt.json, which says what
// to load. The runtime libraries are passed in, so the same file runs everywhere without a bundler:
//
//   // Node (npm install onnxruntime-node @huggingface/transformers)
//   import * as ort from 'onnxruntime-node';
//   import { AutoTokenizer, env } from '@huggingface/transformers';
//   import { loadClassifier } from './exported/NAME/web/metatt.js';
//   const clf = await loadClassifier({ base: '/abs/path/exported/NAME/web', ort, AutoTokenizer, env });
//   await clf.classify([{ text: 'a gripping film', task: 'movie' },
//                       { text: 'A man sleeps.', text_pair: 'A man is awake.', task: 'snli' }]);
//
//   // Browser (index.html does this): ort = onnxruntime-web, base = the web/ folder's URL.
//
// classify() tokenizes each row with Transformers.js's tokenizer (the export's tokenizer.json),
// pads the rows into one batch and runs the graph ONCE: a factored bundle's model_tasks.onnx
// takes one task id per row, so rows of different tasks share the call. Per row it returns
// { task, label, label_id, score, scores: {label: probability}, logits } (logits cut to the
// task's labels; probabilities are the softmax of those logits).

const isUrl = (s) => /^[a-z][a-z0-9+.-]*:\/\//i.test(s);

function resolve(base, rel) {
  if (isUrl(base)) return new URL(rel, base.endsWith('/') ? base : base + '/').href.replace(/\/$/, '');
  const parts = [];
  for (const p of `${base}/${rel}`.split('/')) {
    if (p === '..') parts.pop();
    else if (p !== '.' && (p !== '' || parts.length === 0)) parts.push(p);
  }
  return parts.join('/') || '/';
}

async function readJson(location) {
  if (isUrl(location)) {
    const response = await fetch(location);
    if (!response.ok) throw new Error(`cannot fetch ${location}: HTTP ${response.status}`);
    return response.json();
  }
  const { readFile } = await import('node:fs/promises');
  return JSON.parse(await readFile(location, 'utf8'));
}

function softmax(logits) {
  const top = Math.max(...logits);
  const e = logits.map((x) => Math.exp(x - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / sum);
}

export async function loadClassifier({ base, ort, AutoTokenizer, env, sessionOptions = {} }) {
  const spec = await readJson(resolve(base, 'metatt.json'));
  if (spec.format_version !== 1) throw new Error(`metatt.json format ${spec.format_version} is not supported (this module reads 1)`);
  // web/tokenizer/ holds the export's tokenizer files: web/ is the "model path", so it works
  // wherever the bundle is served from (the root of a static server included)
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.useBrowserCache = false;
  env.localModelPath = resolve(base, '.') + '/';
  const tokenizer = await AutoTokenizer.from_pretrained(spec.tokenizer);
  const session = await ort.InferenceSession.create(resolve(base, spec.graph), { graphOptimizationLevel: 'all', ...sessionOptions });
  const tasks = new Map(spec.tasks.map((t, i) => [t.name, { ...t, id: i }]));
  const padId = BigInt(tokenizer.pad_token_id ?? 0);

  function taskOf(row) {
    const name = row.task ?? (spec.tasks.length === 1 ? spec.tasks[0].name : undefined);
    const task = tasks.get(name);
    if (!task) throw new Error(`unknown task '${name}'; this export has tasks: ${[...tasks.keys()].join(', ')}`);
    return task;
  }

  function encode(rows) {
    const encoded = rows.map((row) => {
      const options = { truncation: true, max_length: spec.max_length };
      if (row.text_pair !== undefined) options.text_pair = row.text_pair;
      const enc = tokenizer(row.text, options);
      const ids = Array.from(enc.input_ids.data);
      const types = enc.token_type_ids ? Array.from(enc.token_type_ids.data) : ids.map(() => 0n);
      return { ids, types };
    });
    const width = Math.max(...encoded.map((e) => e.ids.length));
    const n = rows.length;
    const ids = new BigInt64Array(n * width).fill(padId);
    const mask = new BigInt64Array(n * width);
    const types = new BigInt64Array(n * width);
    encoded.forEach((e, r) => {
      e.ids.forEach((v, j) => {
        ids[r * width + j] = BigInt(v);
        mask[r * width + j] = 1n;
        types[r * width + j] = BigInt(e.types[j]);
      });
    });
    const all = { input_ids: ids, attention_mask: mask, token_type_ids: types };
    const feeds = {};
    for (const name of spec.inputs) {
      if (name === 'task_ids') continue;
      feeds[name] = new ort.Tensor('int64', all[name], [n, width]);
    }
    return feeds;
  }

  async function classify(rows) {
    if (!rows.length) return [];
    const rowTasks = rows.map(taskOf);
    const feeds = encode(rows);
    if (spec.task_ids) feeds.task_ids = new ort.Tensor('int64', BigInt64Array.from(rowTasks.map((t) => BigInt(t.id))), [rows.length]);
    const output = (await session.run(feeds)).logits;
    const width = output.dims[1];
    return rowTasks.map((task, r) => {
      const logits = Array.from(output.data.slice(r * width, r * width + task.labels.length));
      const p = softmax(logits);
      const k = p.indexOf(Math.max(...p));
      return {
        task: task.name,
        label: task.labels[k],
        label_id: k,
        score: p[k],
        scores: Object.fromEntries(task.labels.map((l, i) => [l, p[i]])),
        logits,
      };
    });
  }

  return { spec, tasks: spec.tasks.map((t) => t.name), classify, session, tokenizer };
}
