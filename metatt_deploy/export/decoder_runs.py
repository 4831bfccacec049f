"""A decoder run the way every check runs it: greedy tokens and teacher-forced logits, through PyTorch or optimum.

Export parity (onnx_lm.py), the int4/int8 quality gate (quality.py) and decoder validation
(validate_lm.py) compare runtimes through these few functions, so they compare the same thing.
The served runtime is the numpy loop (inference/decode.py); these are the references it is held to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from metatt_deploy.training.lm_data import prompt_ids


def load_ort_decoder(folder: str | Path, providers: list[str] | None = None, threads: int | None = None, file_name: str | None = None):
    """ORTModelForCausalLM on ``folder`` (its ``file_name`` graph, model.onnx by default; CPU unless told), with ``threads`` intra-op threads."""
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ORTModelForCausalLM.from_pretrained(
        folder, providers=providers or ["CPUExecutionProvider"], session_options=options, file_name=file_name, use_io_binding=False
    )


def chat_prompts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [prompt_ids([{"role": "user", "content": t}], tokenizer) for t in texts]


def greedy(model: Any, ids: list[int], max_new_tokens: int, eos: int | list[int] | None, pad: int) -> list[int]:
    """Greedy continuation of one prompt (no padding), through ``generate`` of either runtime."""
    import torch

    x = torch.tensor([ids])
    out = model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )
    return out[0, len(ids) :].tolist()


def teacher_forced_logits(model: Any, ids: list[int]) -> np.ndarray:
    """Next-token logits at every position of ``ids`` (one sequence, no cache reuse), as float32."""
    out = teacher_forced_logits_tensor(model, ids)
    return (out.detach().numpy() if hasattr(out, "detach") else np.asarray(out)).astype(np.float32)


def teacher_forced_logits_tensor(model: Any, ids: list[int]) -> Any:
    """The same logits in the model's own type and precision (a float64 reference keeps its float64)."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
