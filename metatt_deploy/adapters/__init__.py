"""MetaTT adapters on a Hugging Face model (the PEFT tuner split: config / layer / model).

`config` is the adapter's JSON description; `targets` finds the projections to adapt per
architecture; `layer` holds the shared tensor train (`MetaTT`) and the wrapper of one frozen
linear layer (`MetaTTLayer`); `model` attaches, saves, loads and merges an adapter;
`heads` and `multitask` add one classification head per task and per-row task routing;
`base_model` loads base models and tokenizers (the embedded default offline).
"""
