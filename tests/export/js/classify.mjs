// web/metatt.js in Node with onnxruntime-node: argv <web folder> <rows.json>; prints JSON results.
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import * as ort from 'onnxruntime-node';
import { AutoTokenizer, env } from '@huggingface/transformers';

const [web, rowsFile] = process.argv.slice(2);
const { loadClassifier } = await import(pathToFileURL(`${web}/metatt.js`).href);
const clf = await loadClassifier({ base: web, ort, AutoTokenizer, env, sessionOptions: { intraOpNumThreads: 1 } });
console.log(JSON.stringify(await clf.classify(JSON.parse(readFileSync(rowsFile, 'utf8')))));
