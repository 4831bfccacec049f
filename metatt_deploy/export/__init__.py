"""From a trained adapter to shippable artefacts, each checked against the adapter.

`merge` folds the adapter into the base weights; `peft` writes the lossless PEFT LoRA
equivalent; `onnx` exports through optimum (optimised, quantised, fp16) with a manifest;
`factored` writes multi-task bundles (base once, shared cores once, a small file per task)
and their ONNX graphs; `validate` compares an export with its unmerged adapter (parity,
accuracy, latency).
"""
