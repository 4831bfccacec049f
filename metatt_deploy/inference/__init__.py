"""The runtime floor: everything a deployment needs to open an export and answer requests, with no
training stack. Plain readers of the export formats, tokenization from ``tokenizer.json`` with the
``tokenizers`` library and chat templates rendered with jinja2 (text.py), and a numpy decode loop
with a KV cache over ONNX Runtime (decode.py). Modules here import only the standard library,
numpy, onnxruntime, tokenizers, jinja2 and ``metatt_deploy.common``: never torch, transformers,
datasets, optimum, peft or accelerate, so ``pip install metatt-deploy`` alone runs every export.
"""
