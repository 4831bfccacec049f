"""The one training loop: every kind of run (single-task MetaTT or LoRA, multi-task, --add-task)
goes through `run_loop`, which owns what they share.

AdamW with linear warm-up and decay; evaluation every epoch and the best adapter kept; a
checkpoint (safetensors + JSON, never pickle) every ``save_steps`` steps and at each epoch end,
from which an interrupted run resumes exactly: the batches of an epoch are a pure function of
the seed (training/sampling.py) and dropout is re-seeded from (seed, step) before every step.
Rank-adaptive schedules cut the adapter's bond ranks at the start of scheduled epochs.

Data-parallel (``accelerate launch --num_processes N``): every process takes its share of
each global batch (rows ``rank::N``) and weights its loss by its share of the rows, so the
averaged gradient is that of the whole batch and N processes train like one process with the
same ``--batch-size``. What differs per kind of run comes in as a `Recipe`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from metatt_deploy.adapters.layer import MetaTT
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_json, check_folder_path, check_writable, read_json
from metatt_deploy.common.report import progress_bar
from metatt_deploy.training.checkpoint import load_checkpoint, restore_moments, save_checkpoint, trainable_parameters
from metatt_deploy.training.config import TrainConfig, changed_settings
from metatt_deploy.training.guards import check_loss
from metatt_deploy.training.metrics import compute_metrics
from metatt_deploy.training.sampling import epoch_plan
from metatt_deploy.training.schedule import Strategy, check_schedule, parse_rank_schedule, project_adam_state
from metatt_deploy.tt.cores import max_ranks, tt_ranks
from metatt_deploy.tt.rounding import sweep

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass
class Recipe:
    """What a kind of run brings to the loop; optimizer, schedule, resume, checkpoints and the
    choice of the best epoch are the loop's.

    ``rows[t]`` are task t's tokenized training rows; ``collate(t, rows)`` makes a batch whose
    forward returns ``.loss``; ``evaluate(model)`` returns the epoch's history entry fields and
    the score that picks the best epoch (higher is better) and a one-line summary;
    ``save_best(model, directory)`` writes the adapter; ``loss_weights[t]`` (default 1) scales
    task t's loss, so a task can weigh more in the shared cores' updates than its share of steps.
    """

    model: nn.Module
    rows: list[list[dict[str, Any]]]
    probs: Sequence[float]
    collate: Callable[[int, list[dict[str, Any]]], dict[str, Any]]
    evaluate: Callable[[nn.Module], tuple[dict[str, Any], float, str]]
    save_best: Callable[[nn.Module, Path], None]
    param_groups: Callable[[nn.Module], list[dict[str, Any]]]
    task_names: list[str]
    adapter: MetaTT | None = None  # the MetaTT adapter, for rank schedules and gradient statistics
    after_step: Callable[[], None] | None = None
    gradient_fields: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # per-epoch gradient statistics -> entry fields
    description: str = "train"
    schedule: dict[int, list[int]] = field(default_factory=dict)  # epoch -> ranks to cut to
    loss_weights: Sequence[float] | None = None


def make_accelerator(find_unused_parameters: bool = False) -> Accelerator:
    """accelerate's Accelerator for this process.

    Several processes on a machine without CUDA (``accelerate launch --multi_gpu
    --num_processes N`` or ``torchrun``) train data-parallel on the CPU with gloo, which
    accelerate only does when asked for the CPU. Multi-task models leave other tasks' heads
    unused in a step, which DDP must be told about.
    """
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(cpu=distributed_cpu, kwargs_handlers=handlers)


def make_loader(ds, collator, batch_size: int, order: list[int] | None = None) -> DataLoader:
    if order is not None:
        ds = ds.select(order)
    cols = [c for c in ds.column_names if c in MODEL_INPUTS]
    return DataLoader(ds.with_format("torch", columns=cols), batch_size=batch_size, shuffle=False, collate_fn=collator)


def by_length(ds) -> list[int]:
    """Indices sorted by length: evaluation order does not matter, padding does."""
    lengths = [len(ids) for ids in ds["input_ids"]]
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def seed_step(seed: int, step: int) -> None:
    """Seed torch's RNG from (seed, step) before a training step.

    Dropout masks then depend on the step alone, not on what ran before it in this process,
    so a run resumed from a checkpoint repeats the interrupted run's steps exactly.
    """
    torch.manual_seed(seed * 1_000_003 + step)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator | None, num_labels: int) -> dict:
    """Metrics of ``model`` on ``loader``: gathered across processes when ``accelerator`` prepared
    the loader, computed in this process alone when ``accelerator`` is None (the main process
    testing the best adapter after training)."""
    model.eval()
    preds, labels = [], []
    device = next(model.parameters()).device
    for batch in loader:
        batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        p, y = logits.argmax(-1), batch["labels"]
        if accelerator is not None:
            p, y = accelerator.gather_for_metrics((p, y))
        preds.append(p.cpu().numpy())
        labels.append(y.cpu().numpy())
    model.train()
    return compute_metrics(np.concatenate(preds), np.concatenate(labels), num_labels)


def prepare_run(cfg: TrainConfig, force: bool, accelerator: Accelerator) -> tuple[Path, bool]:
    """Check ``cfg``, decide between a fresh run and a resume, write train_config.json.

    Returns (run directory, resuming). Every process decides alike (the checks only read);
    the main process alone clears and writes the folder while the others wait.
    """
    cfg.check()
    run = check_folder_path(cfg.output)
    resuming = (run / "checkpoint" / "state.json").is_file() and not force
    # a folder holding only train_config.json is a run that failed before its first checkpoint
    # (bad schedule, data, model): nothing to resume or lose, so the corrected command may reuse it
    if run.exists() and not resuming and any(p.name != "train_config.json" for p in run.iterdir()) and not force:
        raise MetaTTError(f"output {run} already holds a finished or foreign run; pass --force to replace it or choose another --output")
    if resuming:
        changed = changed_settings(read_json(run / "train_config.json", "run config"), cfg)
        if changed:
            raise MetaTTError(
                f"{run} holds a checkpoint of a run with other settings: {changed}; pass the same options, or --force to start over"
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run.exists() and force and not resuming:
            check_writable(run, force, marker="train_config.json")
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run / "train_config.json", asdict(cfg))
    accelerator.wait_for_everyone()
    return run, resuming


def warmup_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, done_steps: int):
    """Linear warm-up and decay, fast-forwarded by ``done_steps`` (after a resume or a rank cut)."""
    sched = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    with warnings.catch_warnings():  # fast-forward before any opt.step()
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done_steps):
            sched.step()
    return sched


def rank_schedule(cfg: TrainConfig, adapter: MetaTT | None) -> dict[int, list[int]]:
    """Epoch -> bond ranks to cut to at that epoch's start (validated before any training)."""
    if not cfg.rank_schedule or adapter is None:
        return {}
    ranks = tt_ranks(adapter.cores)
    parsed = parse_rank_schedule(cfg.rank_schedule, len(ranks))
    checked = check_schedule(parsed, ranks, cfg.epochs, max_ranks([c.shape[1] for c in adapter.cores]))
    return {epoch: r for epoch, r in checked.items() if epoch > 0}


def start_ranks(cfg: TrainConfig, n_bonds: int) -> int | list[int]:
    """The ranks an adapter is built with: --rank, or the first entry of --rank-schedule."""
    if not cfg.rank_schedule:
        return cfg.rank
    return parse_rank_schedule(cfg.rank_schedule, n_bonds)[0]


def initial_state(n_cores: int, n_tasks: int) -> dict[str, Any]:
    return {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "history": [],
        "best": None,
        "best_score": None,
        "best_stage": 0,
        "step_times": [],
        "grad": fresh_grad_stats(n_cores, n_tasks),
    }


def fresh_grad_stats(n_cores: int, n_tasks: int) -> dict[str, Any]:
    return {"sum": [0.0] * n_cores, "count": 0, "task_steps": [0] * n_tasks, "norm_sum": 0.0, "norm_steps": 0, "clipped": 0}


def run_loop(cfg: TrainConfig, run: Path, resuming: bool, recipe: Recipe, accelerator: Accelerator) -> dict[str, Any]:
    """Train ``recipe.model`` for ``cfg.epochs`` (or ``cfg.max_steps``); returns the loop state.

    ``state["history"]`` holds one entry per epoch, ``state["best"]`` the entry of the epoch
    whose adapter ``recipe.save_best`` wrote to ``run/best``. With a rank schedule, only epochs
    at the lowest ranks reached compete for best (a user who asked for rank 4 gets rank 4; a run
    stopped by --max-steps before its last cut keeps the last stage it reached).
    """
    rows, batch_size = recipe.rows, cfg.batch_size
    lengths = [[len(r["input_ids"]) for r in task_rows] for task_rows in rows]
    steps_per_epoch = sum(math.ceil(len(r) / batch_size) for r in rows)
    total_steps = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)
    n_cores = len(recipe.adapter.cores) if recipe.adapter is not None else 0

    state = initial_state(n_cores, len(rows))
    moments: dict[str, torch.Tensor] = {}
    if resuming:
        state, moments = load_checkpoint(run, recipe.model, recipe.adapter)
        accelerator.print(f"resuming {run} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}", flush=True)

    def build_optimizer(model: nn.Module):
        opt = torch.optim.AdamW(recipe.param_groups(model), lr=cfg.adapter_lr, weight_decay=cfg.weight_decay)
        return opt, warmup_schedule(cfg, opt, total_steps, state["global_step"])

    optimizer, scheduler = build_optimizer(recipe.model)
    restore_moments(optimizer, recipe.model, moments)
    model, optimizer = accelerator.prepare(recipe.model, optimizer)

    def checkpoint() -> None:
        if accelerator.is_main_process:
            save_checkpoint(run, accelerator.unwrap_model(model), optimizer, state)

    model.train()
    progress = progress_bar(total_steps, state["global_step"], recipe.description, accelerator.is_main_process, unit="steps")
    while state["epoch"] < cfg.epochs and state["global_step"] < total_steps:
        epoch = state["epoch"]
        if state["step_in_epoch"] == 0 and epoch in recipe.schedule:
            model, optimizer, scheduler = cut_ranks(
                cfg, model, accelerator, optimizer, recipe, recipe.schedule[epoch], build_optimizer, progress.write
            )
        plan = epoch_plan(lengths, batch_size, recipe.probs, cfg.seed, epoch)
        for t, idx in plan[state["step_in_epoch"] :]:
            t0 = time.perf_counter()
            loss = train_step(cfg, recipe, model, (optimizer, scheduler), accelerator, state, t, idx)
            state["step_times"].append(time.perf_counter() - t0)
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            progress.update(1)
            postfix = {"loss": f"{loss.item():.4f}", "epoch": epoch + 1}
            if len(rows) > 1:
                postfix["task"] = recipe.task_names[t]
            progress.set_postfix(refresh=False, **postfix)
            if state["global_step"] % cfg.save_steps == 0:
                checkpoint()
            if state["global_step"] >= total_steps:
                break
        end_epoch(cfg, recipe, model, accelerator, state, run, progress.write)
        state["grad"] = fresh_grad_stats(n_cores, len(rows))
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        checkpoint()
    progress.close()
    if accelerator.is_main_process and (note := collapse_note(state["best"], recipe.task_names, cfg.adapter_lr)):
        accelerator.print(note, flush=True)
    accelerator.wait_for_everyone()
    return state


def train_step(
    cfg: TrainConfig, recipe: Recipe, model: nn.Module, optim, accelerator: Accelerator, state: dict, t: int, idx
) -> torch.Tensor:
    """One optimizer step on task ``t``'s global batch ``idx`` (rows ``rank::N`` in this process); returns the loss.

    Dropout is seeded from (seed, step); the loss is weighted by this process's share of the rows
    (and the task's loss weight); gradients are recorded (and clipped) before AdamW steps.
    """
    optimizer, scheduler = optim
    seed_step(cfg.seed, state["global_step"])
    world, rank = accelerator.num_processes, accelerator.process_index
    share = idx[rank::world]
    weight = len(share) * world / len(idx)  # 1.0 in one process
    if recipe.loss_weights is not None:
        weight *= recipe.loss_weights[t]
    batch = recipe.collate(t, [recipe.rows[t][i] for i in (share or idx[:1])])
    batch = {k: (v.to(accelerator.device) if hasattr(v, "to") else v) for k, v in batch.items()}
    loss = model(**batch).loss
    check_loss(loss, state["global_step"] + 1)
    accelerator.backward(loss * weight if weight != 1.0 else loss)
    _record_gradients(state["grad"], recipe.adapter, t)
    if cfg.max_grad_norm > 0:
        norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        _record_clipping(state["grad"], norm, cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if recipe.after_step is not None:
        recipe.after_step()
    return loss


def end_epoch(cfg: TrainConfig, recipe: Recipe, model: nn.Module, accelerator: Accelerator, state: dict, run: Path, log) -> None:
    """Evaluate the epoch, append its history entry and, if it is the best so far, save its adapter.

    A later stage of the rank schedule supersedes earlier ones: best among the epochs at the
    lowest ranks reached so far (ties keep the earliest epoch).
    """
    epoch = state["epoch"]
    fields, score, line = recipe.evaluate(model)
    entry = {"epoch": epoch + 1, "step": state["global_step"], **fields}
    if cfg.max_grad_norm > 0:
        entry.update(clipping_fields(state["grad"]))
    if recipe.gradient_fields is not None:
        entry.update(recipe.gradient_fields(state["grad"]))
    if recipe.adapter is not None:
        entry["ranks"] = tt_ranks(recipe.adapter.cores)
    state["history"].append(entry)
    if accelerator.is_main_process:
        log(f"epoch {epoch + 1}: {line}")
    stage = sum(1 for cut in recipe.schedule if cut <= epoch)
    if state["best"] is None or (stage, score) > (state["best_stage"], state["best_score"]):
        state["best"], state["best_score"], state["best_stage"] = entry, score, stage
        if accelerator.is_main_process:
            recipe.save_best(accelerator.unwrap_model(model), run / "best")


def _record_gradients(stats: dict[str, Any], adapter: MetaTT | None, task: int) -> None:
    """Normalised gradient norm of every core (||grad G_k||_F / sqrt(size)), summed over the epoch."""
    if adapter is not None:
        with torch.no_grad():
            for k, core in enumerate(adapter.cores):
                if core.grad is not None:
                    stats["sum"][k] += float(core.grad.norm() / math.sqrt(core.numel()))
    stats["count"] += 1
    stats["task_steps"][task] += 1


def collapse_note(best: dict[str, Any] | None, task_names: list[str], lr: float) -> str | None:
    """A warning when the best epoch still predicts one class for every validation example of a
    task (MCC exactly 0): a run that collapsed to the majority class, which happened at too high
    a learning rate (docs/nli-gap.md) and would otherwise pass for a poor but working adapter."""
    if best is None:
        return None
    per_task = best["tasks"] if "tasks" in best else {task_names[0]: best}
    dead = [name for name, metrics in per_task.items() if metrics.get("mcc") == 0.0]
    if not dead:
        return None
    return (
        f"warning: the best adapter predicts a single class on {', '.join(dead)} (validation MCC 0): training collapsed; "
        f"rerun with a lower --lr than {lr:g} (e.g. {lr / 3:.1g}) or another --seed"
    )


def _record_clipping(stats: dict[str, Any], norm: float, max_norm: float) -> None:
    """Count the step's global gradient norm (before clipping) and whether clipping scaled it down."""
    for key in ("norm_sum", "norm_steps", "clipped"):
        stats.setdefault(key, 0)  # a checkpoint written before clipping was recorded
    stats["norm_sum"] += norm
    stats["norm_steps"] += 1
    stats["clipped"] += int(norm > max_norm)


def clipping_fields(stats: dict[str, Any]) -> dict[str, float]:
    """The epoch's mean global gradient norm (before clipping) and the share of steps clipped:
    a run that clips nearly every step is training at a smaller effective learning rate."""
    steps = max(1, stats.get("norm_steps", 0))
    return {"grad_norm_mean": stats.get("norm_sum", 0.0) / steps, "clipped_share": stats.get("clipped", 0) / steps}


def cut_ranks(cfg: TrainConfig, model, accelerator: Accelerator, optimizer, recipe: Recipe, ranks: list[int], build_optimizer, log):
    """One left-to-right SVD sweep to ``ranks``; AdamW rebuilt for the new core shapes.

    The cores' moments are reset or projected onto the kept subspace (``cfg.moments``, see
    training/schedule.py); the head's moments carry over untouched. The model is prepared
    again, so a data-parallel wrapper sees the new parameters (every process cuts the same
    cores to the same result: the SVD is deterministic).
    """
    adapter = recipe.adapter
    assert adapter is not None
    unwrapped = accelerator.unwrap_model(model)
    inner = getattr(optimizer, "optimizer", optimizer)
    old_params = list(adapter.cores)
    old = [p.detach() for p in old_params]
    result = sweep(old, ranks)
    states = [inner.state[p] for p in old_params] if all(p in inner.state for p in old_params) else None
    adapter.set_cores(result.cores)
    if accelerator.is_main_process:
        log(f"rank cut {result.ranks_before} -> {result.ranks_after} (relative error {result.relative_error_bound:.3e})")
    new_opt, new_sched = build_optimizer(unwrapped)
    for p in trainable_parameters(unwrapped).values():
        if p in inner.state and all(p is not q for q in old_params):
            new_opt.state[p] = inner.state[p]
    if states is not None:
        for p, state in zip(
            adapter.cores, project_adam_state(old, [c.detach() for c in adapter.cores], states, cast(Strategy, cfg.moments))
        ):
            new_opt.state[p] = state
    if accelerator.num_processes > 1:
        model = accelerator.prepare(unwrapped)
    return model, accelerator.prepare(new_opt), new_sched
