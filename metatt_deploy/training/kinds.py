"""The task kind of a run, chosen once: what differs between training a classifier and a causal LM.

A run is a sequence classifier (`TaskData`: a head per task, accuracy picks the best epoch) or a
causal language model (`TextTask`: no head, response-only loss, exact match of greedy answers,
ties broken by the lower perplexity). Everything that differs between the two lives on one
`TaskKind` object: the default model, the data reader and tokenization, the collator, the metric
that picks the best epoch, how an epoch's validation is scored. The recipes ask the kind instead of
branching on "is this causal"; `KINDS` is the dispatch list (PEFT's `_create_new_module` style),
and `kind_named`, `kind_for_model` and `kind_of_task` are the only places a kind is decided.
The kind's name is the ``task_type`` that bundles, manifests and metrics record
(`inference.formats.CLASSIFICATION` / `CAUSAL_LM`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn
from transformers import DataCollatorWithPadding

from metatt_deploy.adapters.base_model import DEFAULT_DECODER, DEFAULT_MODEL, load_causal_lm, load_classifier, task_type
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import CAUSAL_LM, CLASSIFICATION, context_length
from metatt_deploy.training.causal import TIE_BREAK
from metatt_deploy.training.config import DEFAULT_EVAL_BATCH_SIZE
from metatt_deploy.training.data import TaskData, tokenize_task
from metatt_deploy.training.lm_data import CausalCollator, TextTask, tokenize_text_task
from metatt_deploy.training.metrics import PRIMARY_METRIC

AUTO = "auto"


@dataclass(frozen=True)
class TaskKind:
    """What a kind of task brings to training; one instance per kind, in `KINDS`."""

    name: str
    primary_metric: str
    task_type: type  # the data class of its tasks: TaskData or TextTask
    default_model: str
    load_base: Callable[[str, list[str]], nn.Module]  # (model name, label names of the first task) -> base model
    collator: Callable[[Any], Any]  # tokenizer -> collate function
    eval_batch_size: Callable[[int], int]  # training batch size -> evaluation batch size

    @property
    def causal(self) -> bool:
        return self.name == CAUSAL_LM

    def model_or_default(self, model: str | None) -> str:
        """The embedded encoder cannot generate: a causal-LM run on the default model uses the embedded decoder."""
        return self.default_model if model in (None, DEFAULT_MODEL) else str(model)

    def tokenize(self, task: TaskData | TextTask, tokenizer: Any, max_length: int, model: nn.Module) -> dict:
        if isinstance(task, TextTask):
            config = model.config.to_dict()  # type: ignore[union-attr,operator]
            return tokenize_text_task(task, tokenizer, max_length, context_length(config))
        return tokenize_task(task, tokenizer, max_length)

    def score(self, metrics: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], float]:
        """An epoch's validation fields and the score that picks the best epoch (higher is better)."""
        primary = self.primary_metric
        mean = float(np.mean([m[primary] for m in metrics.values()]))
        fields: dict[str, Any] = {"tasks": metrics, f"mean_{primary}": mean}
        if not self.causal:
            return fields, mean
        fields["mean_perplexity"] = float(np.mean([m["perplexity"] for m in metrics.values()]))
        return fields, mean - TIE_BREAK * fields["mean_perplexity"]


CLASSIFIER_KIND = TaskKind(
    name=CLASSIFICATION,
    primary_metric=PRIMARY_METRIC,
    task_type=TaskData,
    default_model=DEFAULT_MODEL,
    load_base=load_classifier,
    collator=DataCollatorWithPadding,
    eval_batch_size=lambda _batch_size: DEFAULT_EVAL_BATCH_SIZE,
)
CAUSAL_LM_KIND = TaskKind(
    name=CAUSAL_LM,
    primary_metric="exact_match",
    task_type=TextTask,
    default_model=DEFAULT_DECODER,
    load_base=lambda model, _labels: load_causal_lm(model),
    collator=lambda tokenizer: CausalCollator(tokenizer.pad_token_id),
    eval_batch_size=lambda batch_size: min(batch_size * 2, 64),  # generation is slower than a forward
)
KINDS: tuple[TaskKind, ...] = (CLASSIFIER_KIND, CAUSAL_LM_KIND)
KIND_NAMES = (AUTO, *(k.name for k in KINDS))


def kind_named(name: str) -> TaskKind:
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise MetaTTError(f"unknown --task-type '{name}'; use {', '.join(KIND_NAMES)}")


def kind_for_model(model: str | None, requested: str = AUTO) -> TaskKind:
    """``requested`` (a kind's name), or with "auto" the kind the model was saved as (decoders saved as LMs are causal)."""
    if requested != AUTO:
        return kind_named(requested)
    return kind_named(task_type(model or DEFAULT_MODEL))


def kind_of_task(task: TaskData | TextTask) -> TaskKind:
    for kind in KINDS:
        if isinstance(task, kind.task_type):
            return kind
    raise MetaTTError(f"no task kind trains {type(task).__name__}")
