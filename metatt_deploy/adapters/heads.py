"""Per-task classification heads: one copy of each head module per task, routed per row.

A multi-task model replaces each head module of the architecture (``classifier`` for BERT,
``pre_classifier`` and ``classifier`` for DistilBERT, ...) by a `TaskHeads` router holding one
copy per task; in the last head module the label-producing ``nn.Linear`` has that task's label
count. Outputs are padded to the widest head with `PAD_LOGIT` (see multitask.py for the layout).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.common.errors import MetaTTError

PAD_LOGIT = -1.0e4


def label_linear(module: nn.Module) -> tuple[nn.Module | None, str, nn.Linear]:
    """(parent, attribute, linear) of the last nn.Linear in ``module``: the label-producing layer."""
    found = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = (name, sub)
    if found is None:
        raise MetaTTError(f"the classification head {type(module).__name__} has no nn.Linear layer; multi-task heads need one")
    name, linear = found
    if not name:
        return None, "", linear
    parent_name, _, child = name.rpartition(".")
    return module.get_submodule(parent_name) if parent_name else module, child, linear


def out_width(module: nn.Module) -> int:
    """Output width of a head module: out_features of its last nn.Linear."""
    return label_linear(module)[2].out_features


class TaskHeads(nn.Module):
    """One copy of a head module per task, routed per row by ``task_ids``.

    ``task_ids`` is set by `MultiTaskModel` around each forward: an int (the whole batch) or a
    LongTensor (batch,). Outputs are padded to the widest head with ``pad``.
    """

    def __init__(self, heads: Sequence[nn.Module], pad: float = PAD_LOGIT):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.pad = pad
        self.task_ids: int | torch.Tensor | None = None
        # Export only (export/factored.py): heads that are single nn.Linear layers run as one
        # gathered weight per row instead of every head on every row + pads + a gather
        self.stacked = False

    @property
    def width(self) -> int:
        return max(out_width(h) for h in self.heads)

    def _padded(self, y: torch.Tensor, width: int) -> torch.Tensor:
        missing = width - y.shape[-1]
        return F.pad(y, (0, missing), value=self.pad) if missing else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.task_ids
        if ids is None:
            if len(self.heads) != 1:
                raise MetaTTError("this model serves several tasks: pass task_ids to MultiTaskModel, not to the inner model")
            ids = 0
        width = self.width
        if isinstance(ids, int):
            return self._padded(self.heads[ids](x), width)
        if self.stacked and all(isinstance(h, nn.Linear) for h in self.heads):
            return self._stacked(x, ids, width)
        # every head on every row, then each row takes its task's output (heads are tiny)
        outs = torch.stack([self._padded(h(x), width) for h in self.heads])  # (T, B, ..., W)
        index = ids.reshape(1, -1, *([1] * (outs.dim() - 2))).expand(1, *outs.shape[1:])
        return outs.gather(0, index).squeeze(0)

    def _stacked(self, x: torch.Tensor, ids: torch.Tensor, width: int) -> torch.Tensor:
        """Row b times its task's (in, width) weight plus bias; padded columns get zero weights and ``pad`` as bias.

        The stacked weights depend on parameters only, so ONNX Runtime folds them when it loads
        the graph; what runs per call is two gathers, a batched MatMul and an add.
        """
        linears = [cast(nn.Linear, h) for h in self.heads]
        weights = torch.stack([F.pad(h.weight, (0, 0, 0, width - h.out_features)) for h in linears]).transpose(1, 2)
        biases = torch.stack(
            [
                F.pad(h.bias if h.bias is not None else h.weight.new_zeros(h.out_features), (0, width - h.out_features), value=self.pad)
                for h in linears
            ]
        )
        w, b = weights.index_select(0, ids), biases.index_select(0, ids)  # (B, in, width), (B, width)
        if x.dim() == 2:  # pooled (B, in): the usual sequence-classification head
            return (x.unsqueeze(1) @ w).squeeze(1) + b
        y = x.reshape(x.shape[0], -1, x.shape[-1]) @ w + b.unsqueeze(1)
        return y.reshape(*x.shape[:-1], width)


def new_head(model: nn.Module, template: nn.Module, num_labels: int, seed: int) -> nn.Module:
    """A copy of ``template`` whose label-producing Linear has ``num_labels`` outputs (freshly initialised)."""
    head = copy.deepcopy(template)
    parent, child, old = label_linear(head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
        init = getattr(model, "_init_weights", None)
        if callable(init):
            init(new)
    if parent is None:
        return new
    setattr(parent, child, new)
    return head


def add_task_heads(model: nn.Module, config: MetaTTConfig, seed: int = 0) -> None:
    """Replace each head module of ``model`` by a `TaskHeads` with one copy per task of ``config``.

    Only the last head module produces labels; earlier ones (DistilBERT's pre_classifier) are
    plain copies, one per task. A causal LM has no head modules: nothing to do.
    """
    if not config.head_modules:
        return
    last = config.head_modules[-1]
    for name in config.head_modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        template = getattr(parent, child)
        if isinstance(template, TaskHeads):
            raise MetaTTError("this model already has per-task heads; load a fresh base model")
        heads = []
        for t, task in enumerate(config.tasks):
            n = len(config.label_names[task])
            heads.append(new_head(model, template, n, seed + 1000 + t) if name == last else copy.deepcopy(template))
        router = TaskHeads(heads)
        router.requires_grad_(True)
        setattr(parent, child, router)


def routers(model: nn.Module) -> list[TaskHeads]:
    return [m for m in model.modules() if isinstance(m, TaskHeads)]


def select_task_head(model: nn.Module, config: MetaTTConfig, task: int) -> None:
    """Put task ``task``'s head modules in place of the routers and its labels into the HF config."""
    for name in config.head_modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        router = getattr(parent, child)
        if isinstance(router, TaskHeads):
            setattr(parent, child, router.heads[task])
    labels = config.label_names[config.tasks[task]]
    hf: Any = model.config
    hf.num_labels = len(labels)
    hf.id2label = dict(enumerate(labels))
    hf.label2id = {n: i for i, n in enumerate(labels)}
