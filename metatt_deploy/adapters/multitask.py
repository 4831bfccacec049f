"""Multi-task MetaTT-(4+1)D models: one head per task, per-row task routing, saving, extending.

Model side (docs/multitask.md has the user-facing rules):

- The adapter is the (4+1)D tensor train of ``model.build_config(tasks=[...])``: every core is
  shared except one ``r x r`` slice of the task core per task.
- Each head module of the architecture (``classifier`` for BERT, ``pre_classifier`` and
  ``classifier`` for DistilBERT, ...) is replaced by a `TaskHeads` router holding one copy per
  task; in the last head module the label-producing ``nn.Linear`` has that task's label count.
- `MultiTaskModel` is the forward that takes ``task_ids``: an int / task name (the whole batch)
  or one id per row (a mixed batch). It routes the adapter and the heads for that one forward
  (`routed`, a context manager that always restores the previous routing), so every row uses
  its own task slice and head.

Logits layout (the same in PyTorch, the factored ONNX graph and the runtime): ``(batch,
max_labels)`` where ``max_labels`` is the largest label count among the model's tasks; row ``b``
holds its task's ``n_t`` logits in columns ``0..n_t-1`` and `PAD_LOGIT` in the rest. A padded
column never wins an argmax nor takes probability mass (exp(-1e4) == 0 in float32), so the loss
and argmax can run on the padded tensor directly; `split_logits` cuts rows back to their tasks.
PAD_LOGIT is finite (fp16-safe) so differences of padded tensors stay well defined.

Training several tasks (task specs, sampling, the loop, adding a task) is training/multitask.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from metatt_deploy.adapters import model as mt
from metatt_deploy.adapters.config import DEFAULT_ALPHA, MetaTTConfig
from metatt_deploy.adapters.heads import TaskHeads, add_task_heads, new_head, routers
from metatt_deploy.adapters.targets import DEFAULT_TARGETS
from metatt_deploy.common.errors import MetaTTError


class MultiTaskModel(nn.Module):
    """A HF classifier (with per-task heads) or causal LM carrying a (4+1)D adapter; forward takes ``task_ids``.

    For a causal LM the forward is the language model's own (``labels`` give its loss, logits
    over the vocabulary) with every row's task slice, and `generate` routes the whole generation.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        if not mt.get_adapter(model).config.multitask:
            raise MetaTTError("this adapter has no task mode; multi-task models need an adapter trained with several --task")

    @property
    def metatt(self):  # lets model.get_adapter() and train.py's helpers find the adapter
        return mt.get_adapter(self.model)

    @property
    def adapter_config(self) -> MetaTTConfig:
        return self.metatt.config

    @property
    def tasks(self) -> list[str]:
        return list(self.adapter_config.tasks)

    @property
    def num_labels(self) -> list[int]:
        cfg = self.adapter_config
        return [len(cfg.label_names[t]) for t in cfg.tasks]

    def task_ids_for(self, task_ids, batch: int) -> int | torch.Tensor:
        """Normalise a task name, an index, names/indices per row or a LongTensor; unknown tasks are errors."""
        cfg = self.adapter_config
        if isinstance(task_ids, (str, int)):
            return cfg.task_index(task_ids)
        if isinstance(task_ids, (list, tuple)):
            task_ids = torch.tensor([cfg.task_index(t) for t in task_ids], dtype=torch.long)
        if isinstance(task_ids, torch.Tensor):
            ids = task_ids = task_ids.reshape(-1).long().to(self.metatt.cores[0].device)
            if not torch.jit.is_tracing() and ids.numel() != batch:
                raise MetaTTError(f"task_ids has {ids.numel()} entries for a batch of {batch}; give one task id per row")
        else:
            raise MetaTTError("task_ids must be a task name, an int, a list of them or a LongTensor; pass one per row")
        if not torch.jit.is_tracing() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(cfg.tasks)):
            bad = int(ids.max()) if int(ids.max()) >= len(cfg.tasks) else int(ids.min())
            raise MetaTTError(
                f"unknown task id {bad}; this model has {len(cfg.tasks)} tasks: " + ", ".join(f"{i}={t}" for i, t in enumerate(cfg.tasks))
            )
        return task_ids

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, task_ids=None, labels=None, **kwargs):
        if task_ids is None:
            raise MetaTTError(f"pass task_ids (one of {', '.join(self.tasks)}, or one per row) to a multi-task model")
        batch = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[0]
        ids = self.task_ids_for(task_ids, batch)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids, **kwargs}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        with routed(self.model, ids):
            return self.adapter_config.kind.output(self.model, inputs, labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, task_ids=None, **kwargs) -> torch.Tensor:
        """A causal LM's ``generate`` with task ``task_ids`` (one, or one per row) for every step."""
        if not self.adapter_config.kind.generates:
            raise MetaTTError(f"generate is for causal language models; this multi-task model is a {self.adapter_config.kind.name} model")
        if task_ids is None:
            raise MetaTTError(f"pass task_ids (one of {', '.join(self.tasks)}, or one per row) to generate")
        with routed(self.model, self.task_ids_for(task_ids, input_ids.shape[0])):
            return self.model.generate(input_ids=input_ids, **kwargs)  # type: ignore[operator]


@contextmanager
def routed(model: nn.Module, task_ids: int | torch.Tensor) -> Iterator[None]:
    """Route ``model``'s adapter and task heads to ``task_ids`` (one id, or one per row) inside the block.

    The previous routing is restored on exit, exceptions included, so no forward outside the
    block can run with a stale task.
    """
    heads = routers(model)
    previous = [r.task_ids for r in heads]
    for r in heads:
        r.task_ids = task_ids
    try:
        with mt.get_adapter(model).routed(task_ids):
            yield
    finally:
        for r, ids in zip(heads, previous):
            r.task_ids = ids


class TaskView(nn.Module):
    """A multi-task model fixed to one task, giving only that task's logits.

    This is what the dense model of that task (``merge --task``, ``export --task``) computes, so
    it is the unmerged reference that `metatt-deploy validate --task` compares an export with.
    """

    def __init__(self, mtm: MultiTaskModel, task: str):
        super().__init__()
        self.mtm = mtm
        self.task = mtm.adapter_config.task_index(task)
        self.num_labels = mtm.num_labels[self.task]

    @property
    def config(self) -> Any:
        """The base model's config (position table, tokens), as a Hugging Face classifier exposes it."""
        return self.mtm.model.config

    def forward(self, **inputs) -> SequenceClassifierOutput:
        logits = self.mtm(**inputs, task_ids=self.task).logits
        return SequenceClassifierOutput(logits=logits[:, : self.num_labels])


def split_logits(logits: np.ndarray | torch.Tensor, task_ids: Sequence[int], num_labels: Sequence[int]) -> list:
    """Row b of padded logits cut to its task's label count."""
    return [logits[b, : num_labels[t]] for b, t in enumerate(task_ids)]


# ---------------------------------------------------------------- building, saving, loading


def build_multitask(
    model: nn.Module,
    tasks: Sequence[str],
    label_names: dict[str, list[str]],
    *,
    method: str = "metatt-4d",
    rank: int | list[int] = 8,
    alpha: float = DEFAULT_ALPHA,
    init: str | None = None,
    targets: str | list[str] = DEFAULT_TARGETS,
    base_model: str = "",
    seed: int = 0,
    cores: list[torch.Tensor] | None = None,
    extra: dict | None = None,
) -> MultiTaskModel:
    """Attach a (4+1)D adapter for ``tasks`` and per-task heads to ``model`` (a fresh HF classifier)."""
    tasks = list(tasks)
    if len(tasks) < 2:
        raise MetaTTError("multi-task training needs at least two tasks; give --task twice or more (for one task: --dataset or --train)")
    if len(set(tasks)) != len(tasks):
        raise MetaTTError(f"task names repeat ({', '.join(tasks)}); give each task a distinct NAME=")
    config = mt.build_config(
        model,
        method=method,
        rank=rank,
        alpha=alpha,
        init=init,
        targets=targets,
        tasks=tasks,
        label_names={t: list(label_names[t]) for t in tasks},
        base_model=base_model,
        extra=extra,
    )
    mt.attach(model, config, cores, seed=seed)
    add_task_heads(model, config, seed)
    return MultiTaskModel(model)


def load_multitask(directory: str | Path, base_model: str | None = None, tokenizer: bool = True):
    """A saved multi-task adapter (a run's best/) as (MultiTaskModel, config, tokenizer or None)."""
    config = MetaTTConfig.load(directory)
    if not config.multitask:
        raise MetaTTError(f"{directory} holds a single-task adapter; multi-task commands need one trained with several --task")
    model, config, tok = mt.load_adapter(directory, base_model=base_model, tokenizer=tokenizer)
    return MultiTaskModel(model).eval(), config, tok


def save_multitask(mtm: MultiTaskModel, directory: str | Path, tokenizer=None, force: bool = False) -> Path:
    """Same files as a single-task adapter: config JSON + safetensors (heads as head.<module>.heads.<t>.*)."""
    return mt.save_adapter(mtm.model, directory, tokenizer=tokenizer, force=force)


def shared_core_indices(config: MetaTTConfig) -> list[int]:
    task = config.mode_names.index("task")
    return [k for k in range(len(config.mode_names)) if k != task]


def bundle_id(config: MetaTTConfig, cores: Sequence[torch.Tensor]) -> str:
    """Identity of everything tasks share: base fingerprint, adapter layout, shared core values.

    Adding a task (a new slice + head against the frozen adapter) keeps it; any retraining of the
    shared cores changes it, so a task file records it and is refused by any other bundle.
    """
    layout = {
        "base_fingerprint": config.base_fingerprint,
        "method": config.method,
        "mode_names": config.mode_names,
        "shared_mode_sizes": [s for n, s in zip(config.mode_names, config.mode_sizes) if n != "task"],
        "ranks": [c.shape[-1] for c in cores[:-1]],
        "alpha": config.alpha,
        "targets": config.targets,
        "modules": [m.to_json() for m in config.modules],
        "head_modules": config.head_modules,
    }
    h = hashlib.sha256(json.dumps(layout, sort_keys=True).encode())
    for k in shared_core_indices(config):
        h.update(cores[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def parameter_counts(mtm: MultiTaskModel) -> dict:
    """Trainable parameters: shared cores, and per task its r x r slice plus its head."""
    cfg = mtm.adapter_config
    adapter = mtm.metatt
    t_core = cfg.mode_names.index("task")
    shared = sum(adapter.cores[k].numel() for k in shared_core_indices(cfg))
    slice_size = adapter.cores[t_core].shape[0] * adapter.cores[t_core].shape[2]
    per_task = {}
    for t, task in enumerate(cfg.tasks):
        head = sum(p.numel() for r in routers(mtm.model) for p in r.heads[t].parameters())
        per_task[task] = {"task_slice": slice_size, "head": head, "total": slice_size + head}
    total = shared + sum(v["total"] for v in per_task.values())
    return {"shared_cores": shared, "per_task": per_task, "total": total, "adapter_total": shared + slice_size * len(cfg.tasks)}


def extend_tasks(mtm: MultiTaskModel, name: str, label_names: list[str], seed: int = 0, text_columns: Sequence[str] = ()) -> int:
    """Append task ``name``: a new task-core slice (the mean of the existing ones) and a new head.

    Returns the new task's index. Every existing slice, head and shared core is left bit-identical.
    ``text_columns`` (a classifier task's training columns) are recorded in the config.
    """
    cfg = mtm.adapter_config
    if name in cfg.tasks:
        raise MetaTTError(f"task '{name}' is already in this adapter ({', '.join(cfg.tasks)}); choose another NAME")
    adapter = mtm.metatt
    t_core = cfg.mode_names.index("task")
    with torch.no_grad():
        old = adapter.cores[t_core].detach()
        new_core = torch.cat([old, old.mean(dim=1, keepdim=True)], dim=1)
    cores = [c.detach() for c in adapter.cores]
    cores[t_core] = new_core
    cfg = cfg.with_tasks([*cfg.tasks, name], {**cfg.label_names, name: list(label_names)})
    if text_columns:
        cfg = cfg.with_text_columns(name, text_columns)
    adapter.set_cores(cores, cfg)
    index = len(cfg.tasks) - 1
    last = cfg.head_modules[-1] if cfg.head_modules else None  # a kind without a head has none to grow
    for head_name in cfg.head_modules:
        router = cast(TaskHeads, mtm.model.get_submodule(head_name))
        template = router.heads[0]
        router.heads.append(
            new_head(mtm.model, template, len(label_names), seed + 1000 + index) if head_name == last else copy.deepcopy(template)
        )
    return index
