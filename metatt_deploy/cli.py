"""The `metatt-deploy` command line: train, merge, export, validate (and predict).

Each command is a thin layer over a module function; user errors (MetaTTError) print one line
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import MetaTTError

app = typer.Typer(
    name="metatt-deploy",
    help="Fine-tune transformers with MetaTT tensor-train adapters, merge them, export them to ONNX and validate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()


def user_errors(fn):
    """Turn MetaTTError into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except MetaTTError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


def _split(values: Optional[list[str]]) -> Optional[list[str]]:
    """Accept both repeated options and comma-separated lists."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@app.command()
@user_errors
def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory: checkpoints, best adapter (best/), metrics.json/.md, curves.png. An unfinished run there is resumed.")],
    dataset: Annotated[Optional[str], typer.Option(help="A builtin task (movie-sentiment, snli, amazon-sentiment, nyt-sentiment, tweet-sentiment) or a Hugging Face dataset name such as glue/mrpc (needs network).")] = None,
    train_file: Annotated[Optional[Path], typer.Option("--train", help="Training data: a CSV, JSONL or JSON file (instead of --dataset).")] = None,
    validation_file: Annotated[Optional[Path], typer.Option("--validation", help="Validation file (evaluated every epoch; picks the best checkpoint).")] = None,
    test_file: Annotated[Optional[Path], typer.Option("--test", help="Test file, evaluated once with the best checkpoint.")] = None,
    text_column: Annotated[Optional[list[str]], typer.Option(help="Text column(s): one, or two for sentence pairs (comma-separated or repeated). Inferred when omitted.")] = None,
    label_column: Annotated[str, typer.Option(help="Label column.")] = "label",
    labels: Annotated[Optional[list[str]], typer.Option(help="Label names in id order (comma-separated); default: from the data.")] = None,
    model: Annotated[str, typer.Option(help="Base model: a local folder or hub name. The default is embedded (no network).")] = "sentence-transformers/all-MiniLM-L6-v2",
    method: Annotated[str, typer.Option(help="metatt-4d, metatt-5d or lora (the PEFT baseline, same loop).")] = "metatt-4d",
    rank: Annotated[int, typer.Option(help="Bond rank of every TT bond (LoRA: r).")] = 8,
    alpha: Annotated[float, typer.Option(help="MetaTT output scale (independent of the ranks).")] = 4.0,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (scaling alpha/r); default: equal to --rank.")] = None,
    init: Annotated[Optional[str], typer.Option(help="Per-core initialisation, e.g. ze-id-id-id (ze zeros, id identity, no normal std 0.2).")] = None,
    targets: Annotated[str, typer.Option(help="Matrix types to adapt: q,k,v,o,up,down (gate for LLaMA), or name=module_suffix pairs.")] = "q,k,v,o",
    lr: Annotated[float, typer.Option(help="AdamW learning rate for the adapter.")] = 5e-3,
    head_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the classification head (default: --lr).")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Training batch size per device.")] = 32,
    max_length: Annotated[int, typer.Option(help="Maximum tokens per example (longer inputs are truncated).")] = 128,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = 0,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (and at each epoch end).")] = 200,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps (for quick runs).")] = None,
    max_train_samples: Annotated[Optional[int], typer.Option(help="Use a fixed random subset of N training examples.")] = None,
    max_eval_samples: Annotated[Optional[int], typer.Option(help="Use a fixed random subset of N validation and test examples.")] = None,
    rank_schedule: Annotated[Optional[str], typer.Option(help="Rank-adaptive training: cut bond ranks by SVD sweeps at epoch starts, e.g. '10,1:8,2:6,3:4' (start rank, then epoch:rank). See docs/rank-adaptive.md.")] = None,
    moments: Annotated[str, typer.Option(help="AdamW moments after a rank cut: project (onto the kept subspace) or reset.")] = "project",
    force: Force = False,
) -> None:
    """Fine-tune a sequence classifier with a MetaTT adapter (or a PEFT LoRA baseline)."""
    from .data import load_task
    from .train import TrainConfig, train as run_training

    limits = {k: v for k, v in (("train", max_train_samples), ("validation", max_eval_samples), ("test", max_eval_samples)) if v}
    task = load_task(
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
    cfg = TrainConfig(
        output=str(output), model=model, method=method, rank=rank, alpha=alpha, lora_alpha=lora_alpha, init=init,
        targets=_split([targets]), lr=lr, head_lr=head_lr, weight_decay=weight_decay, epochs=epochs,
        batch_size=batch_size, max_length=max_length, seed=seed, save_steps=save_steps, max_steps=max_steps,
        rank_schedule=rank_schedule, moments=moments,
    )
    result = run_training(cfg, task, force=force)
    best, test = result["best"], result.get("test")
    typer.echo(f"best validation accuracy {best['accuracy']:.4f} (epoch {best['epoch']})" + (f"; test accuracy {test['accuracy']:.4f}" if test else ""))
    typer.echo(f"adapter: {output / 'best'}; report: {output / 'metrics.md'}")


@app.command()
@user_errors
def merge(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (a run's best/ folder).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder for the merged Hugging Face model.")],
    task: Annotated[Optional[str], typer.Option(help="Task to merge (multi-task adapters).")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="Base model folder or hub name, if it moved since training (checked by fingerprint).")] = None,
    max_rank: Annotated[Optional[int], typer.Option(help="Round the tensor train to this bond rank first and report the error it introduced.")] = None,
    force: Force = False,
) -> None:
    """Fold alpha * dW into the base weights and write a standard Hugging Face model folder."""
    from .merge import merge_adapter

    record = merge_adapter(adapter, output, task=task, base_model=base_model, max_rank=max_rank, force=force)
    extra = f"; rounding error {record['rounding_relative_error']:.3e}" if "rounding_relative_error" in record else ""
    typer.echo(f"merged task '{record['task']}' into {output}{extra}")
