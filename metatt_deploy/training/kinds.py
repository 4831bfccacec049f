"""The task kind of a run, chosen once: what differs between training a classifier and a causal LM.

A run is a sequence classifier (`TaskData`: a head per task, accuracy picks the best epoch) or a
causal language model (`TextTask`: no head, response-only loss, exact match of greedy answers,
ties broken by the lower perplexity). Everything that differs between the two lives on one
`TaskKind` object: the default model, the base model's kind (adapters/model_kinds.py: loader, head),
the data reader and tokenization, the collator, the metric that picks the best epoch, how a
task's split is scored, the single-task run and its summary line. The recipes and the train verb
ask the kind instead of branching on "is this causal"; `KINDS` is the dispatch list (PEFT's
`_create_new_module` style), and `kind_named`, `kind_for_model`, `kind_for_adapter` and
`kind_of_task` are the only places a kind is decided. The kind's name is the ``task_type`` that
bundles, manifests and metrics record (`inference.formats.CLASSIFICATION` / `CAUSAL_LM`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from accelerate import Accelerator
from torch import nn
from transformers import DataCollatorWithPadding

from metatt_deploy.adapters.base_model import DEFAULT_DECODER, DEFAULT_MODEL
from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.adapters.model_kinds import CAUSAL_LM_MODEL, CLASSIFIER_MODEL, ModelKind, saved_kind
from metatt_deploy.adapters.multitask import MultiTaskModel, routed
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import CAUSAL_LM, CLASSIFICATION, context_length
from metatt_deploy.training.causal import TIE_BREAK, train_causal
from metatt_deploy.training.config import DEFAULT_EVAL_BATCH_SIZE
from metatt_deploy.training.data import TaskData, load_task, tokenize_task
from metatt_deploy.training.lm_data import CausalCollator, TextTask, load_text_task, tokenize_text_task
from metatt_deploy.training.lm_eval import evaluate_generation
from metatt_deploy.training.loop import evaluate, make_loader
from metatt_deploy.training.metrics import PRIMARY_METRIC
from metatt_deploy.training.single import train as train_classifier

AUTO = "auto"


@dataclass
class TaskSpec:
    """Where one task's data come from: a ``--task`` value (NAME=SOURCE), or a single-task run's
    --dataset / --train / --validation / --test (``name`` None: named after its data)."""

    name: str | None
    dataset: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # split -> data file


@dataclass(frozen=True)
class Scoring:
    """What scoring a run's tasks needs: built once per run, handed to the kind's scorer."""

    accelerator: Accelerator
    tokenizer: Any
    collator: Callable[[Any], Any]
    batch_size: int


def with_task(collator, task: int, features):
    """A multi-task batch: the kind's collated features plus the task id every row routes to."""
    batch = collator(features)
    batch["task_ids"] = task
    return batch


def _classifier_input(split: Any, task: int, scoring: Scoring, prepare: bool) -> Any:
    """A loader over a classification split, prepared (sharded across processes) for validation."""
    loader = make_loader(split, functools.partial(with_task, scoring.collator, task), scoring.batch_size)
    return scoring.accelerator.prepare(loader) if prepare else loader


def _classifier_score(model: nn.Module, task: int, source: Any, scoring: Scoring, num_labels: int, gathered: bool) -> dict[str, Any]:
    return evaluate(model, source, scoring.accelerator if gathered else None, num_labels)


def _text_score(model: nn.Module, task: int, source: Any, scoring: Scoring, num_labels: int, gathered: bool) -> dict[str, Any]:
    """Exact match and perplexity of one task of a multi-task causal LM (its slice routed for every step)."""
    mtm = cast(MultiTaskModel, scoring.accelerator.unwrap_model(model))
    with routed(mtm.model, task):
        metrics = evaluate_generation(mtm.model, scoring.tokenizer, source, scoring.batch_size)
    mtm.train()
    return {k: metrics[k] for k in ("exact_match", "perplexity", "examples")}


def _read_classes(spec: TaskSpec, max_samples: dict[str, int] | None, seed: int, options: dict[str, Any]) -> TaskData:
    return load_task(name=spec.name, dataset=spec.dataset, max_samples=max_samples, seed=seed, **spec.files, **options)


def _read_text(spec: TaskSpec, max_samples: dict[str, int] | None, seed: int, options: dict[str, Any]) -> TextTask:
    """A builtin task as text-to-text, or prompt/response files; the column and label options are a classifier's."""
    task = load_text_task(dataset=spec.dataset, max_samples=max_samples, seed=seed, **spec.files)
    task.name = spec.name or task.name
    return task


def _classifier_summary(result: dict[str, Any]) -> str:
    best, test = result["best"], result.get("test")
    line = f"task '{result['task']}': best validation accuracy {best['accuracy']:.4f} (epoch {best['epoch']})"
    return line + (f"; test accuracy {test['accuracy']:.4f}" if test else "")


def _text_summary(result: dict[str, Any]) -> str:
    best, test = result["best"], result.get("test")
    line = f"best validation exact match {best['exact_match']:.4f} (epoch {best['epoch']})"
    return line + (f"; test exact match {test['exact_match']:.4f}, perplexity {test['perplexity']:.3f}" if test else "")


@dataclass(frozen=True)
class TaskKind:
    """What a kind of task brings to training; one instance per kind, in `KINDS`."""

    name: str
    primary_metric: str
    task_type: type  # the data class of its tasks: TaskData or TextTask
    default_model: str
    model: ModelKind  # the base model's kind: loader, head, PEFT task type (adapters/model_kinds.py)
    read: Callable[[TaskSpec, dict[str, int] | None, int, dict[str, Any]], Any]  # (spec, sample limits, seed, column options) -> task
    collator: Callable[[Any], Any]  # tokenizer -> collate function
    eval_batch_size: Callable[[int], int]  # training batch size -> evaluation batch size
    eval_input: Callable[[Any, int, Scoring, bool], Any]  # (split, task id, scoring, for validation) -> what score reads
    score_task: Callable[[nn.Module, int, Any, Scoring, int, bool], dict[str, Any]]  # (model, id, input, scoring, labels, gathered)
    train_single: Callable[..., dict]  # (TrainConfig, task, force) -> a single-task run's metrics
    summary: Callable[[dict[str, Any]], str]  # a single-task run's result -> the line a person reads

    def load_base(self, model: str, label_names: list[str]) -> nn.Module:
        return self.model.load_base(model, label_names)

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
        if not self.model.generates:  # generated answers tie often: the lower perplexity breaks ties
            return fields, mean
        fields["mean_perplexity"] = float(np.mean([m["perplexity"] for m in metrics.values()]))
        return fields, mean - TIE_BREAK * fields["mean_perplexity"]


CLASSIFIER_KIND = TaskKind(
    name=CLASSIFICATION,
    primary_metric=PRIMARY_METRIC,
    task_type=TaskData,
    default_model=DEFAULT_MODEL,
    model=CLASSIFIER_MODEL,
    read=_read_classes,
    collator=DataCollatorWithPadding,
    eval_batch_size=lambda _batch_size: DEFAULT_EVAL_BATCH_SIZE,
    eval_input=_classifier_input,
    score_task=_classifier_score,
    train_single=train_classifier,
    summary=_classifier_summary,
)
CAUSAL_LM_KIND = TaskKind(
    name=CAUSAL_LM,
    primary_metric="exact_match",
    task_type=TextTask,
    default_model=DEFAULT_DECODER,
    model=CAUSAL_LM_MODEL,
    read=_read_text,
    collator=lambda tokenizer: CausalCollator(tokenizer.pad_token_id),
    eval_batch_size=lambda batch_size: min(batch_size * 2, 64),  # generation is slower than a forward
    eval_input=lambda split, _task, _scoring, _prepare: split,  # generation reads the tokenized split itself
    score_task=_text_score,
    train_single=train_causal,
    summary=_text_summary,
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
    return kind_named(saved_kind(model or DEFAULT_MODEL).name)


def kind_for_adapter(config: MetaTTConfig, requested: str = AUTO) -> TaskKind:
    """``requested``, or with "auto" the kind of the adapter a task is added to."""
    return kind_named(config.kind.name if requested == AUTO else requested)


def kind_of_task(task: TaskData | TextTask) -> TaskKind:
    for kind in KINDS:
        if isinstance(task, kind.task_type):
            return kind
    raise MetaTTError(f"no task kind trains {type(task).__name__}")
