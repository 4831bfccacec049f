"""Lossless export of a MetaTT adapter to a PEFT LoRA adapter (``merge --to peft``).

Every adapted matrix of a MetaTT adapter is a product of thin factors,

    alpha * dW[l, m] = alpha * A[:d_in] @ C[l, m] (@ T[t]) @ B[:, :d_out]      (d_in x d_out)

with A the input factor (D_in x r_in), C[l, m] (@ the task slice) an r_in x r_out matrix and B
the output factor (r_out x D_out; for 5D the head and head-dim cores contracted). So it is
exactly a LoRA pair of rank min(r_in, r_out): PEFT computes ``x @ (lora_B @ lora_A)^T *
scaling`` and we write

    r_in <= r_out:  lora_A = A^T             lora_B = alpha * (C @ B)^T
    r_in >  r_out:  lora_A = (A @ C)^T       lora_B = alpha * B^T

with ``lora_alpha`` equal to the module's rank, so PEFT's scaling ``lora_alpha / r`` is 1.

A fused module (GPT-2's ``c_attn``: q, k and v are thirds of one Conv1D's output) gets one
LoRA pair for all its segments. When r_in <= n_segments * r_out the input side is shared,
``lora_A = A^T`` and the rows of ``lora_B`` for segment s are ``alpha * (C_s @ B)^T`` (rank
r_in); otherwise the per-segment pairs are stacked, ``lora_A`` = the ``(A @ C_s)^T`` one under
the other and ``lora_B`` block-diagonal with ``alpha * B^T`` blocks (rank n_segments * r_out).
Output units no segment owns get zero rows. Conv1D modules use ``fan_in_fan_out=True`` (PEFT
transposes the update for them); the LoRA matrices themselves have the same shapes as for
nn.Linear. Modules whose rank differs from the most common one are listed in
``rank_pattern`` / ``alpha_pattern`` (escaped exact module names).

The classification head goes along as PEFT ``modules_to_save``; peft 0.18 saves such a module
under its plain name (``base_model.model.classifier.weight``; the in-memory
``modules_to_save.default.`` part is dropped on save and restored on load).

The result loads with ``peft.PeftModel.from_pretrained(base, output)`` on the untouched base
model and no metatt code, and gives the MetaTT model's logits (to float32 rounding).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from metatt_deploy.adapters.config import CONFIG_NAME, WEIGHTS_NAME, MetaTTConfig
from metatt_deploy.adapters.layer import MetaTT
from metatt_deploy.adapters.lora import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, is_lora_adapter, lora_record, write_lora_record
from metatt_deploy.adapters.model import read_weights, split_state
from metatt_deploy.adapters.targets import TargetModule
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_dir, check_separate, check_writable

PREFIX = "base_model.model."


def lora_pair(adapter: MetaTT, target: TargetModule, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (R, d_in), lora_B (d_out, R)) with lora_B @ lora_A == the module's alpha * dW^T.

    Computed in float64 from the float32 cores; returned as float32.
    """
    with torch.no_grad():
        a = adapter.input_factor().double()[: target.in_features]  # (d_in, r_in)
        b = adapter.output_factor().double()  # (r_out, D_out)
        alpha = adapter.alpha
        segments = sorted(target.segments, key=lambda s: s[1])
        cs = []
        for m, _, _ in segments:
            c = adapter.core_matrix(target.layer, m).double()
            if adapter.task_mode is not None:
                c = c @ adapter.cores[adapter.task_mode][:, 0 if task is None else task, :].double()
            cs.append(c)
        r_in, r_out = a.shape[1], b.shape[0]
        n = len(segments)
        if r_in <= n * r_out:  # shared input side: rank r_in
            lora_a = a.T
            lora_b = a.new_zeros(target.out_features, r_in)
            for c, (_, start, end) in zip(cs, segments):
                lora_b[start:end] = alpha * (c @ b[:, : end - start]).T
        else:  # stacked per-segment pairs: rank n * r_out
            lora_a = torch.cat([(a @ c).T for c in cs], dim=0)
            lora_b = a.new_zeros(target.out_features, n * r_out)
            for s, (_, start, end) in enumerate(segments):
                lora_b[start:end, s * r_out : (s + 1) * r_out] = alpha * b[:, : end - start].T
        return lora_a.float().contiguous(), lora_b.float().contiguous()


def task_heads(config: MetaTTConfig, heads: dict[str, torch.Tensor], task: int | None) -> dict[str, torch.Tensor]:
    """The head tensors of one task, keyed ``{module}.{param}``.

    Multi-task adapters store one copy of each head module per task, as
    ``{module}.heads.{t}.{param}`` (multitask.TaskHeads); a single head is stored as is.
    """
    out = {}
    for key, value in heads.items():
        for module in config.head_modules:
            prefix = f"{module}.heads."
            if key.startswith(prefix):
                index, _, rest = key[len(prefix) :].partition(".")
                if int(index) == (task or 0):
                    out[f"{module}.{rest}"] = value
                break
        else:
            out[key] = value
    return out


def peft_state(config: MetaTTConfig, cores: list[torch.Tensor], heads: dict[str, torch.Tensor], task: int | None):
    """The PEFT safetensors dict and the per-module LoRA ranks."""
    adapter = MetaTT(config, cores)
    heads = task_heads(config, heads, task)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for target in config.modules:
        lora_a, lora_b = lora_pair(adapter, target, task)
        tensors[f"{PREFIX}{target.name}.lora_A.weight"] = lora_a
        tensors[f"{PREFIX}{target.name}.lora_B.weight"] = lora_b
        ranks[target.name] = lora_a.shape[0]
    for key, value in heads.items():  # "classifier.weight" -> base_model.model.classifier.weight
        tensors[PREFIX + key] = value.detach().to("cpu").contiguous()
    return tensors, ranks


def lora_config_dict(config: MetaTTConfig, ranks: dict[str, int]) -> dict:
    """Keyword arguments of peft.LoraConfig for the exported adapter."""
    transposed = {m.transposed for m in config.modules}
    if len(transposed) > 1:
        raise MetaTTError(
            "this adapter mixes Conv1D and nn.Linear targets, which one PEFT LoRA config cannot express "
            "(fan_in_fan_out is global); merge it to a dense model instead"
        )
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    return dict(
        task_type=config.kind.peft_record,
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=[m.name for m in config.modules],
        modules_to_save=list(config.head_modules),
        fan_in_fan_out=transposed == {True},
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        inference_mode=True,
        base_model_name_or_path=config.base_model or None,
    )


def to_peft(adapter_dir: str | Path, output: str | Path, task: str | None = None, force: bool = False) -> Path:
    """Write ``adapter_dir`` as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

    ``task`` picks the task of a multi-task adapter (its task slice is folded into the pairs and
    its head is the one exported: load it on a base with that task's label count).
    The other files of the adapter directory (the tokenizer's) are copied along, and
    ``metatt_lora.json`` records the task and its labels (so the folder merges, exports and
    validates like a LoRA run). Returns ``output``.
    """
    from peft import LoraConfig

    check_writable(output, force, marker=PEFT_CONFIG_NAME)
    check_separate(output, [adapter_dir])
    if is_lora_adapter(adapter_dir):
        raise MetaTTError(
            f"{adapter_dir} is already a PEFT LoRA adapter; use it as it is, or merge it to a dense model (without --to peft)"
        )
    config = MetaTTConfig.load(adapter_dir)
    cores, heads = split_state(read_weights(adapter_dir), config)
    t = config.task_index(task)
    tensors, ranks = peft_state(config, cores, heads, t if config.multitask else None)
    kwargs = lora_config_dict(config, ranks)
    lora_config = LoraConfig(**kwargs)
    name = config.tasks[t]
    record = lora_record(
        task=name,
        label_names=config.label_names[name],
        base_model=config.base_model,
        base_fingerprint=config.base_fingerprint if config.format_version >= 2 else "",  # the same definition from format 2
        rank=kwargs["r"],
        lora_alpha=kwargs["lora_alpha"],
        targets=config.targets,
    )
    with atomic_dir(output, force=force, marker=PEFT_CONFIG_NAME) as tmp:
        lora_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        write_lora_record(tmp, record)
        for f in sorted(Path(adapter_dir).iterdir()):  # tokenizer files (whatever the tokenizer wrote)
            if f.is_file() and f.name not in (CONFIG_NAME, WEIGHTS_NAME) and not f.name.startswith("."):
                (tmp / f.name).write_bytes(f.read_bytes())
    return Path(output)
