"""The runtime floor: everything a deployment needs to open an export and answer with it, no torch.

An export is the whole contract (ONNX graphs, ``tokenizer.json``, JSON records), so running one
needs numpy, onnxruntime, tokenizers and jinja2 and nothing of the training stack: `formats`
defines and checks the files (export/ writes them through the same constants), `tasks` turns
task names into indices, `task_table` holds the tasks an export serves, `sessions` opens ONNX
Runtime sessions and task adapters, `text` tokenizes and renders chat templates, `decode` runs
the KV-cache decode loop. serving/ builds the CLI's runtimes and the HTTP servers on this floor;
an import-linter contract keeps torch, transformers, datasets, optimum, peft and accelerate out of it.
"""
