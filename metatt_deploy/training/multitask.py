"""Training several tasks at once: task specs, batch sampling across tasks, the joint loop, adding a task.

`train_multitask` samples one task per batch (proportional or temperature sampling), evaluates
every task every epoch, logs per-task metrics and the normalised gradient norm of every core,
and checkpoints and resumes through train.py's pieces. With ``add_task_from`` it trains only a
new task's slice (appended to the task core) and head against a frozen adapter. The models it
trains are multitask.py's.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from matplotlib.ticker import MaxNLocator
from transformers import DataCollatorWithPadding

from metatt_deploy.adapters.base_model import DEFAULT_MODEL, load_classifier, load_tokenizer
from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.adapters.heads import routers
from metatt_deploy.adapters.multitask import MultiTaskModel, build_multitask, extend_tasks, load_multitask, parameter_counts, save_multitask
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_json, atomic_write_text
from metatt_deploy.common.report import markdown_table, progress_bar, save_figure
from metatt_deploy.training.data import load_task, tokenize_task
from metatt_deploy.training.guards import check_loss, exclusive_run
from metatt_deploy.training.loop import (
    TrainConfig,
    epoch_order,
    evaluate,
    load_checkpoint,
    make_loader,
    prepare_run,
    restore_moments,
    save_checkpoint,
    seed_step,
    warmup_schedule,
)

SAMPLING = ("proportional", "temperature")
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


# ---------------------------------------------------------------- task specs and sampling


@dataclass
class TaskSpec:
    """One ``--task`` value: NAME=SOURCE, SOURCE a builtin/hub data set or data files."""

    name: str
    dataset: str | None = None
    files: list[str] = field(default_factory=list)


def parse_task_spec(text: str) -> TaskSpec:
    """``NAME=DATASET``, ``NAME=train.jsonl[,validation.jsonl[,test.jsonl]]`` or a bare builtin ``DATASET``."""
    text = text.strip()
    name, sep, source = text.partition("=")
    name, source = name.strip(), source.strip()
    if not sep:
        name, source = text, text
    if not name or not source or any(c in name for c in ",/= "):
        raise MetaTTError(
            f"bad --task '{text}'; write NAME=DATASET or NAME=train.jsonl,validation.jsonl,test.jsonl (NAME without , / = or spaces)"
        )
    items = [s.strip() for s in source.split(",")]
    if any(i.lower().endswith(DATA_SUFFIXES) for i in items):
        if not 1 <= len(items) <= 3 or not all(i.lower().endswith(DATA_SUFFIXES) for i in items):
            raise MetaTTError(f"bad --task '{text}': give 1 to 3 data files (train[,validation[,test]]), each {'/'.join(DATA_SUFFIXES)}")
        return TaskSpec(name, files=items)
    if len(items) != 1:
        raise MetaTTError(f"bad --task '{text}': a data set name has no commas; files must end in {'/'.join(DATA_SUFFIXES)}")
    return TaskSpec(name, dataset=source)


def load_task_spec(spec: TaskSpec | str, *, max_samples: dict[str, int] | None = None, seed: int = 0, **options):
    """The TaskData of a ``--task`` value (named NAME), through data.load_task."""
    spec = parse_task_spec(spec) if isinstance(spec, str) else spec
    files = dict(zip(("train", "validation", "test"), spec.files))
    task = load_task(name=spec.name, dataset=spec.dataset, max_samples=max_samples, seed=seed, **files, **options)
    task.name = spec.name
    return task


def task_probabilities(sizes: Sequence[int], sampling: str = "proportional", temperature: float = 1.0) -> np.ndarray:
    """p_t proportional to n_t (proportional) or to n_t ** (1 / T) (temperature; T=1 is proportional)."""
    if sampling not in SAMPLING:
        raise MetaTTError(f"unknown --task-sampling '{sampling}'; use {' or '.join(SAMPLING)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise MetaTTError("--temperature must be positive (1 = proportional, larger flattens towards uniform)")
    n = np.asarray(sizes, dtype=np.float64)
    if (n <= 0).any():
        raise MetaTTError("every task needs training examples; check the train split of each --task")
    w = n if sampling == "proportional" else n ** (1.0 / temperature)
    return w / w.sum()


def epoch_plan(
    lengths: Sequence[Sequence[int]], batch_size: int, probs: Sequence[float], seed: int, epoch: int
) -> list[tuple[int, list[int]]]:
    """The batches of one epoch as (task, row indices): a pure function of (seed, epoch).

    ``lengths[t]`` are the token counts of task t's training rows. An epoch has
    sum_t ceil(n_t / batch) steps; each step draws a task from ``probs`` and takes the task's next
    ``batch_size`` rows of its seeded, length-grouped order (train.epoch_order; a new order once
    one is used up, so a task sampled more often than its size cycles through it). Resuming
    replays the plan and skips the steps already done.
    """
    rng = np.random.default_rng([seed, epoch])
    steps = sum(math.ceil(len(n) / batch_size) for n in lengths)
    choice = rng.choice(len(lengths), size=steps, p=np.asarray(probs))
    streams: list[list[int]] = [[] for _ in lengths]
    cycles = [0] * len(lengths)
    plan = []
    for t in choice.tolist():
        while len(streams[t]) < batch_size:
            streams[t].extend(epoch_order(list(lengths[t]), batch_size, seed * 7919 + t, epoch * 1000 + cycles[t]))
            cycles[t] += 1
        plan.append((t, streams[t][:batch_size]))
        del streams[t][:batch_size]
    return plan


# ---------------------------------------------------------------- training


ADD_TASK_LR = 5e-3


@dataclass
class MultiTaskConfig(TrainConfig):
    """A multi-task run: TrainConfig's knobs plus the tasks and how batches are drawn from them."""

    tasks: list[str] = field(default_factory=list)  # the --task values as given (NAME=SOURCE)
    task_sampling: str = "proportional"
    temperature: float = 1.0
    add_task_from: str | None = None  # with --add-task: the frozen multi-task adapter to extend
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    def __post_init__(self) -> None:
        """Joint training keeps the single-task defaults (cores 1e-3, heads 5e-3): the shared cores
        take every task's gradient, and 5e-3 for them left all three tasks of the real run at
        their majority class (docs/multitask.md). --add-task trains one slice and one head,
        nothing shared, at 5e-3 (measured: amazon 0.79 test accuracy from 1,000 examples).
        """
        if self.lr is None and self.add_task_from:
            self.lr = ADD_TASK_LR
        super().__post_init__()

    def check(self) -> None:
        super().check()
        if self.method == "lora":
            raise MetaTTError("multi-task training needs a MetaTT method (metatt-4d or metatt-5d); drop --method lora")
        if self.rank_schedule:
            raise MetaTTError("--rank-schedule is not supported with several --task yet; train at a fixed --rank")
        if self.add_task_from:
            if len(self.tasks) != 1:
                raise MetaTTError("--add-task trains exactly one new task; give --add-task NAME=SOURCE once")
        elif len(self.tasks) < 2:
            raise MetaTTError("multi-task training needs at least two --task NAME=SOURCE; use --dataset for one task")
        task_probabilities([1] * len(self.tasks), self.task_sampling, self.temperature)

    def sample_limits(self) -> dict[str, int] | None:
        limits = {
            k: v
            for k, v in (("train", self.max_train_samples), ("validation", self.max_eval_samples), ("test", self.max_eval_samples))
            if v
        }
        return limits or None


def _core_names(config: MetaTTConfig) -> list[str]:
    return [f"G{k + 1} ({n})" for k, n in enumerate(config.mode_names)]


def _optimizer(cfg: MultiTaskConfig, mtm: MultiTaskModel) -> torch.optim.Optimizer:
    """AdamW: adapter cores at --lr, heads at --head-lr (default --lr)."""
    cores = [p for p in mtm.metatt.parameters() if p.requires_grad]
    heads = [p for r in routers(mtm.model) for p in r.parameters() if p.requires_grad]
    groups = [g for g in ({"params": cores, "lr": cfg.lr}, {"params": heads, "lr": cfg.head_lr or cfg.lr}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _with_task(collator, task: int, features):
    batch = collator(features)
    batch["task_ids"] = task
    return batch


def _freeze_for_new_task(mtm: MultiTaskModel, new: int):
    """Only the new task's slice and head train; returns a function that restores every other slice.

    The task core is one tensor, so it stays a parameter: a gradient hook zeroes the other
    slices' gradients and, after each optimizer step, the restore function copies them back
    (AdamW's decoupled weight decay would otherwise shrink them), keeping them bit-identical.
    """
    cfg = mtm.adapter_config
    t_core = cfg.mode_names.index("task")
    mtm.requires_grad_(False)
    core = mtm.metatt.cores[t_core]
    core.requires_grad_(True)
    keep = torch.ones(core.shape[1], dtype=torch.bool)
    keep[new] = False
    frozen = core.detach()[:, keep, :].clone()
    mask = (~keep).to(core.dtype).view(1, -1, 1)
    core.register_hook(lambda g: g * mask.to(g.device))
    for r in routers(mtm.model):
        r.heads[new].requires_grad_(True)

    def restore() -> None:
        with torch.no_grad():
            mtm.metatt.cores[t_core][:, keep, :] = frozen.to(core.device)

    return restore


@exclusive_run
def train_multitask(cfg: MultiTaskConfig, tasks: list, force: bool = False) -> dict:
    """Run (or resume) a multi-task run (or an --add-task run) into ``cfg.output``; returns the metrics."""
    run, resuming = prepare_run(cfg, force)
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    restore = None
    if cfg.add_task_from:
        mtm, _, tokenizer = load_multitask(cfg.add_task_from, base_model=cfg.model)
        new = extend_tasks(mtm, tasks[0].name, tasks[0].label_names, seed=cfg.seed)
        restore = _freeze_for_new_task(mtm, new)
        train_ids = [new]
    else:
        tokenizer = load_tokenizer(cfg.model)
        model = load_classifier(cfg.model, tasks[0].label_names)
        mtm = build_multitask(
            model,
            [t.name for t in tasks],
            {t.name: t.label_names for t in tasks},
            method=cfg.method,
            rank=cfg.rank,
            alpha=cfg.alpha,
            init=cfg.init,
            targets=cfg.targets,
            base_model=cfg.model,
            seed=cfg.seed,
        )
        mtm.adapter_config.extra["max_length"] = cfg.max_length
        train_ids = list(range(len(tasks)))
    mtm.train()
    config = mtm.adapter_config

    splits = []
    for task in tasks:
        s = tokenize_task(task, tokenizer, cfg.max_length)
        if "train" not in s or "validation" not in s:
            raise MetaTTError(f"task '{task.name}' needs a train and a validation split; give train.jsonl,validation.jsonl")
        splits.append(s)
    collator = DataCollatorWithPadding(tokenizer)
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in splits[0]["train"].column_names]
    rows = [s["train"].select_columns(columns).to_list() for s in splits]
    lengths = [[len(r["input_ids"]) for r in task_rows] for task_rows in rows]
    probs = task_probabilities([len(r) for r in rows], cfg.task_sampling, cfg.temperature)
    steps_per_epoch = sum(math.ceil(len(r) / cfg.batch_size) for r in rows)
    total_steps = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)

    n_cores = len(config.mode_names)
    fresh = {"sum": [0.0] * n_cores, "count": 0, "task_steps": [0] * len(tasks)}
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "best": None, "step_times": [], "grad": copy.deepcopy(fresh)}
    moments: dict[str, torch.Tensor] = {}
    if resuming:
        state, moments = load_checkpoint(run, cfg, mtm)
        accelerator.print(f"resuming {run} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}")
    optimizer = _optimizer(cfg, mtm)

    def checkpoint() -> None:
        save_checkpoint(run, accelerator.unwrap_model(model), optimizer, state)

    scheduler = warmup_schedule(cfg, optimizer, total_steps, state["global_step"])
    restore_moments(optimizer, mtm, moments)
    model, optimizer = accelerator.prepare(mtm, optimizer)
    val_loaders = {
        i: accelerator.prepare(make_loader(splits[k]["validation"], functools.partial(_with_task, collator, i), cfg.eval_batch_size))
        for k, i in enumerate(train_ids)
    }
    counts = parameter_counts(mtm)
    accelerator.print(
        f"{config.method} ({'+'.join(config.mode_names)}): {counts['adapter_total']:,} adapter parameters "
        f"({counts['shared_cores']:,} shared), {counts['total']:,} with the heads; "
        "task sampling " + ", ".join(f"{t.name} {p:.2f}" for t, p in zip(tasks, probs))
    )
    progress = progress_bar(total_steps, state["global_step"], "train multi-task", accelerator.is_main_process)
    cores = list(mtm.metatt.cores)
    while state["epoch"] < cfg.epochs and state["global_step"] < total_steps:
        epoch = state["epoch"]
        plan = epoch_plan(lengths, cfg.batch_size, probs, cfg.seed, epoch)
        for t, idx in plan[state["step_in_epoch"] :]:
            t0 = time.perf_counter()
            seed_step(cfg.seed, state["global_step"])
            batch = _with_task(collator, train_ids[t], [rows[t][i] for i in idx])
            batch = {k: (v.to(accelerator.device) if hasattr(v, "to") else v) for k, v in batch.items()}
            loss = model(**batch).loss
            check_loss(loss, state["global_step"] + 1)
            accelerator.backward(loss)
            with torch.no_grad():
                for k, core in enumerate(cores):
                    if core.grad is not None:
                        state["grad"]["sum"][k] += float(core.grad.norm() / math.sqrt(core.numel()))
            state["grad"]["count"] += 1
            state["grad"]["task_steps"][t] += 1
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if restore is not None:
                restore()
            state["step_times"].append(time.perf_counter() - t0)
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", task=tasks[t].name, epoch=epoch + 1, refresh=False)
            if state["global_step"] % cfg.save_steps == 0:
                checkpoint()
            if state["global_step"] >= total_steps:
                break
        metrics = {tasks[k].name: evaluate(model, val_loaders[i], accelerator, len(tasks[k].label_names)) for k, i in enumerate(train_ids)}
        grad = state["grad"]
        entry = {
            "epoch": epoch + 1,
            "step": state["global_step"],
            "tasks": metrics,
            "mean_accuracy": float(np.mean([m["accuracy"] for m in metrics.values()])),
            "grad_norm_rms": dict(zip(_core_names(config), [s / max(1, grad["count"]) for s in grad["sum"]])),
            "batches_per_task": {tasks[k].name: n for k, n in enumerate(grad["task_steps"])},
        }
        state["history"].append(entry)
        state["grad"] = copy.deepcopy(fresh)
        accelerator.print(
            f"epoch {epoch + 1}: "
            + ", ".join(f"{n} acc {m['accuracy']:.4f}" for n, m in metrics.items())
            + f"; mean {entry['mean_accuracy']:.4f}"
        )
        if state["best"] is None or entry["mean_accuracy"] > state["best"]["mean_accuracy"]:
            state["best"] = entry
            if accelerator.is_main_process:
                save_multitask(accelerator.unwrap_model(model), run / "best", tokenizer, force=True)
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        if accelerator.is_main_process:
            checkpoint()
    progress.close()

    result = {
        "method": config.method,
        "mode": "add-task" if cfg.add_task_from else "joint",
        "model": cfg.model,
        "tasks": [
            {"name": t.name, "source": spec, "labels": t.label_names, "train_examples": len(r), "sampling_probability": float(p)}
            for t, spec, r, p in zip(tasks, cfg.tasks, rows, probs)
        ],
        "task_sampling": {"kind": cfg.task_sampling, "temperature": cfg.temperature},
        "trainable_parameters": _trainable_summary(mtm, train_ids),
        "history": state["history"],
        "best": state["best"],
        "step_time_median_s": statistics.median(state["step_times"]) if state["step_times"] else None,
        "steps": state["global_step"],
    }
    if accelerator.is_main_process:
        best, _, _ = load_multitask(run / "best", base_model=cfg.model, tokenizer=False)
        result["test"] = {}
        for k, task in enumerate(tasks):
            if "test" in splits[k]:
                i = best.tasks.index(task.name)
                loader = make_loader(splits[k]["test"], functools.partial(_with_task, collator, i), cfg.eval_batch_size)
                result["test"][task.name] = evaluate(best, loader, accelerator, len(task.label_names))
        atomic_write_json(run / "metrics.json", result)
        write_multitask_report(run, result)
    accelerator.end_training()
    return result


def _trainable_summary(mtm: MultiTaskModel, trained: list[int]) -> dict:
    counts = parameter_counts(mtm)
    trained_names = [mtm.tasks[i] for i in trained]
    counts["trained_in_this_run"] = sum(p.numel() for p in mtm.parameters() if p.requires_grad)
    if len(trained) == 1 and len(mtm.tasks) > 1 and counts["trained_in_this_run"] != counts["adapter_total"]:
        # add-task: the task core is a parameter, but only the new slice moves
        core = mtm.metatt.cores[mtm.adapter_config.mode_names.index("task")]
        counts["trained_in_this_run"] = counts["per_task"][trained_names[0]]["total"]
        counts["note"] = f"only task '{trained_names[0]}''s slice ({core.shape[0]}x{core.shape[2]}) and head trained"
    return counts


def write_multitask_report(run: Path, result: dict) -> None:
    """metrics.md (tasks, parameters, per-epoch per-task metrics, gradient norms, test) and curves.png."""
    import matplotlib.pyplot as plt

    history = result["history"]
    names = [t["name"] for t in result["tasks"]]
    counts = result["trainable_parameters"]
    text = [f"# {result['method']} multi-task ({result['mode']}): {', '.join(names)}\n", f"model: `{result['model']}`\n"]
    text.append(
        "\n## Tasks\n\n"
        + markdown_table(
            [
                {
                    "task": t["name"],
                    "source": t["source"],
                    "labels": len(t["labels"]),
                    "train examples": t["train_examples"],
                    "sampling p": t["sampling_probability"],
                }
                for t in result["tasks"]
            ],
            floatfmt=".3f",
        )
    )
    text.append(
        "\n## Trainable parameters\n\n"
        + markdown_table(
            [{"part": "shared cores", "parameters": counts["shared_cores"]}]
            + [
                {"part": f"task {n}: slice + head", "parameters": f"{v['task_slice']} + {v['head']} = {v['total']}"}
                for n, v in counts["per_task"].items()
            ]
            + [
                {"part": "total (adapter + every head)", "parameters": counts["total"]},
                {"part": "trained in this run", "parameters": counts["trained_in_this_run"]},
            ]
        )
    )
    if result.get("step_time_median_s"):
        text.append(f"\nmedian step time: {result['step_time_median_s'] * 1000:.1f} ms over {result['steps']} steps\n")
    rows = []
    for h in history:
        row = {"epoch": h["epoch"], "step": h["step"]}
        row.update({f"{n} acc": m["accuracy"] for n, m in h["tasks"].items()})
        row["mean acc"] = h["mean_accuracy"]
        row.update({f"{n} batches": b for n, b in h["batches_per_task"].items()})
        rows.append(row)
    text.append("\n## Validation per epoch\n\n" + markdown_table(rows))
    text.append(
        "\n## Gradient norm per core (RMS: ||grad G_k||_F / sqrt(size of G_k), mean over the epoch's steps)\n\n"
        + markdown_table([{"epoch": h["epoch"], **h["grad_norm_rms"]} for h in history], floatfmt=".3e")
    )
    if result.get("test"):
        text.append("\n## Test (best epoch's adapter)\n\n" + markdown_table([{"task": n, **m} for n, m in result["test"].items()]))
    atomic_write_text(run / "metrics.md", "\n".join(text))
    if not history:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = [h["epoch"] for h in history]
    for n in history[0]["tasks"]:
        ax1.plot(epochs, [h["tasks"][n]["accuracy"] for h in history], marker="o", label=n)
    if len(history[0]["tasks"]) > 1:
        ax1.plot(epochs, [h["mean_accuracy"] for h in history], "k--", label="mean")
    ax1.set(xlabel="epoch", ylabel="validation accuracy", title="per-task validation accuracy")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for core in history[0]["grad_norm_rms"]:
        values = [h["grad_norm_rms"][core] for h in history]
        if any(v > 0 for v in values):
            ax2.plot(epochs, values, marker="o", label=core)
    ax2.set(xlabel="epoch", ylabel="RMS gradient", title="normalised gradient norm per core", yscale="log")
    ax2.legend()
    ax2.grid(alpha=0.3)
    save_figure(fig, run / "curves.png")


def train_from_cli(
    *,
    output: str,
    specs: list[str],
    add_task: str | None,
    from_adapter: str | None,
    text_columns=None,
    label_column: str = "label",
    label_names=None,
    model: str | None = None,
    force: bool = False,
    **knobs,
) -> dict:
    """`metatt-deploy train --task ... | --add-task ... --from ...`: load every task, build the config, train."""
    if add_task:
        if specs:
            raise MetaTTError("--add-task trains one new task against a frozen adapter; drop --task")
        if not from_adapter:
            raise MetaTTError("--add-task needs --from ADAPTER (the multi-task adapter to extend, a run's best/)")
        base = MetaTTConfig.load(from_adapter)
        if not base.multitask:
            raise MetaTTError(f"{from_adapter} is a single-task adapter; --add-task extends one trained with several --task")
        if model in (None, DEFAULT_MODEL):
            model = base.base_model
        specs = [add_task]
    elif from_adapter:
        raise MetaTTError("--from is used with --add-task only; add --add-task NAME=SOURCE")
    parsed = [parse_task_spec(s) for s in specs]
    names = [p.name for p in parsed]
    if len(set(names)) != len(names):
        raise MetaTTError(f"task names repeat ({', '.join(names)}); give each --task a distinct NAME")
    if label_names and len(parsed) > 1:
        raise MetaTTError("--labels names one task's labels; with several --task, labels come from each task's data")
    cfg = MultiTaskConfig(output=output, model=model or DEFAULT_MODEL, tasks=list(specs), add_task_from=from_adapter, **knobs)
    cfg.check()
    options = {"label_column": label_column}
    if text_columns:
        options["text_columns"] = text_columns
    if label_names:
        options["label_names"] = label_names
    tasks = [load_task_spec(p, max_samples=cfg.sample_limits(), seed=cfg.seed, **options) for p in parsed]
    return train_multitask(cfg, tasks, force=force)
