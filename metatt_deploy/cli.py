"""The `metatt-deploy` command line: train, merge, export, validate (and predict).

Each command is a thin layer over a module function; user errors (MetaTTError) print one line
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from metatt_deploy import __version__
from metatt_deploy.adapters.base_model import DEFAULT_DECODER, DEFAULT_MODEL, TASK_TYPES, task_type
from metatt_deploy.adapters.config import DEFAULT_ALPHA
from metatt_deploy.adapters.targets import DEFAULT_TARGETS
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_text, check_separate, check_writable, read_json
from metatt_deploy.common.report import close_progress_bars
from metatt_deploy.common.threads import resolve_threads
from metatt_deploy.export.genai import GENAI_CONFIG, export_genai
from metatt_deploy.export.int4 import INT4_ACCURACY_LEVEL, INT4_BLOCK_SIZE, INT4_EDGE_LAYERS, INT4_HEAD_BITS, Int4Options
from metatt_deploy.export.merge import merge_adapter, merge_factored
from metatt_deploy.export.onnx import MANIFEST_NAME, export_onnx, read_manifest
from metatt_deploy.export.peft import to_peft
from metatt_deploy.export.quality import MAX_PPL_INCREASE, QualityGate, quality_summary
from metatt_deploy.export.quantize import CALIBRATION_ROWS
from metatt_deploy.export.validate import report_paths
from metatt_deploy.export.validate import validate as run_validation
from metatt_deploy.export.validate_lm import validate_decoder
from metatt_deploy.export.web import vendor_web_runtime
from metatt_deploy.serving.genai import GenAIGenerator
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.http import ServeSettings
from metatt_deploy.serving.ray_app import run as run_ray
from metatt_deploy.serving.runtime import Runtime, read_inputs
from metatt_deploy.serving.server import ADMIN_TOKEN_ENV, ServeConfig
from metatt_deploy.serving.server import serve as run_server
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
from metatt_deploy.training.lm_data import load_text_task
from metatt_deploy.training.multitask import train_from_cli
from metatt_deploy.training.sampling import DEFAULT_SAMPLING, DEFAULT_TEMPERATURE, parse_task_weights
from metatt_deploy.training.single import train as run_training

# Help is click's plain formatter, wrapped to the terminal (or HELP_WIDTH columns when stdout is
# not a terminal): it wraps long option names, defaults and syntax instead of cutting them with
# an ellipsis as rich's tables do in narrow columns, so --help is complete in any terminal or pipe.
HELP_WIDTH = 120
RUNTIMES = ("onnxruntime", "genai")  # generate --runtime

app = typer.Typer(
    name="metatt-deploy",
    help="Fine-tune transformers with MetaTT tensor-train adapters, merge them, export them to ONNX and validate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": HELP_WIDTH, "terminal_width": None if sys.stdout.isatty() else HELP_WIDTH},
)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    if not sys.stderr.isatty():  # off a terminal, progress bars redraw as glued fragments; ours print whole lines
        datasets.disable_progress_bars()


def user_errors(fn):
    """Turn MetaTTError into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except MetaTTError as e:
            close_progress_bars()
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"metatt-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Fine-tune transformers with MetaTT tensor-train adapters, merge them, export them to ONNX and validate them."""


def _main_process() -> bool:
    """False in every process but the first of ``accelerate launch`` / torchrun: they print nothing."""
    return os.environ.get("RANK", "0") == "0"


Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


def _split(values: list[str] | None) -> list[str] | None:
    """Accept both repeated options and comma-separated lists."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@app.command()
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
    import torch

    torch.set_num_threads(resolve_threads(threads))
    spec_files = [f for spec in [*(task_specs or []), add_task or ""] for f in spec.partition("=")[2].split(",") if f.strip()]
    check_separate(output, [train_file, validation_file, test_file, from_adapter, model, *spec_files], what="--output")
    if task_kind not in ("auto", *TASK_TYPES):
        raise MetaTTError(f"unknown --task-type '{task_kind}'; use auto, {', '.join(TASK_TYPES)}")
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
            text_columns=_split(text_column),
            label_column=label_column,
            label_names=_split(labels),
            model=model,
            method=method,
            rank=rank,
            alpha=alpha,
            init=init,
            targets=_split([targets]),
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
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            rank_schedule=rank_schedule,
            task_sampling=task_sampling,
            temperature=temperature,
            task_weights=parse_task_weights(task_weight or []),
            task_kind=task_kind,
            force=force,
        )
        if not _main_process():
            return
        best, primary = result["best"], result["primary_metric"]
        label = primary.replace("_", " ")
        typer.echo(
            f"best mean validation {label} {best['mean_' + primary]:.4f} (epoch {best['epoch']}): "
            + ", ".join(f"{n} {m[primary]:.4f}" for n, m in best["tasks"].items())
        )
        if result.get("test"):
            typer.echo(f"test {label}: " + ", ".join(f"{n} {m[primary]:.4f}" for n, m in result["test"].items()))
        typer.echo(f"adapter: {output / 'best'}; report: {output / 'metrics.md'}")
        return

    if task_weight:
        raise MetaTTError("--task-weight balances the tasks of a multi-task run; give two or more --task NAME=SOURCE, or drop it")
    limits = {k: v for k, v in (("train", max_train_samples), ("validation", max_eval_samples), ("test", max_eval_samples)) if v}
    if task_kind == "causal-lm" and model == DEFAULT_MODEL:
        model = DEFAULT_DECODER  # the embedded encoder cannot generate: use the embedded decoder
    cfg = TrainConfig(
        output=str(output),
        model=model,
        method=method,
        rank=rank,
        alpha=alpha,
        lora_alpha=lora_alpha,
        init=init,
        targets=_split([targets]) or list(DEFAULT_TARGETS),
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
        moments=moments,
    )
    if (task_kind if task_kind != "auto" else task_type(model)) == "causal-lm":
        text_task = load_text_task(
            dataset=dataset,
            train=str(train_file) if train_file else None,
            validation=str(validation_file) if validation_file else None,
            test=str(test_file) if test_file else None,
            max_samples=limits or None,
            seed=seed,
        )
        cfg = replace(cfg, eval_batch_size=min(batch_size * 2, 64))  # generation is slower than a forward
        result = train_causal(cfg, text_task, force=force)
        if not _main_process():
            return
        best, test = result["best"], result.get("test")
        typer.echo(
            f"best validation exact match {best['exact_match']:.4f} (epoch {best['epoch']})"
            + (f"; test exact match {test['exact_match']:.4f}, perplexity {test['perplexity']:.3f}" if test else "")
        )
        typer.echo(f"adapter: {output / 'best'}; report: {output / 'metrics.md'}")
        return
    task = load_task(
        name=task_name,
        dataset=dataset,
        train=str(train_file) if train_file else None,
        validation=str(validation_file) if validation_file else None,
        test=str(test_file) if test_file else None,
        text_columns=_split(text_column),
        label_column=label_column,
        label_names=_split(labels),
        max_samples=limits or None,
        seed=seed,
    )
    result = run_training(cfg, task, force=force)
    if not _main_process():
        return
    best, test = result["best"], result.get("test")
    typer.echo(
        f"task '{task.name}': best validation accuracy {best['accuracy']:.4f} (epoch {best['epoch']})"
        + (f"; test accuracy {test['accuracy']:.4f}" if test else "")
    )
    typer.echo(f"adapter: {output / 'best'}; report: {output / 'metrics.md'}")


@app.command()
@user_errors
def merge(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (a run's best/ folder).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder for the merged Hugging Face model.")],
    task: Annotated[str | None, typer.Option(help="Task to merge (multi-task adapters).")] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base model folder or hub name, if it moved since training (checked by fingerprint).")
    ] = None,
    max_rank: Annotated[
        int | None, typer.Option(help="Round the tensor train to this bond rank first and report the error it introduced.")
    ] = None,
    to: Annotated[
        str, typer.Option("--to", help="hf: a merged Hugging Face model; peft: a lossless PEFT LoRA adapter (no base model needed).")
    ] = "hf",
    factored: Annotated[
        bool,
        typer.Option(
            "--factored",
            help="Multi-task adapters: write a factored bundle (base once, shared cores once, a small file per task, factored ONNX graphs) instead of a dense model. With --task A,B and an existing bundle as --output, add those tasks to it.",
        ),
    ] = False,
    onnx: Annotated[
        bool, typer.Option("--onnx/--no-onnx", help="With --factored: also export the factored ONNX graphs and .onnx_adapter files.")
    ] = True,
    force: Force = False,
) -> None:
    """Fold alpha * dW into the base weights and write a standard Hugging Face model folder.

    With --to peft, write the exactly equivalent PEFT LoRA adapter instead (docs/adapter-format.md).
    With --factored, write a factored multi-task bundle (docs/multitask.md).
    """
    if factored:
        if to != "hf" or max_rank is not None:
            raise MetaTTError("--factored writes its own bundle format; drop --to and --max-rank")

        summary = merge_factored(adapter, output, tasks=_split([task]) if task else None, onnx=onnx, base_model=base_model, force=force)
        verb = "added task(s)" if summary["added"] else "wrote factored bundle with task(s)"
        typer.echo(f"{verb} {', '.join(summary['tasks'])} -> {output} (bundle id {summary['bundle_id'][:12]})")
        return
    if to == "peft":
        if max_rank is not None:
            raise MetaTTError("--max-rank applies to --to hf only; round the adapter first, or drop --max-rank")

        to_peft(adapter, output, task=task, force=force)
        typer.echo(f"wrote PEFT LoRA adapter {output} (load it with peft.PeftModel.from_pretrained(base, '{output}'))")
        return
    if to != "hf":
        raise MetaTTError(f"unknown --to '{to}'; use hf or peft")

    record = merge_adapter(adapter, output, task=task, base_model=base_model, max_rank=max_rank, force=force)
    extra = f"; rounding error {record['rounding_relative_error']:.3e}" if "rounding_relative_error" in record else ""
    typer.echo(f"merged task '{record['task']}' into {output}{extra}")


@app.command()
@user_errors
def export(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="Merged model folder (metatt-deploy merge); also any Hugging Face sequence classifier folder, or an adapter folder (merged on the fly)."
        ),
    ],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Bundle folder (default: exported/<name>).")] = None,
    name: Annotated[
        str | None, typer.Option(help="Bundle name under exported/ (default: the model folder's name plus -opt, -int8 or -fp16).")
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: optimum's choice for the architecture).")] = None,
    optimize: Annotated[
        bool, typer.Option("--optimize", help="Fuse attention, layer norms, GELU and embeddings with ONNX Runtime's transformer optimizer.")
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: dynamic quantization (int8 weights of MatMul/Attention nodes, activation scales per batch); int8-static: QDQ with activation scales calibrated on --calibration data (a row's logits do not depend on its batch); int4 (decoders): weight-only 4-bit MatMulNBits, the LM head at --int4-head-bits. Logits parity is reported; a quality gate against the fp32 graph decides (see --allow-quality-loss)."
        ),
    ] = None,
    int4_accuracy_level: Annotated[
        int,
        typer.Option(
            help="With --quantize int4: MatMulNBits compute type, 4 = int8 activations quantized per block at run time (fastest on CPUs), 0 = float32 activations (see docs/decoders.md)."
        ),
    ] = INT4_ACCURACY_LEVEL,
    int4_block_size: Annotated[
        int, typer.Option(help="With --quantize int4: weights per float scale along the input (16, 32, 64, 128 or 256).")
    ] = INT4_BLOCK_SIZE,
    int4_head_bits: Annotated[
        int,
        typer.Option(
            help="With --quantize int4: bits of the LM head and the (tied) embedding: 4, 8 or 32 (float32); see docs/reports/int4.md."
        ),
    ] = INT4_HEAD_BITS,
    int4_edge_layers: Annotated[
        int,
        typer.Option(
            help="With --quantize int4: keep the projections of the first and last N decoder layers at 8 bits (4-bit edge layers broke Gemma-3 270M)."
        ),
    ] = INT4_EDGE_LAYERS,
    calibration: Annotated[
        str | None,
        typer.Option(
            help="With --quantize: calibration data, a builtin task (its validation split), a hub data set or a CSV/JSONL file: int8-static's activation ranges, and the quality gate's rows (default: the adapter's task if builtin, else built-in prompts or sample sentences)."
        ),
    ] = None,
    calibration_rows: Annotated[
        int | None,
        typer.Option(
            help=f"Calibration rows (a fixed random subset, fed one at a time; default {CALIBRATION_ROWS} for int8-static and classifiers' gate, 32 for decoders' gate)."
        ),
    ] = None,
    gate_min_agreement: Annotated[
        float | None,
        typer.Option(
            help="Quality gate: minimum agreement with the fp32 graph, greedy next tokens for decoders (default 0.9), labels for classifiers (default 0.9)."
        ),
    ] = None,
    gate_max_ppl_increase: Annotated[
        float, typer.Option(help="Quality gate, decoders: maximum relative perplexity increase over the fp32 graph (0.1 = +10%).")
    ] = MAX_PPL_INCREASE,
    allow_quality_loss: Annotated[
        bool,
        typer.Option(
            "--allow-quality-loss", help="Keep a quantized export that fails the quality gate (the numbers stay in manifest.json)."
        ),
    ] = False,
    calibration_method: Annotated[str, typer.Option(help="Activation range estimate: minmax, percentile or entropy.")] = "minmax",
    fp32_down_projections: Annotated[
        bool,
        typer.Option(
            "--fp32-down-projections/--int8-down-projections",
            help="With int8-static: keep the FFN down-projections fp32 (accuracy within 1 point on MiniLM) or quantize them too (faster, about -1.8 points; docs/int8.md).",
        ),
    ] = True,
    per_channel: Annotated[
        bool, typer.Option("--per-channel/--per-tensor", help="int8 weight scales per output channel or per tensor.")
    ] = True,
    reduce_range: Annotated[
        bool | None,
        typer.Option("--reduce-range/--full-range", help="7-bit int8 weights (default: only on CPUs without VNNI; see docs/int8.md)."),
    ] = None,
    layout: Annotated[
        str, typer.Option(help="optimum, or transformers.js: also onnx/model.onnx and onnx/model_quantized.onnx for Transformers.js.")
    ] = "optimum",
    formats: Annotated[
        list[str] | None, typer.Option("--format", help="onnx (always), ort: also .ort models + the reduced build's operator config.")
    ] = None,
    web_runtime: Annotated[
        Path | None,
        typer.Option(
            help="A node_modules folder with onnxruntime-web and @huggingface/transformers: copy the page's runtime files into web/vendor/."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="ONNX Runtime intra-op threads of the parity checks (default: every available CPU; fastest measured)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="fp32, or fp16 (for GPU execution providers; parity tolerance 1e-2 x max(1, max |logit|)).")
    ] = "fp32",
    adapter: Annotated[
        Path | None, typer.Option(help="Adapter the model was merged from, for the manifest (default: the one metatt_merge.json records).")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task to merge when MODEL_DIR is a multi-task adapter.")] = None,
    genai: Annotated[
        bool,
        typer.Option(
            "--genai",
            help="MODEL_DIR is a factored decoder bundle (merge --factored): make it an ONNX Runtime GenAI model folder (genai_config.json + tokenizer files; every tasks/NAME.onnx_adapter is a GenAI adapter), checked with onnxruntime-genai.",
        ),
    ] = False,
    force: Force = False,
) -> None:
    """Export a merged model to an ONNX bundle (model.onnx, tokenizer, manifest.json) and check its parity.

    Decoders export with a KV cache (text-generation-with-past; --quantize int8 or int4), see docs/decoders.md.
    With --genai, a factored decoder bundle becomes an ONNX Runtime GenAI model, see docs/multitask-decoders.md.
    """
    if genai:
        others: dict[str, object] = {"--output": output, "--name": name, "--quantize": quantize, "--calibration": calibration}
        others["--web-runtime"] = web_runtime
        others.update({"--adapter": adapter, "--task": task, "--format": formats, "--optimize": optimize or None})
        others.update({"--dtype": None if dtype == "fp32" else dtype, "--layout": None if layout == "optimum" else layout})
        given = [k for k, v in others.items() if v]
        if given:
            raise MetaTTError(f"--genai writes into the bundle itself and takes no {given[0]}; drop it")
        record = export_genai(model_dir, force=force)
        parity = record["parity"]
        sizes = ", ".join(f"{t} {b} B" for t, b in record["adapter_bytes"].items())
        typer.echo(
            f"wrote {GENAI_CONFIG} + tokenizer into {model_dir} (onnxruntime-genai {record['onnxruntime_genai']}; "
            f"{record['tokenizer_probes_identical']} tokenizer probes identical to transformers); adapters: {sizes}"
        )
        typer.echo(
            f"greedy parity GenAI vs PyTorch adapter: {parity['identical']}/{parity['total']} token-identical "
            f"({parity['prompts']} prompts x {parity['new_tokens']} tokens per task)"
        )
        return
    out = export_onnx(
        model_dir,
        output,
        name=name,
        opset=opset,
        optimize=optimize,
        quantize=quantize,
        dtype=dtype,
        force=force,
        adapter_dir=adapter,
        task=task,
        calibration=calibration,
        calibration_rows=calibration_rows or CALIBRATION_ROWS,
        calibration_method=calibration_method,
        fp32_down_projections=fp32_down_projections,
        per_channel=per_channel,
        reduce_range=reduce_range,
        layout=layout,
        formats=["onnx", *(f for f in _split(formats) or [] if f != "onnx")],
        threads=threads,
        int4=Int4Options(
            block_size=int4_block_size, accuracy_level=int4_accuracy_level, head_bits=int4_head_bits, edge_layers=int4_edge_layers
        ),
        gate=QualityGate(
            rows=calibration_rows, min_agreement=gate_min_agreement, max_ppl_increase=gate_max_ppl_increase, allow_loss=allow_quality_loss
        ),
    )
    if web_runtime is not None:
        vendor_web_runtime(out, web_runtime)
    manifest = read_json(out / MANIFEST_NAME, "export manifest")
    final = manifest["parity"]["final"]
    tolerance = "reported only" if final["tolerance"] is None else f"tolerance {final['tolerance']:.0e}"
    typer.echo(
        f"exported {out} (opset {manifest['opset']}, {manifest['sizes']['final_bytes'] / 2**20:.1f} MiB); "
        f"max |logit diff| vs PyTorch {final['max_abs_logit_diff']:.2e} ({tolerance})"
    )
    if "quality_gate" in manifest:
        typer.echo(quality_summary(manifest["quality_gate"]))
    if "fused_nodes" in manifest:
        fused = ", ".join(
            f"{k} {v}" for k, v in manifest["fused_nodes"].items() if isinstance(v, int) and not isinstance(v, bool) and v and k != "layers"
        )
        typer.echo(f"fused nodes: {fused}")


@app.command()
@user_errors
def validate(
    adapter: Annotated[
        Path,
        typer.Argument(help="Adapter directory (a run's best/ folder; MetaTT, multi-task MetaTT or LoRA): the unmerged PyTorch reference."),
    ],
    onnx_dir: Annotated[Path, typer.Argument(help="ONNX bundle written by metatt-deploy export (exported/NAME).")],
    data: Annotated[
        str | None,
        typer.Option(
            help="Held-out data: a builtin task (movie-sentiment, snli, ...), a hub data set, or a CSV/TSV/JSONL/JSON file (labels optional). Default: built-in sample sentences."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Split of a builtin or hub data set (files are used whole).")] = "test",
    max_examples: Annotated[
        int | None,
        typer.Option(
            help="Use a fixed random subset of N held-out examples (default: all; 50 prompts for decoders; the output and report say when a subset is used)."
        ),
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.")] = "1,8",
    seq_len: Annotated[int, typer.Option(help="Tokens per example: truncation for parity, the fixed padded length for timing.")] = 128,
    repeats: Annotated[int, typer.Option(help="Timed calls per runtime and batch size (medians and p95 are reported).")] = 30,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up calls per runtime and batch size.")] = 3,
    max_seconds: Annotated[
        float, typer.Option(help="Cap on seconds per runtime and batch size (at least 3 calls are still timed).")
    ] = 60.0,
    threads: Annotated[
        int | None,
        typer.Option(help="Intra-op threads for both PyTorch and ONNX Runtime (default: every available CPU; fastest measured)."),
    ] = None,
    reference_onnx: Annotated[
        Path | None,
        typer.Option(help="The fp32 export of the same model: report the accuracy change and speed-up of an int8/fp16 export against it."),
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base model folder or hub name, if it moved since training (checked by fingerprint).")
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="Task of a multi-task adapter (default: the one the export records, from merge/export --task).")
    ] = None,
    text_column: Annotated[
        list[str] | None, typer.Option(help="Text column(s) of the data: one, or two for sentence pairs. Inferred when omitted.")
    ] = None,
    label_column: Annotated[str, typer.Option(help="Label column of the data (absent: accuracy is not reported).")] = "label",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Folder for validation.json and validation.md (default: beside the bundle, exported/NAME.validation.json and .md).",
        ),
    ] = None,
    compare: Annotated[
        list[Path] | None, typer.Option(help="Decoders: more exports of the same model (e.g. int8, int4) measured in the same run.")
    ] = None,
    prompt_lengths: Annotated[
        str, typer.Option(help="Decoders: prompt lengths (tokens) at which time to first token is measured.")
    ] = "32,256",
    new_tokens: Annotated[int, typer.Option(help="Decoders: tokens generated to measure decode tokens/s.")] = 32,
    force: Force = False,
) -> None:
    """Compare an ONNX export with its unmerged adapter: logits parity, label agreement, accuracy, latency.

    Works for single-task MetaTT, one task of a multi-task MetaTT adapter (--task) and the PEFT LoRA baseline.
    For decoders (docs/decoders.md): teacher-forced logits, greedy tokens, exact match and perplexity on
    --data, time to first token and decode tokens/s for PyTorch (unmerged, merged) and every bundle.
    """
    if read_manifest(onnx_dir).get("pipeline_task") == "text-generation-with-past":
        try:
            lengths = [int(n) for n in _split([prompt_lengths]) or []]
        except ValueError:
            raise MetaTTError(f"--prompt-lengths '{prompt_lengths}' must be comma-separated integers, e.g. 32,256") from None
        report = validate_decoder(
            adapter,
            onnx_dir,
            data=data,
            split=split,
            max_examples=max_examples or 50,
            compare=compare or [],
            prompt_lengths=lengths,
            new_tokens=new_tokens,
            repeats=min(repeats, 10),
            threads=threads,
            base_model=base_model,
            output=output,
            force=force,
        )
        echo_decoder_report(report, output or onnx_dir)
        return
    try:
        sizes = [int(b) for b in _split([batch_sizes]) or []]
    except ValueError:
        raise MetaTTError(f"--batch-sizes '{batch_sizes}' must be comma-separated integers, e.g. 1,8") from None
    report = run_validation(
        adapter,
        onnx_dir,
        data=data,
        split=split,
        max_examples=max_examples,
        batch_sizes=sizes,
        seq_len=seq_len,
        repeats=repeats,
        warmup=warmup,
        max_seconds=max_seconds,
        threads=threads,
        reference_onnx=reference_onnx,
        base_model=base_model,
        task=task,
        text_columns=_split(text_column),
        label_column=label_column,
        output=output,
        force=force,
        log=typer.echo,
    )
    parity = report["parity"]
    tolerance = f"tolerance {parity['tolerance']:.0e}" if parity["enforced"] else "reported only"
    typer.echo(
        f"max |logit diff| ONNX vs unmerged adapter {parity['max_abs_logit_diff']:.2e} ({tolerance}); "
        f"label agreement {parity['label_agreement']:.4f}"
    )
    if report["accuracy"]:
        acc = report["accuracy"]
        line = f"accuracy: PyTorch {acc['pytorch']:.4f}, ONNX {acc['onnx']:.4f}"
        if "reference_onnx" in acc:
            line += f", reference {acc['reference_onnx']:.4f} ({acc['change_vs_reference_points']:+.2f} points)"
        typer.echo(line)
    for s in report["latency"]["speedups"]:
        extra = f", {s['onnx_vs_reference']:.2f}x vs reference" if "onnx_vs_reference" in s else ""
        typer.echo(f"batch {s['batch']}: ONNX ({s['provider']}) {s['onnx_vs_pytorch_cpu']:.2f}x vs PyTorch eager{extra}")
    typer.echo(f"report: {report_paths(onnx_dir, output)[1]}")


@app.command()
@user_errors
def predict(
    bundle: Annotated[
        Path,
        typer.Argument(
            help="Any export: a single-task ONNX export (metatt-deploy export: exported/NAME) or a factored bundle (merge --factored)."
        ),
    ],
    text: Annotated[
        list[str] | None, typer.Option("--text", help="Input text (repeatable). A sentence pair: join the two with ' ||| '.")
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help="Input file ('-': standard input). JSONL (a .jsonl/.json file, or lines starting with '{'): one object per line with 'text' (and 'text_pair') or the task's own columns (premise/hypothesis, sentence1/sentence2, ...), optional 'task' and 'id'. Otherwise one text per line. Without --text and --input, texts are read from standard input.",
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Task for every input (default: the export's only task; rows of a JSONL file may name their own 'task')."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the JSONL results here (default: standard output).")] = None,
    form: Annotated[
        str, typer.Option(help="Factored bundles: auto (task-id graph for baked tasks, adapter graph for added ones), tasks or adapter.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Rows per ONNX Runtime call.")] = 32,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per input (longer inputs are truncated); default: the bundle's, else 128 as in training.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads (default: every available CPU).")] = None,
    force: Force = False,
) -> None:
    """Predict labels with any export: one JSON line per input (task, label, label_id, score, scores)."""
    if batch_size < 1:
        raise MetaTTError("--batch-size must be at least 1")
    if max_length is not None and max_length < 2:
        raise MetaTTError("--max-length must be at least 2")
    if output is not None:
        check_separate(output, [bundle, input_file])
        check_writable(output, force, kind="file")
    stdin = None
    if not text and input_file is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise MetaTTError(
                "give inputs with --text, --input FILE, or on standard input (e.g. cat texts.txt | metatt-deploy predict ...)"
            )
        stdin = sys.stdin
    runtime = Runtime(bundle, form=form, threads=threads, max_length=max_length)
    default_task = task or (runtime.tasks[0] if len(runtime.tasks) == 1 else None)
    texts, tasks, ids = read_inputs(text, input_file, default_task, stdin=stdin)
    results = runtime.predict(texts, tasks=tasks, batch_size=batch_size)
    lines = "".join(json.dumps({**({"id": i} if i is not None else {}), **r}) + "\n" for i, r in zip(ids, results))
    if output is None:
        typer.echo(lines, nl=False)
        return

    check_writable(output, force, kind="file")
    atomic_write_text(output, lines)
    typer.echo(f"wrote {len(results)} predictions to {output}", err=True)


@app.command()
@user_errors
def serve(
    model: Annotated[
        Path,
        typer.Argument(
            help="Factored bundle (merge --factored; every task in it is served) or a single-task export (metatt-deploy export)."
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface, e.g. in a container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes, each with its own copy of the model (scale further with replicas).")] = 1,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads per worker (default: ONNX Runtime's choice).")] = None,
    max_batch: Annotated[int, typer.Option(help="Rows per model call (rows of different tasks share a call).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="The longest a row waits for others to fill its batch.")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Rows allowed to wait; beyond that requests get 429 with Retry-After.")] = 1024,
    max_texts: Annotated[int, typer.Option(help="Texts per request (413 beyond).")] = 64,
    max_chars: Annotated[int, typer.Option(help="Characters per text (413 beyond).")] = 4096,
    batch_across_tasks: Annotated[
        bool,
        typer.Option("--batch-across-tasks/--batch-per-task", help="Batch rows of different tasks together, or one task per model call."),
    ] = True,
    admin_token: Annotated[
        str | None,
        typer.Option(envvar=ADMIN_TOKEN_ENV, help="Bearer token for /admin (add/remove tasks while running); without it /admin is off."),
    ] = None,
    graceful_seconds: Annotated[int, typer.Option(help="On SIGTERM, how long to wait for open requests before closing.")] = 30,
    form: Annotated[str, typer.Option(help="auto, tasks or adapter (which factored graph serves the tasks; see predict).")] = "auto",
    ray_replicas: Annotated[
        int,
        typer.Option(
            help="Serve with Ray Serve instead of uvicorn: this many replicas, Ray's batching (needs the 'ray' extra; RAY_ADDRESS joins a cluster)."
        ),
    ] = 0,
) -> None:
    """Serve a model over HTTP: classify texts for any task, batching concurrent requests across tasks (docs/serving.md)."""
    settings = ServeSettings(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_texts=max_texts,
        max_chars=max_chars,
        cross_task=batch_across_tasks,
        admin_token=admin_token,
    )
    if ray_replicas:
        run_ray(str(model), replicas=ray_replicas, host=host, port=port, settings=settings, threads=threads, form=form)
        return
    config = ServeConfig(model=str(model), settings=settings, threads=threads, form=form)
    run_server(config, host=host, port=port, workers=workers, graceful_s=graceful_seconds)


@app.command()
@user_errors
def generate(
    bundle: Annotated[
        Path,
        typer.Argument(
            help="Decoder bundle written by metatt-deploy export (a causal LM with a KV cache), or a factored bundle of a multi-task causal LM (merge --factored; pick the task with --task)."
        ),
    ],
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts; none (or '-'): one prompt per line of standard input.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens (EOS stops earlier).")] = 128,
    raw: Annotated[bool, typer.Option("--raw", help="Feed prompts as they are, without the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="A system message for the chat template.")] = None,
    temperature: Annotated[float, typer.Option(help="0: greedy (the default); above 0: sampling at this temperature.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads.")] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Factored bundle: the task (name or index) every prompt is answered with. See docs/multitask-decoders.md."),
    ] = None,
    form: Annotated[
        str,
        typer.Option(
            help="Factored bundle: adapter (model_adapter.onnx + the task's .onnx_adapter) or tasks (model_tasks.onnx, task ids)."
        ),
    ] = "adapter",
    runtime: Annotated[
        str,
        typer.Option(
            help="onnxruntime (optimum's generate loop), or genai: ONNX Runtime GenAI on a factored bundle made ready with export --genai."
        ),
    ] = "onnxruntime",
) -> None:
    """Generate answers from an exported decoder on ONNX Runtime (or ONNX Runtime GenAI), streaming tokens as they come."""
    import sys

    if not prompts or prompts == ["-"]:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not prompts:
            raise MetaTTError("no prompts: pass them as arguments or one per line on standard input")
    if runtime not in RUNTIMES:
        raise MetaTTError(f"unknown --runtime '{runtime}'; use {' or '.join(RUNTIMES)}")
    if runtime == "genai" and form != "adapter":
        raise MetaTTError("--runtime genai serves model_adapter.onnx (one task per call); drop --form")
    generator = Generator(bundle, threads=threads, form=form) if runtime == "onnxruntime" else GenAIGenerator(bundle, threads=threads)
    if task is not None:
        generator.use(int(task) if task.isdigit() else task)
    for prompt in prompts:
        for piece in generator.stream(prompt, max_new_tokens=max_new_tokens, raw=raw, system=system, temperature=temperature, seed=seed):
            typer.echo(piece, nl=False)
            sys.stdout.flush()
        typer.echo("")


def echo_decoder_report(report: dict, folder: Path) -> None:
    """The lines a person reads after validating a decoder: parity, exact match, tokens/s."""
    p, q = report["parity"], report["quality"]
    tol = f"tolerance {p['tolerance']:.2g}" if p["enforced"] else "reported only"
    typer.echo(
        f"max |logit diff| ONNX vs unmerged adapter {p['max_abs_logit_diff']:.2e} ({tol}) on {p['prompts']} prompts; "
        f"greedy tokens identical on {p['greedy_identical']:.0%}"
    )
    line = f"exact match: PyTorch {q['pytorch']['exact_match']:.4f} (perplexity {q['pytorch']['perplexity']:.3f})"
    for name, b in q["bundles"].items():
        line += f", ONNX {name} {b['exact_match']:.4f} ({b['perplexity']:.3f})"
    typer.echo(line)
    for r in report["latency"]["rows"]:
        ttft = ", ".join(f"{k[5:-3]} tokens {v:.0f} ms" for k, v in r.items() if k.startswith("ttft_"))
        typer.echo(
            f"{r['runtime']}: {r['decode_tokens_per_s']:.1f} tokens/s ({r['decode_vs_pytorch_merged']:.2f}x PyTorch merged); first token: {ttft}"
        )
    typer.echo(f"report: {folder / 'validation.md'}")
