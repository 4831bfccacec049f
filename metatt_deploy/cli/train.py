"""`metatt-deploy train`: fine-tune a classifier or a causal LM with a MetaTT adapter (or a PEFT baseline).

Needs the ``[train]`` extra (torch, transformers, datasets, peft, accelerate); `metatt_deploy.cli`
loads this module only when ``train`` runs. The verb turns its options into one config and a list
of tasks, once, and hands them to one run: the task kind (training/kinds.py) reads the data and
runs a single task, `train_multitask` runs several (or --add-task). Options named like a config
field go into it by that name, so no option is listed twice.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, cast

import torch
import typer

from metatt_deploy.adapters.base_model import DEFAULT_MODEL
from metatt_deploy.adapters.config import DEFAULT_ALPHA, MetaTTConfig
from metatt_deploy.adapters.targets import DEFAULT_TARGETS
from metatt_deploy.cli.base import CONTEXT_SETTINGS, Force, split_list, user_errors, verb_app
from metatt_deploy.cli.stack import quiet_libraries
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import check_separate
from metatt_deploy.common.threads import resolve_threads
from metatt_deploy.training.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_MAX_LENGTH,
    DEFAULT_RANK,
    DEFAULT_SAVE_STEPS,
    MOMENTS,
    MultiTaskConfig,
    TrainConfig,
    sample_limits,
)
from metatt_deploy.training.kinds import AUTO, KIND_NAMES, TaskKind, TaskSpec, kind_for_adapter, kind_for_model
from metatt_deploy.training.multitask import parse_task_spec, train_multitask
from metatt_deploy.training.sampling import DEFAULT_SAMPLING, DEFAULT_TEMPERATURE, parse_task_weights

# ---------------------------------------------------------------- the verb's options, one alias each

OutputOption = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        help="Run directory: checkpoints, best adapter (best/), metrics.json/.md, curves.png. An unfinished run there is resumed.",
    ),
]
DatasetOption = Annotated[
    str | None,
    typer.Option(
        help="A builtin task (movie-sentiment, snli, amazon-sentiment, nyt-sentiment, tweet-sentiment) or a Hugging Face dataset name such as glue/mrpc (needs network)."
    ),
]
TrainFileOption = Annotated[Path | None, typer.Option("--train", help="Training data: a CSV, JSONL or JSON file (instead of --dataset).")]
ValidationFileOption = Annotated[
    Path | None, typer.Option("--validation", help="Validation file (evaluated every epoch; picks the best checkpoint).")
]
TestFileOption = Annotated[Path | None, typer.Option("--test", help="Test file, evaluated once with the best checkpoint.")]
TextColumnOption = Annotated[
    list[str] | None,
    typer.Option(help="Text column(s): one, or two for sentence pairs (comma-separated or repeated). Inferred when omitted."),
]
LabelColumnOption = Annotated[str, typer.Option(help="Label column.")]
LabelsOption = Annotated[list[str] | None, typer.Option(help="Label names in id order (comma-separated); default: from the data.")]
ModelOption = Annotated[str, typer.Option(help="Base model: a local folder or hub name. The default is embedded (no network).")]
MethodOption = Annotated[
    str, typer.Option(help="metatt-4d, metatt-5d, or a PEFT baseline in the same loop: lora, or vera (classifiers only).")
]
RankOption = Annotated[int, typer.Option(help="Bond rank of every TT bond (LoRA: r).")]
AlphaOption = Annotated[float, typer.Option(help="MetaTT output scale (independent of the ranks).")]
LoraAlphaOption = Annotated[float | None, typer.Option(help="LoRA alpha (scaling alpha/r); default: equal to --rank.")]
InitOption = Annotated[
    str | None, typer.Option(help="Per-core initialisation, e.g. ze-id-id-id (ze zeros, id identity, no normal std 0.2).")
]
TargetsOption = Annotated[str, typer.Option(help="Matrix types to adapt: q,k,v,o,up,down (gate for LLaMA), or name=module_suffix pairs.")]
LrOption = Annotated[
    float | None,
    typer.Option(
        help="AdamW learning rate for the adapter. Default: 3e-3 (MetaTT-4D, joint multi-task), 1e-3 (MetaTT-5D, LoRA), 5e-3 (VeRA, --add-task); MetaTT-4D and -5D take a third and a half of theirs when the targets include up, down or gate at rank >= 8."
    ),
]
HeadLrOption = Annotated[
    float | None,
    typer.Option(help="Learning rate of the classification head(s). Default: 5e-3 for MetaTT (single- and multi-task), --lr for LoRA."),
]
WeightDecayOption = Annotated[float, typer.Option(help="AdamW weight decay.")]
MaxGradNormOption = Annotated[
    float,
    typer.Option(
        help="Clip the gradients' global L2 norm to this before each step (0: no clipping, the default; transformers' Trainer uses 1.0). See docs/nli-gap.md."
    ),
]
EpochsOption = Annotated[int, typer.Option(help="Training epochs.")]
BatchSizeOption = Annotated[int, typer.Option(help="Training batch size (global: split across processes under accelerate launch).")]
MaxLengthOption = Annotated[int, typer.Option(help="Maximum tokens per example (longer inputs are truncated).")]
SeedOption = Annotated[int, typer.Option(help="Seed for initialisation and data order.")]
SaveStepsOption = Annotated[int, typer.Option(help="Checkpoint every N steps (and at each epoch end).")]
MaxStepsOption = Annotated[int | None, typer.Option(help="Stop after N optimizer steps (for quick runs).")]
MaxTrainSamplesOption = Annotated[int | None, typer.Option(help="Use a fixed random subset of N training examples.")]
MaxEvalSamplesOption = Annotated[int | None, typer.Option(help="Use a fixed random subset of N validation and test examples.")]
RankScheduleOption = Annotated[
    str | None,
    typer.Option(
        help="Rank-adaptive training: cut bond ranks by SVD sweeps at epoch starts, e.g. '10,1:8,2:6,3:4' (start rank, then epoch:rank). See docs/rank-adaptive.md."
    ),
]
MomentsOption = Annotated[str, typer.Option(help="AdamW moments after a rank cut: project (onto the kept subspace) or reset.")]
TaskSpecsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--task",
        help="Multi-task: NAME=DATASET (builtin or hub) or NAME=train.jsonl[,validation.jsonl[,test.jsonl]]; repeat for each task (2 or more). Trains MetaTT-(4+1)D (one head per task for classifiers; text-to-text tasks for causal LMs). See docs/multitask.md, docs/multitask-decoders.md.",
    ),
]
TaskSamplingOption = Annotated[
    str, typer.Option(help="Multi-task: how each batch's task is drawn: proportional (p_t ~ n_t) or temperature (p_t ~ n_t^(1/T)).")
]
TemperatureOption = Annotated[
    float, typer.Option(help="Multi-task: T of --task-sampling temperature (1 = proportional; larger flattens towards uniform).")
]
TaskWeightOption = Annotated[
    list[str] | None,
    typer.Option(
        help="Multi-task: NAME=W multiplies task NAME's loss by W (default 1; repeat or comma-separate), so a task can count more in the shared cores than its share of steps."
    ),
]
TaskNameOption = Annotated[
    str | None,
    typer.Option(
        "--task-name",
        help="Name of the task, used in the adapter, merge output, reports and bundles. Default: the --dataset name, or the --train file's name without its split suffix (bbc.train.jsonl -> bbc; data/bbc/train.jsonl -> bbc).",
    ),
]
AddTaskOption = Annotated[
    str | None,
    typer.Option(
        "--add-task",
        help="Train one NEW task (NAME=SOURCE) against the frozen adapter given by --from: only its task-core slice and head train.",
    ),
]
FromAdapterOption = Annotated[
    Path | None, typer.Option("--from", help="With --add-task: the multi-task adapter (a run's best/) to extend.")
]
ThreadsOption = Annotated[int | None, typer.Option(help="PyTorch intra-op threads (default: every available CPU; fastest measured).")]
TaskKindOption = Annotated[
    str,
    typer.Option(
        "--task-type",
        help="auto (from the model: decoders saved as language models train as causal LMs), classification, or causal-lm (text-to-text data; with the default --model, the embedded SmolLM2-135M-Instruct). See docs/decoders.md.",
    ),
]

app = verb_app()


def main_process() -> bool:
    """False in every process but the first of ``accelerate launch`` / torchrun: they print nothing."""
    return os.environ.get("RANK", "0") == "0"


@app.command(context_settings=CONTEXT_SETTINGS)
@user_errors
def train(
    output: OutputOption,
    dataset: DatasetOption = None,
    train_file: TrainFileOption = None,
    validation_file: ValidationFileOption = None,
    test_file: TestFileOption = None,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = "label",
    labels: LabelsOption = None,
    model: ModelOption = DEFAULT_MODEL,
    method: MethodOption = "metatt-4d",
    rank: RankOption = DEFAULT_RANK,
    alpha: AlphaOption = DEFAULT_ALPHA,
    lora_alpha: LoraAlphaOption = None,
    init: InitOption = None,
    targets: TargetsOption = ",".join(DEFAULT_TARGETS),
    lr: LrOption = None,
    head_lr: HeadLrOption = None,
    weight_decay: WeightDecayOption = 0.0,
    max_grad_norm: MaxGradNormOption = DEFAULT_MAX_GRAD_NORM,
    epochs: EpochsOption = DEFAULT_EPOCHS,
    batch_size: BatchSizeOption = DEFAULT_BATCH_SIZE,
    max_length: MaxLengthOption = DEFAULT_MAX_LENGTH,
    seed: SeedOption = 0,
    save_steps: SaveStepsOption = DEFAULT_SAVE_STEPS,
    max_steps: MaxStepsOption = None,
    max_train_samples: MaxTrainSamplesOption = None,
    max_eval_samples: MaxEvalSamplesOption = None,
    rank_schedule: RankScheduleOption = None,
    moments: MomentsOption = MOMENTS[0],
    task_specs: TaskSpecsOption = None,
    task_sampling: TaskSamplingOption = DEFAULT_SAMPLING,
    temperature: TemperatureOption = DEFAULT_TEMPERATURE,
    task_weight: TaskWeightOption = None,
    task_name: TaskNameOption = None,
    add_task: AddTaskOption = None,
    from_adapter: FromAdapterOption = None,
    threads: ThreadsOption = None,
    task_kind: TaskKindOption = AUTO,
    force: Force = False,
) -> None:
    """Fine-tune a sequence classifier or a causal language model with a MetaTT adapter (or a PEFT LoRA baseline).

    With --task (repeated), train several tasks jointly; with --add-task and --from, add a task to a trained multi-task adapter.
    """
    options = dict(locals())  # every option once, by name: those named like a config field go into the config as given
    quiet_libraries()
    torch.set_num_threads(resolve_threads(threads))
    files = {k: str(v) for k, v in (("train", train_file), ("validation", validation_file), ("test", test_file)) if v}
    sources = task_sources(task_specs or [], add_task, from_adapter, TaskSpec(task_name, dataset, files), bool(task_weight))
    spec_files = [f for s in sources for f in s.files.values()]
    check_separate(output, [train_file, validation_file, test_file, from_adapter, model, *spec_files], what="--output")
    if task_kind not in KIND_NAMES:  # before anything loads
        raise MetaTTError(f"unknown --task-type '{task_kind}'; use {', '.join(KIND_NAMES)}")
    kind, model = choose_kind(model, task_kind, from_adapter)
    if labels and (len(sources) > 1 or not kind.model.has_head):
        raise MetaTTError("--labels names one classification task's labels; with several --task, or text-to-text tasks, drop it")
    multi = bool(task_specs or add_task)
    cfg = run_config(MultiTaskConfig if multi else TrainConfig, options, kind, model)
    cfg.check()  # before any data loads
    columns = {"text_columns": split_list(text_column), "label_column": label_column, "label_names": split_list(labels)}
    tasks = [kind.read(s, sample_limits(max_train_samples, max_eval_samples), seed, columns) for s in sources]
    result = train_multitask(cast(MultiTaskConfig, cfg), tasks, force=force) if multi else kind.train_single(cfg, tasks[0], force=force)
    if main_process():
        typer.echo(multitask_summary(result) if multi else kind.summary(result))
        typer.echo(f"adapter: {output / 'best'}; report: {output / 'metrics.md'}")


def task_sources(specs: list[str], add_task: str | None, from_adapter: Path | None, single: TaskSpec, weighted: bool) -> list[TaskSpec]:
    """Where the run's tasks come from: the --task values (or the one --add-task), else the single-task options."""
    if not (specs or add_task or from_adapter):
        if weighted:
            raise MetaTTError("--task-weight balances the tasks of a multi-task run; give two or more --task NAME=SOURCE, or drop it")
        return [single]
    if single.dataset or single.files or single.name:
        raise MetaTTError(
            "--task/--add-task name their own tasks and data (NAME=SOURCE); drop --dataset/--train/--validation/--test/--task-name"
        )
    if add_task and specs:
        raise MetaTTError("--add-task trains one new task against a frozen adapter; drop --task")
    if add_task and not from_adapter:
        raise MetaTTError("--add-task needs --from ADAPTER (the multi-task adapter to extend, a run's best/)")
    if from_adapter and not add_task:
        raise MetaTTError("--from is used with --add-task only; add --add-task NAME=SOURCE")
    parsed = [parse_task_spec(s) for s in (specs or [str(add_task)])]
    names = [p.name for p in parsed]
    if len(set(names)) != len(names):
        raise MetaTTError(f"task names repeat ({', '.join(map(str, names))}); give each --task a distinct NAME")
    return parsed


def choose_kind(model: str, requested: str, from_adapter: Path | None) -> tuple[TaskKind, str]:
    """The run's task kind and base model. --add-task extends the --from adapter: by default on its
    base model and of its kind; otherwise "auto" reads the kind from the model, and a causal-LM run
    on the default model takes the embedded decoder."""
    if from_adapter is None:
        kind = kind_for_model(model, requested)
        return kind, kind.model_or_default(model)
    extended = MetaTTConfig.load(from_adapter)
    if not extended.multitask:
        raise MetaTTError(f"{from_adapter} is a single-task adapter; --add-task extends one trained with several --task")
    kind = kind_for_adapter(extended, requested)
    return kind, kind.model_or_default(extended.base_model if model == DEFAULT_MODEL else model)


def run_config(cls: type[TrainConfig], options: dict[str, Any], kind: TaskKind, model: str) -> TrainConfig:
    """The run's config: the options named like one of its fields as given, the rest resolved here."""
    names = {f.name for f in fields(cls)}
    resolved: dict[str, Any] = {
        "output": str(options["output"]),
        "model": model,
        "targets": split_list([options["targets"]]) or list(DEFAULT_TARGETS),
        "eval_batch_size": kind.eval_batch_size(options["batch_size"]),
    }
    if cls is MultiTaskConfig:
        resolved["tasks"] = list(options["task_specs"] or [options["add_task"]])
        resolved["task_weights"] = parse_task_weights(options["task_weight"] or [])
        resolved["add_task_from"] = str(options["from_adapter"]) if options["from_adapter"] else None
    return cls(**{**{k: v for k, v in options.items() if k in names}, **resolved})


def multitask_summary(result: dict) -> str:
    """The lines a person reads after a multi-task run: the best epoch per task and the test scores."""
    best, primary = result["best"], result["primary_metric"]
    label = primary.replace("_", " ")
    lines = [
        f"best mean validation {label} {best['mean_' + primary]:.4f} (epoch {best['epoch']}): "
        + ", ".join(f"{n} {m[primary]:.4f}" for n, m in best["tasks"].items())
    ]
    if result.get("test"):
        lines.append(f"test {label}: " + ", ".join(f"{n} {m[primary]:.4f}" for n, m in result["test"].items()))
    return "\n".join(lines)
