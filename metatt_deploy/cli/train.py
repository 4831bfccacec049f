"""`metatt-deploy train`: fine-tune a classifier or a causal LM with a MetaTT adapter (or a PEFT baseline).

Needs the ``[train]`` extra (torch, transformers, datasets, peft, accelerate); `metatt_deploy.cli`
loads this module only when ``train`` runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from metatt_deploy.adapters.base_model import DEFAULT_MODEL
from metatt_deploy.adapters.config import DEFAULT_ALPHA
from metatt_deploy.adapters.targets import DEFAULT_TARGETS
from metatt_deploy.cli.base import CONTEXT_SETTINGS, Force, split_list, user_errors, verb_app
from metatt_deploy.cli.stack import quiet_libraries
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import check_separate
from metatt_deploy.common.threads import resolve_threads
from metatt_deploy.training.causal import train_causal
from metatt_deploy.training.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_MAX_LENGTH,
    DEFAULT_RANK,
    DEFAULT_SAVE_STEPS,
    MOMENTS,
    TrainConfig,
)
from metatt_deploy.training.data import load_task
from metatt_deploy.training.kinds import KIND_NAMES, kind_for_model
from metatt_deploy.training.lm_data import load_text_task
from metatt_deploy.training.multitask import train_from_cli
from metatt_deploy.training.sampling import DEFAULT_SAMPLING, DEFAULT_TEMPERATURE, parse_task_weights
from metatt_deploy.training.single import train as run_training

app = verb_app()


def main_process() -> bool:
    """False in every process but the first of ``accelerate launch`` / torchrun: they print nothing."""
    return os.environ.get("RANK", "0") == "0"


@app.command(context_settings=CONTEXT_SETTINGS)
@user_errors
def train(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Run directory: checkpoints, best adapter (best/), metrics.json/.md, curves.png. An unfinished run there is resumed.",
        ),
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            help="A builtin task (movie-sentiment, snli, amazon-sentiment, nyt-sentiment, tweet-sentiment) or a Hugging Face dataset name such as glue/mrpc (needs network)."
        ),
    ] = None,
    train_file: Annotated[
        Path | None, typer.Option("--train", help="Training data: a CSV, JSONL or JSON file (instead of --dataset).")
    ] = None,
    validation_file: Annotated[
        Path | None, typer.Option("--validation", help="Validation file (evaluated every epoch; picks the best checkpoint).")
    ] = None,
    test_file: Annotated[Path | None, typer.Option("--test", help="Test file, evaluated once with the best checkpoint.")] = None,
    text_column: Annotated[
        list[str] | None,
        typer.Option(help="Text column(s): one, or two for sentence pairs (comma-separated or repeated). Inferred when omitted."),
    ] = None,
    label_column: Annotated[str, typer.Option(help="Label column.")] = "label",
    labels: Annotated[list[str] | None, typer.Option(help="Label names in id order (comma-separated); default: from the data.")] = None,
    model: Annotated[
        str, typer.Option(help="Base model: a local folder or hub name. The default is embedded (no network).")
    ] = DEFAULT_MODEL,
    method: Annotated[
        str, typer.Option(help="metatt-4d, metatt-5d, or a PEFT baseline in the same loop: lora, or vera (classifiers only).")
    ] = "metatt-4d",
    rank: Annotated[int, typer.Option(help="Bond rank of every TT bond (LoRA: r).")] = DEFAULT_RANK,
    alpha: Annotated[float, typer.Option(help="MetaTT output scale (independent of the ranks).")] = DEFAULT_ALPHA,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (scaling alpha/r); default: equal to --rank.")] = None,
    init: Annotated[
        str | None, typer.Option(help="Per-core initialisation, e.g. ze-id-id-id (ze zeros, id identity, no normal std 0.2).")
    ] = None,
    targets: Annotated[
        str, typer.Option(help="Matrix types to adapt: q,k,v,o,up,down (gate for LLaMA), or name=module_suffix pairs.")
    ] = ",".join(DEFAULT_TARGETS),
    lr: Annotated[
        float | None,
        typer.Option(
            help="AdamW learning rate for the adapter. Default: 3e-3 (MetaTT-4D, joint multi-task), 1e-3 (MetaTT-5D, LoRA), 5e-3 (VeRA, --add-task); MetaTT-4D and -5D take a third and a half of theirs when the targets include up, down or gate at rank >= 8."
        ),
    ] = None,
    head_lr: Annotated[
        float | None,
        typer.Option(help="Learning rate of the classification head(s). Default: 5e-3 for MetaTT (single- and multi-task), --lr for LoRA."),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    max_grad_norm: Annotated[
        float,
        typer.Option(
            help="Clip the gradients' global L2 norm to this before each step (0: no clipping, the default; transformers' Trainer uses 1.0). See docs/nli-gap.md."
        ),
    ] = DEFAULT_MAX_GRAD_NORM,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = DEFAULT_EPOCHS,
    batch_size: Annotated[
        int, typer.Option(help="Training batch size (global: split across processes under accelerate launch).")
    ] = DEFAULT_BATCH_SIZE,
    max_length: Annotated[int, typer.Option(help="Maximum tokens per example (longer inputs are truncated).")] = DEFAULT_MAX_LENGTH,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = 0,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (and at each epoch end).")] = DEFAULT_SAVE_STEPS,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps (for quick runs).")] = None,
    max_train_samples: Annotated[int | None, typer.Option(help="Use a fixed random subset of N training examples.")] = None,
    max_eval_samples: Annotated[int | None, typer.Option(help="Use a fixed random subset of N validation and test examples.")] = None,
    rank_schedule: Annotated[
        str | None,
        typer.Option(
            help="Rank-adaptive training: cut bond ranks by SVD sweeps at epoch starts, e.g. '10,1:8,2:6,3:4' (start rank, then epoch:rank). See docs/rank-adaptive.md."
        ),
    ] = None,
    moments: Annotated[str, typer.Option(help="AdamW moments after a rank cut: project (onto the kept subspace) or reset.")] = MOMENTS[0],
    task_specs: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            help="Multi-task: NAME=DATASET (builtin or hub) or NAME=train.jsonl[,validation.jsonl[,test.jsonl]]; repeat for each task (2 or more). Trains MetaTT-(4+1)D (one head per task for classifiers; text-to-text tasks for causal LMs). See docs/multitask.md, docs/multitask-decoders.md.",
        ),
    ] = None,
    task_sampling: Annotated[
        str, typer.Option(help="Multi-task: how each batch's task is drawn: proportional (p_t ~ n_t) or temperature (p_t ~ n_t^(1/T)).")
    ] = DEFAULT_SAMPLING,
    temperature: Annotated[
        float, typer.Option(help="Multi-task: T of --task-sampling temperature (1 = proportional; larger flattens towards uniform).")
    ] = DEFAULT_TEMPERATURE,
    task_weight: Annotated[
        list[str] | None,
        typer.Option(
            help="Multi-task: NAME=W multiplies task NAME's loss by W (default 1; repeat or comma-separate), so a task can count more in the shared cores than its share of steps."
        ),
    ] = None,
    task_name: Annotated[
        str | None,
        typer.Option(
            "--task-name",
            help="Name of the task, used in the adapter, merge output, reports and bundles. Default: the --dataset name, or the --train file's name without its split suffix (bbc.train.jsonl -> bbc; data/bbc/train.jsonl -> bbc).",
        ),
    ] = None,
    add_task: Annotated[
        str | None,
        typer.Option(
            "--add-task",
            help="Train one NEW task (NAME=SOURCE) against the frozen adapter given by --from: only its task-core slice and head train.",
        ),
    ] = None,
    from_adapter: Annotated[
        Path | None, typer.Option("--from", help="With --add-task: the multi-task adapter (a run's best/) to extend.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="PyTorch intra-op threads (default: every available CPU; fastest measured).")] = None,
    task_kind: Annotated[
        str,
        typer.Option(
            "--task-type",
            help="auto (from the model: decoders saved as language models train as causal LMs), classification, or causal-lm (text-to-text data; with the default --model, the embedded SmolLM2-135M-Instruct). See docs/decoders.md.",
        ),
    ] = "auto",
    force: Force = False,
) -> None:
    """Fine-tune a sequence classifier or a causal language model with a MetaTT adapter (or a PEFT LoRA baseline).

    With --task (repeated), train several tasks jointly; with --add-task and --from, add a task to a trained multi-task adapter.
    """
    quiet_libraries()
    torch.set_num_threads(resolve_threads(threads))
    spec_files = [f for spec in [*(task_specs or []), add_task or ""] for f in spec.partition("=")[2].split(",") if f.strip()]
    check_separate(output, [train_file, validation_file, test_file, from_adapter, model, *spec_files], what="--output")
    if task_kind not in KIND_NAMES:  # before anything loads
        raise MetaTTError(f"unknown --task-type '{task_kind}'; use {', '.join(KIND_NAMES)}")
    shared: dict[str, Any] = dict(
        method=method,
        rank=rank,
        alpha=alpha,
        init=init,
        targets=split_list([targets]) or list(DEFAULT_TARGETS),
        lr=lr,
        head_lr=head_lr,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        save_steps=save_steps,
        max_steps=max_steps,
        rank_schedule=rank_schedule,
    )
    if task_specs or add_task or from_adapter:
        if dataset or train_file or validation_file or test_file or task_name:
            raise MetaTTError(
                "--task/--add-task name their own tasks and data (NAME=SOURCE); drop --dataset/--train/--validation/--test/--task-name"
            )
        result = train_from_cli(
            output=str(output),
            specs=task_specs or [],
            add_task=add_task,
            from_adapter=str(from_adapter) if from_adapter else None,
            text_columns=split_list(text_column),
            label_column=label_column,
            label_names=split_list(labels),
            model=model,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            task_sampling=task_sampling,
            temperature=temperature,
            task_weights=parse_task_weights(task_weight or []),
            task_kind=task_kind,
            force=force,
            **shared,
        )
        if main_process():
            echo_multitask(result, output)
        return
    if task_weight:
        raise MetaTTError("--task-weight balances the tasks of a multi-task run; give two or more --task NAME=SOURCE, or drop it")
    kind = kind_for_model(model, task_kind)
    model = kind.model_or_default(model)
    cfg = TrainConfig(
        output=str(output), model=model, lora_alpha=lora_alpha, moments=moments, eval_batch_size=kind.eval_batch_size(batch_size), **shared
    )
    files = {k: str(v) if v else None for k, v in (("train", train_file), ("validation", validation_file), ("test", test_file))}
    limits = {k: v for k, v in (("train", max_train_samples), ("validation", max_eval_samples), ("test", max_eval_samples)) if v}
    if kind.causal:
        result = train_causal(cfg, load_text_task(dataset=dataset, max_samples=limits or None, seed=seed, **files), force=force)
        best, test = result["best"], result.get("test")
        summary = f"best validation exact match {best['exact_match']:.4f} (epoch {best['epoch']})" + (
            f"; test exact match {test['exact_match']:.4f}, perplexity {test['perplexity']:.3f}" if test else ""
        )
    else:
        options = {"text_columns": split_list(text_column), "label_column": label_column, "label_names": split_list(labels)}
        task = load_task(name=task_name, dataset=dataset, max_samples=limits or None, seed=seed, **files, **options)
        result = run_training(cfg, task, force=force)
        best, test = result["best"], result.get("test")
        summary = f"task '{task.name}': best validation accuracy {best['accuracy']:.4f} (epoch {best['epoch']})" + (
            f"; test accuracy {test['accuracy']:.4f}" if test else ""
        )
    if main_process():
        typer.echo(summary)
        typer.echo(f"adapter: {output / 'best'}; report: {output / 'metrics.md'}")


def echo_multitask(result: dict, output: Path) -> None:
    """The lines a person reads after a multi-task run: the best epoch per task, the test scores, where the files are."""
    best, primary = result["best"], result["primary_metric"]
    label = primary.replace("_", " ")
    typer.echo(
        f"best mean validation {label} {best['mean_' + primary]:.4f} (epoch {best['epoch']}): "
        + ", ".join(f"{n} {m[primary]:.4f}" for n, m in best["tasks"].items())
    )
    if result.get("test"):
        typer.echo(f"test {label}: " + ", ".join(f"{n} {m[primary]:.4f}" for n, m in result["test"].items()))
    typer.echo(f"adapter: {output / 'best'}; report: {output / 'metrics.md'}")
