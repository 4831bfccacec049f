// Transformers.js text-classification pipeline on a local export, remote models disabled.
// argv: <folder holding the export> <export folder name> <texts.json> <dtype>; prints JSON.
import { readFileSync } from 'node:fs';
import { pipeline, env } from '@huggingface/transformers';

const [root, name, textsFile, dtype] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = root.endsWith('/') ? root : root + '/';
const classify = await pipeline('text-classification', name, { dtype, device: 'cpu' });
const out = [];
for (const text of JSON.parse(readFileSync(textsFile, 'utf8'))) out.push((await classify(text))[0]);
console.log(JSON.stringify(out));
