"""Grids of training runs that survive being stopped: the pieces the experiment tools share.

A grid is many ordinary ``train`` runs, each in its own folder. ``run_resumable`` reuses a
finished run (it has ``metrics.json``), resumes an interrupted one from its checkpoint and
starts the rest, appending the console to ``<run>.log`` beside the folder; so a grid tool can
be killed and started again at any time and only the unfinished run repeats work (from its last
checkpoint). ``measure_step`` times real training steps for the tools' ``--plan`` estimates.

Used by tools/experiments/frontier.py, tools/experiments/nli_gap.py and tools/experiments/rank_adaptive_experiment.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

from metatt_deploy import TrainConfig
from metatt_deploy.training.config import DEFAULT_MAX_GRAD_NORM, changed_settings
from metatt_deploy.training.data import TaskData
from metatt_deploy.training.multitask import load_task_spec


class Tee:
    """Write to several streams at once (the console and the run's log)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def setup_threads(threads: int) -> None:
    """Torch intra-op threads for a grid (1: on a shared, oversubscribed CPU two threads were 2x
    slower per step, docs/rank-adaptive.md), quiet tokenizers and transformers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()


def log_path(run: Path) -> Path:
    """The run's console log, beside the run folder (train(force=True) replaces the folder)."""
    return run.parent / f"{run.name}.log"


def load_subset(spec: str, n_train: int | None, n_eval: int | None, seed: int = 0) -> TaskData:
    """A task (builtin name or NAME=train.jsonl,validation.jsonl,test.jsonl) cut to the given sizes.

    The rows depend only on ``seed`` (the data seed), never on the training seed, so the runs of
    a grid are paired: every method and seed sees the same rows.
    """
    limits = {k: v for k, v in (("train", n_train), ("validation", n_eval), ("test", n_eval)) if v}
    return load_task_spec(spec, max_samples=limits or None, seed=seed)


def run_resumable(cfg: TrainConfig, task: TaskData) -> dict:
    """The metrics of the run in ``cfg.output``: reused when finished, else resumed or started."""
    from metatt_deploy import train

    out = Path(cfg.output)
    if (done := reuse(cfg)) is not None:
        return done
    fresh = not (out / "checkpoint" / "state.json").is_file()  # no checkpoint: (re)start cleanly
    print(f"== {out} ({'start' if fresh else 'resume'})", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path(out), "a") as log, contextlib.redirect_stdout(Tee(sys.stdout, log)):
        result = train(cfg, task, force=fresh)
    print(f"   done in {time.time() - t0:.0f} s", flush=True)
    return result


def guarded(fn, *a, **kw):
    """Run one grid point; a failure is printed and the grid goes on (the point is retried on the next start)."""
    try:
        return fn(*a, **kw)
    except KeyboardInterrupt:
        raise
    except Exception:
        traceback.print_exc()
        return None


def saved_config(run: Path) -> dict:
    path = run / "train_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def finished(cfg: TrainConfig) -> dict | None:
    """The metrics of a finished run of exactly ``cfg`` (a run folder trained with other settings,
    e.g. before gradient clipping, is not this point of the grid)."""
    out = Path(cfg.output)
    path = out / "metrics.json"
    if not path.is_file() or changed_settings(saved_config(out), cfg):
        return None
    return json.loads(path.read_text())


def reuse(cfg: TrainConfig) -> dict | None:
    """The metrics of the finished run of ``cfg``; None when it has not finished. A finished run
    of other settings in that folder stops the tool (never retrained over, never mixed in)."""
    if (done := finished(cfg)) is not None:
        return done
    out = Path(cfg.output)
    if (out / "metrics.json").is_file():
        raise SystemExit(
            f"error: {out} was trained with other settings: {changed_settings(saved_config(out), cfg)}; pass those, or another --runs"
        )
    return None


def add_clipping_option(parser) -> None:
    """``--max-grad-norm`` for a grid tool (default: the shipped default, no clipping, as every run made before the option)."""
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=DEFAULT_MAX_GRAD_NORM,
        help=f"clip every run's gradients to this global norm (default {DEFAULT_MAX_GRAD_NORM}: no clipping)",
    )


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (nan for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def fmt(mean: float, se: float, scale: float = 100.0) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.2f}" + ("" if math.isnan(se) else f" ± {se * scale:.2f}")


def measure_step(cfg: TrainConfig, task: TaskData, steps: int = 2) -> dict:
    """Seconds per optimizer step (median of ``steps`` after one warm-up) and per evaluated example,
    on real batches of ``task`` at ``cfg``'s batch size and max length, with ``cfg``'s adapter."""
    import torch
    from transformers import DataCollatorWithPadding

    from metatt_deploy.adapters.base_model import load_classifier, load_tokenizer
    from metatt_deploy.training.data import tokenize_task
    from metatt_deploy.training.loop import MODEL_INPUTS
    from metatt_deploy.training.single import param_groups, wrap_model

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    model, _ = wrap_model(cfg, load_classifier(cfg.model, task.label_names), task.name, task.label_names)
    load_s = time.perf_counter() - t0
    train = tokenize_task(task, tokenizer, cfg.max_length)["train"]
    columns = [c for c in MODEL_INPUTS if c in train.column_names]
    rows = train.select_columns(columns).to_list()
    collator = DataCollatorWithPadding(tokenizer)
    optimizer = torch.optim.AdamW(param_groups(cfg, model))
    model.train()
    times = []
    for i in range(steps + 1):
        batch = collator([rows[(i * cfg.batch_size + j) % len(rows)] for j in range(cfg.batch_size)])
        t = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t)
    model.eval()
    batch = collator(rows[: cfg.batch_size])
    t = time.perf_counter()
    with torch.no_grad():
        model(**batch)
    eval_s = (time.perf_counter() - t) / cfg.batch_size
    return {"load_s": load_s, "step_s": statistics.median(times[1:]), "eval_example_s": eval_s}


def run_seconds(step: dict, n_train: int, n_val: int, n_test: int, epochs: int, batch_size: int) -> float:
    """Estimated seconds of one run: its steps, a validation pass per epoch and one test pass."""
    evaluated = epochs * n_val + n_test
    return epochs * math.ceil(n_train / batch_size) * step["step_s"] + evaluated * step["eval_example_s"] + step["load_s"]
