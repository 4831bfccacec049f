"""The kinds of base model an adapter sits on, chosen once: a sequence classifier or a causal LM.

What differs between the two at the adapter level lives on one `ModelKind` record: whether a head
trains and ships with the adapter (a classifier's fresh head; a decoder generates with its own
frozen LM head), which loader rebuilds the base, what the adapter records in its ``extra`` (a
decoder's adapter says ``"task_type": "causal-lm"``; a classifier's records nothing, as before the
kinds existed, so saved adapters stay byte-compatible), PEFT's ``task_type`` for a LoRA baseline,
and how a multi-task forward computes its loss. `MODEL_KINDS` is the dispatch list (PEFT's
``_create_new_module`` style: the first kind that matches wins, the classifier catches the rest);
`model_kind`, `saved_kind`, `adapter_kind` and `peft_kind` are the only places a kind is decided.
training/kinds.py builds its task kinds on these; this module sits below it, as adapters/ does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from metatt_deploy.adapters.base_model import friendly_load, load_causal_lm, load_classifier, resolve_model
from metatt_deploy.adapters.targets import CAUSAL_LM_SUFFIXES, NEW_MODULES_ATTR, architecture_heads
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import CAUSAL_LM, CLASSIFICATION


def _classifier_output(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor | None) -> SequenceClassifierOutput:
    """A routed classifier's logits (padded to the widest head) and their cross-entropy: HF's own
    loss would read the model's single label count, which per-task heads do not have."""
    logits = model(**inputs).logits
    loss = F.cross_entropy(logits.float(), labels.long()) if labels is not None else None
    return SequenceClassifierOutput(loss=cast(torch.FloatTensor, loss), logits=logits)


def _lm_output(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor | None) -> Any:
    """A causal LM's own forward: ``labels`` (response tokens, -100 elsewhere) give its shifted loss."""
    return model(**inputs, labels=labels)


@dataclass(frozen=True)
class ModelKind:
    """What a kind of base model brings to adapters; one instance per kind, in `MODEL_KINDS`."""

    name: str  # the task_type bundles, manifests and metrics record (inference.formats)
    suffixes: tuple[str, ...]  # architecture class names of this kind end in one of these; () matches any
    load_base: Callable[[str, list[str]], nn.Module]  # (model name, label names of the first task) -> base model
    has_head: bool  # a head trains, ships and needs two or more labels per task (a decoder's LM head stays frozen)
    generates: bool  # answers by generation (``generate``) rather than by one forward's logits
    default_labels: Callable[[Any, list[str]], dict[str, list[str]]]  # (HF config, tasks) -> label names when none are given
    output: Callable[[nn.Module, dict[str, Any], torch.Tensor | None], Any]  # a routed forward with its loss
    peft_task_type: str | None  # LoraConfig's task_type for a baseline on this kind
    peft_record: str  # the task_type a lossless PEFT export (export/peft.py) records; `peft_kind` reads it back
    recorded: dict[str, str] = field(default_factory=dict)  # what the adapter's extra records of the kind

    def matches(self, architectures: Iterable[str]) -> bool:
        return not self.suffixes or any(a.endswith(self.suffixes) for a in architectures)


CLASSIFIER_MODEL = ModelKind(
    name=CLASSIFICATION,
    suffixes=(),
    load_base=load_classifier,
    has_head=True,
    generates=False,
    default_labels=lambda hf_config, tasks: {tasks[0]: [str(v) for v in hf_config.id2label.values()]},
    output=_classifier_output,
    peft_task_type=None,
    peft_record="SEQ_CLS",
)
CAUSAL_LM_MODEL = ModelKind(
    name=CAUSAL_LM,
    suffixes=CAUSAL_LM_SUFFIXES,
    load_base=lambda name, _labels: load_causal_lm(name),
    has_head=False,
    generates=True,
    default_labels=lambda _hf_config, tasks: {t: [] for t in tasks},
    output=_lm_output,
    peft_task_type="CAUSAL_LM",
    peft_record="CAUSAL_LM",
    recorded={"task_type": CAUSAL_LM},
)
MODEL_KINDS: tuple[ModelKind, ...] = (CAUSAL_LM_MODEL, CLASSIFIER_MODEL)  # first match wins: the classifier is the fallback


def model_kind_named(name: str) -> ModelKind:
    for kind in MODEL_KINDS:
        if kind.name == name:
            return kind
    raise MetaTTError(f"unknown task type '{name}'; use {', '.join(k.name for k in MODEL_KINDS)}")


def _first_match(architectures: list[str]) -> ModelKind:
    return next(k for k in MODEL_KINDS if k.matches(architectures))


def model_kind(model: nn.Module) -> ModelKind:
    """The kind of a loaded model, from its class (a decoder loaded as a language model is causal)."""
    return _first_match([type(model).__name__])


def saved_kind(name: str) -> ModelKind:
    """The kind a model folder or hub name was saved as, from its config's ``architectures`` (no weights loaded)."""
    path = resolve_model(name)
    config = friendly_load(lambda: AutoConfig.from_pretrained(path), name, "model config")
    return _first_match(list(config.architectures or []))


def adapter_kind(extra: dict[str, Any]) -> ModelKind:
    """The kind an adapter's ``extra`` records (a classifier's records none)."""
    return model_kind_named(str(extra.get("task_type", CLASSIFICATION)))


def peft_kind(task_type: Any) -> ModelKind:
    """The kind of a PEFT folder from its config's ``task_type`` (a classifier's LoRA may record none or SEQ_CLS)."""
    return next((k for k in MODEL_KINDS if k.peft_task_type is not None and k.peft_task_type == task_type), CLASSIFIER_MODEL)


def head_modules(model: nn.Module) -> list[str]:
    """Names of the modules that train and ship with the adapter: the classification head's top
    modules, preceded by head-adjacent modules the base checkpoint lacked (NEW_MODULES_ATTR).

    None for a kind without a head (a causal LM: its LM head is pretrained, stays frozen, is not shipped).
    """
    if not model_kind(model).has_head:
        return []
    heads = architecture_heads(model)
    return [*(m for m in getattr(model, NEW_MODULES_ATTR, []) if m not in heads), *heads]
