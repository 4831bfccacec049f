"""Fine-tuning with a MetaTT adapter or a PEFT LoRA baseline through one training loop.

The loop is plain PyTorch on top of accelerate (so ``accelerate launch`` runs it data-parallel):
AdamW with linear warm-up and decay, evaluation every epoch, the best adapter kept, and a
checkpoint (safetensors + JSON, never pickle) every ``save_steps`` steps and at each epoch end,
from which an interrupted run resumes exactly where it stopped: the data order of every epoch
is a pure function of the seed, so the resumed run skips the batches it already saw.
Both methods share data, targets, head, loop and evaluation, so comparisons are like for like.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

from metatt_deploy.adapters import model as mt
from metatt_deploy.adapters.base_model import DEFAULT_MODEL, load_classifier, load_tokenizer
from metatt_deploy.adapters.config import DEFAULT_ALPHA
from metatt_deploy.adapters.targets import DEFAULT_TARGETS, find_targets, head_modules
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_dir, atomic_write_json, check_folder_path, check_writable, read_json
from metatt_deploy.common.report import progress_bar, write_training_report
from metatt_deploy.training.checkpoint import load_checkpoint, restore_moments, save_checkpoint, trainable_parameters
from metatt_deploy.training.data import TaskData, tokenize_task
from metatt_deploy.training.guards import check_loss, exclusive_run
from metatt_deploy.training.metrics import compute_metrics
from metatt_deploy.training.schedule import check_schedule, parse_rank_schedule, project_adam_state
from metatt_deploy.tt.cores import max_ranks
from metatt_deploy.tt.rounding import sweep

METHODS = ("metatt-4d", "metatt-5d", "lora")
# Default (adapter lr, head lr; None = the adapter's) per method, from docs/multitask-comparison.md:
# MetaTT at 5e-3 for cores and head collapsed to the majority class on 2 of 6 short runs (snli,
# tweet), at 1e-3 with a 5e-3 head it learned in all 6 and matched 5e-3 on movie within noise.
# LoRA learned more at 1e-3 than at 5e-3 (docs/results.md) and trains its head at the same rate.
DEFAULT_LR = {"metatt-4d": 1e-3, "metatt-5d": 1e-3, "lora": 1e-3}
DEFAULT_HEAD_LR = {"metatt-4d": 5e-3, "metatt-5d": 5e-3, "lora": None}
N_BONDS = {"metatt-4d": 3, "metatt-5d": 4}  # single-task adapters: modes - 1
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass
class TrainConfig:
    """Every knob of a run; saved as ``train_config.json`` so a run can be resumed or repeated."""

    output: str
    model: str = DEFAULT_MODEL
    method: str = "metatt-4d"
    rank: int = 8
    alpha: float = DEFAULT_ALPHA
    lora_alpha: float | None = None
    init: str | None = None
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lr: float | None = None  # None: DEFAULT_LR of the method
    head_lr: float | None = None  # None: DEFAULT_HEAD_LR of the method, else lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 128
    seed: int = 0
    save_steps: int = 200
    max_steps: int | None = None
    rank_schedule: str | None = None
    moments: str = "project"

    def __post_init__(self) -> None:
        if self.lr is None:  # an unknown method fails in check()
            self.lr = DEFAULT_LR.get(self.method, DEFAULT_LR["metatt-4d"])
        if self.head_lr is None:
            self.head_lr = DEFAULT_HEAD_LR.get(self.method)

    def check(self) -> None:
        if self.method not in METHODS:
            raise MetaTTError(f"unknown method '{self.method}'; use one of {', '.join(METHODS)}")
        for name in ("rank", "epochs", "batch_size", "max_length", "save_steps"):
            if getattr(self, name) < 1:
                raise MetaTTError(f"--{name.replace('_', '-')} must be at least 1")
        if not all(lr > 0 and math.isfinite(lr) for lr in (self.lr or 0.0, 1.0 if self.head_lr is None else self.head_lr)):
            raise MetaTTError("--lr and --head-lr must be positive finite numbers")
        if not math.isfinite(self.alpha) or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise MetaTTError("--alpha must be a finite number and --weight-decay a finite number >= 0")
        if not 0 <= self.warmup_ratio <= 1 or (self.lora_alpha is not None and not math.isfinite(self.lora_alpha)):
            raise MetaTTError("the warm-up ratio must be between 0 and 1 and --lora-alpha finite")
        if self.rank_schedule and self.method == "lora":
            raise MetaTTError("--rank-schedule applies to MetaTT methods only; drop it for --method lora")
        if self.moments not in ("project", "reset"):  # else it would fail only at the first cut
            raise MetaTTError(f"unknown --moments '{self.moments}'; use project or reset")


# What differs per method: how the model is wrapped, saved and restored. Everything else is shared.


def _wrap_model(cfg: TrainConfig, model: nn.Module, task: TaskData) -> dict:
    """Attach the adapter (MetaTT or PEFT LoRA) and return facts for the report."""
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        _, _, modules = find_targets(model, cfg.targets)
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.lora_alpha or cfg.rank,
            target_modules=[m.name for m in modules],
            modules_to_save=head_modules(model),
            lora_dropout=0.0,
            fan_in_fan_out=any(m.transposed for m in modules),
        )
        return {"peft": get_peft_model(model, lora)}
    config = mt.build_config(
        model,
        method=cfg.method,
        rank=_start_ranks(cfg),
        alpha=cfg.alpha,
        init=cfg.init,
        targets=cfg.targets,
        tasks=[task.name],
        label_names={task.name: task.label_names},
        base_model=cfg.model,
    )
    mt.attach(model, config, seed=cfg.seed)
    return {"peft": None}


def _param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """Adapter and head parameters; the head may get its own learning rate."""
    heads = tuple(f"{h}." for h in head_modules(_unwrap_peft(model)))
    adapter, head = [], []
    for name, p in trainable_parameters(model).items():
        plain = name.removeprefix("base_model.model.")
        (head if plain.startswith(heads) else adapter).append(p)
    groups = [{"params": adapter, "lr": cfg.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.head_lr or cfg.lr})
    return groups


def _unwrap_peft(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_param_groups(cfg, model), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save_adapter(cfg: TrainConfig, model: nn.Module, tokenizer, directory: Path) -> None:
    if cfg.method == "lora":
        with atomic_dir(directory, force=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    else:
        mt.save_adapter(model, directory, tokenizer=tokenizer, force=True)


# Data.


def make_loader(ds, collator, batch_size: int, order: list[int] | None = None) -> DataLoader:
    if order is not None:
        ds = ds.select(order)
    cols = [c for c in ds.column_names if c in MODEL_INPUTS]
    return DataLoader(ds.with_format("torch", columns=cols), batch_size=batch_size, shuffle=False, collate_fn=collator)


def seed_step(seed: int, step: int) -> None:
    """Seed torch's RNG from (seed, step) before a training step.

    Dropout masks then depend on the step alone, not on what ran before it in this process,
    so a run resumed from a checkpoint repeats the interrupted run's steps exactly.
    """
    torch.manual_seed(seed * 1_000_003 + step)


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 50) -> list[int]:
    """The example order of epoch ``epoch``: a pure function of the seed, for exact resumes.

    Length-grouped like transformers' LengthGroupedSampler: shuffle, sort each window of
    ``group`` batches by length so a batch pads to similar lengths (on CPU, padding is most of
    the cost of short sentences), then shuffle the order of the batches.
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * group
    batches = []
    for start in range(0, len(perm), window):
        chunk = sorted(perm[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]


def _by_length(ds) -> list[int]:
    """Indices sorted by length: evaluation order does not matter, padding does."""
    lengths = [len(ids) for ids in ds["input_ids"]]
    return sorted(range(len(lengths)), key=lengths.__getitem__)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator, num_labels: int) -> dict:
    model.eval()
    preds, labels = [], []
    for batch in loader:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        p, y = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        preds.append(p.cpu().numpy())
        labels.append(y.cpu().numpy())
    model.train()
    return compute_metrics(np.concatenate(preds), np.concatenate(labels), num_labels)


def prepare_run(cfg: TrainConfig, force: bool) -> tuple[Path, bool]:
    """Check ``cfg``, decide between a fresh run and a resume, write train_config.json.

    Returns (run directory, resuming). Shared by single- and multi-task training.
    """
    cfg.check()
    run = check_folder_path(cfg.output)
    resuming = (run / "checkpoint" / "state.json").is_file() and not force
    # a folder holding only train_config.json is a run that failed before its first checkpoint
    # (bad schedule, data, model): nothing to resume or lose, so the corrected command may reuse it
    if run.exists() and not resuming and any(p.name != "train_config.json" for p in run.iterdir()) and not force:
        raise MetaTTError(f"output {run} already holds a finished or foreign run; pass --force to replace it or choose another --output")
    if resuming:
        saved = read_json(run / "train_config.json", "run config")
        if {**saved, "output": cfg.output} != {**asdict(cfg), "output": cfg.output}:
            raise MetaTTError(f"{run} holds a checkpoint of a run with other settings; pass the same options, or --force to start over")
    elif run.exists() and force:
        import shutil

        check_writable(run, force, marker="train_config.json")

        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "train_config.json", asdict(cfg))
    return run, resuming


def warmup_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, done_steps: int):
    """Linear warm-up and decay, fast-forwarded by ``done_steps`` (after a resume or a rank cut)."""
    sched = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    with warnings.catch_warnings():  # fast-forward before any opt.step()
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done_steps):
            sched.step()
    return sched


@exclusive_run
def train(cfg: TrainConfig, task: TaskData, force: bool = False) -> dict:
    """Run (or resume) a training run into ``cfg.output``; returns the final metrics."""
    run, resuming = prepare_run(cfg, force)

    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_classifier(cfg.model, task.label_names)
    wrapped = _wrap_model(cfg, model, task)
    model = wrapped["peft"] or model
    schedule = _rank_schedule(cfg, model)

    splits = tokenize_task(task, tokenizer, cfg.max_length)
    if "train" not in splits or "validation" not in splits:
        raise MetaTTError("training needs a train and a validation split; pass --validation FILE")
    collator = DataCollatorWithPadding(tokenizer)
    n_train = len(splits["train"])
    lengths = [len(ids) for ids in splits["train"]["input_ids"]]
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "best": None, "step_times": []}
    moments: dict[str, torch.Tensor] = {}
    if resuming:
        state, moments = load_checkpoint(run, cfg, model)
        accelerator.print(f"resuming {run} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}")

    def build_optimizer():
        opt = _make_optimizer(cfg, model)
        return opt, warmup_schedule(cfg, opt, total_steps, state["global_step"])

    optimizer, scheduler = build_optimizer()
    restore_moments(optimizer, model, moments)
    model, optimizer = accelerator.prepare(model, optimizer)
    val_loader = accelerator.prepare(make_loader(splits["validation"], collator, cfg.eval_batch_size, _by_length(splits["validation"])))
    num_labels = len(task.label_names)
    counts = _count(model, cfg)
    accelerator.print(f"{cfg.method}: {counts['adapter']:,} trainable adapter parameters (+{counts['head']:,} head)")

    model.train()
    progress = progress_bar(total_steps, state["global_step"], f"train {cfg.method}", accelerator.is_main_process)
    while state["epoch"] < cfg.epochs and state["global_step"] < total_steps:
        epoch = state["epoch"]
        if state["step_in_epoch"] == 0 and epoch in schedule:
            optimizer, scheduler = _cut_ranks(cfg, model, accelerator, optimizer, schedule[epoch], build_optimizer)
            counts = _count(model, cfg)
        loader = accelerator.prepare(
            make_loader(splits["train"], collator, cfg.batch_size, epoch_order(lengths, cfg.batch_size, cfg.seed, epoch))
        )
        if state["step_in_epoch"]:
            loader = accelerator.skip_first_batches(loader, state["step_in_epoch"])
        for batch in loader:
            t0 = time.perf_counter()
            seed_step(cfg.seed, state["global_step"])
            loss = model(**batch).loss
            check_loss(loss, state["global_step"] + 1)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step_times"].append(time.perf_counter() - t0)
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1, refresh=False)
            if state["global_step"] % cfg.save_steps == 0:
                save_checkpoint(run, accelerator.unwrap_model(model), optimizer, state)
            if state["global_step"] >= total_steps:
                break
        metrics = evaluate(model, val_loader, accelerator, num_labels)
        entry = {"epoch": epoch + 1, "step": state["global_step"], **metrics, "trainable": counts["adapter"]}
        state["history"].append(entry)
        accelerator.print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if state["best"] is None or metrics["accuracy"] > state["best"]["accuracy"]:
            state["best"] = entry
            if accelerator.is_main_process:
                _save_adapter(cfg, accelerator.unwrap_model(model), tokenizer, run / "best")
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        if accelerator.is_main_process:
            save_checkpoint(run, accelerator.unwrap_model(model), optimizer, state)
    progress.close()

    result = _finish(cfg, run, task, splits, collator, accelerator, state, counts)
    accelerator.end_training()
    return result


def _count(model: nn.Module, cfg: TrainConfig) -> dict[str, int]:
    base = _unwrap_peft(model)
    heads = head_modules(base)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad and n.removeprefix("base_model.model.").startswith(tuple(f"{h}." for h in heads))
    )
    return {"adapter": total - head, "head": head, "total": total}


def _start_ranks(cfg: TrainConfig) -> int | list[int]:
    """The ranks the adapter is built with: --rank, or the first entry of --rank-schedule."""
    if not cfg.rank_schedule:
        return cfg.rank

    return parse_rank_schedule(cfg.rank_schedule, N_BONDS[cfg.method])[0]


def _rank_schedule(cfg: TrainConfig, model: nn.Module) -> dict[int, list[int]]:
    """Epoch -> bond ranks to cut to at that epoch's start (validated before any training)."""
    if not cfg.rank_schedule:
        return {}

    adapter = mt.get_adapter(model)
    parsed = parse_rank_schedule(cfg.rank_schedule, len(adapter.config.ranks))
    checked = check_schedule(parsed, adapter.config.ranks, cfg.epochs, max_ranks(adapter.config.mode_sizes))
    return {epoch: ranks for epoch, ranks in checked.items() if epoch > 0}


def _cut_ranks(cfg, model, accelerator, optimizer, ranks, build_optimizer):
    """One left-to-right SVD sweep to ``ranks``; AdamW rebuilt for the new core shapes.

    The cores' moments are reset or projected onto the kept subspace (``cfg.moments``, see
    rounding.project_adam_state); the head's moments carry over untouched.
    """
    adapter = mt.get_adapter(accelerator.unwrap_model(model))
    inner = getattr(optimizer, "optimizer", optimizer)
    old_params = list(adapter.cores)
    old = [p.detach() for p in old_params]
    result = sweep(old, ranks)
    states = [inner.state[p] for p in old_params] if all(p in inner.state for p in old_params) else None
    adapter.set_cores(result.cores)
    accelerator.print(f"rank cut {result.ranks_before} -> {result.ranks_after} (relative error {result.relative_error_bound:.3e})")
    new_opt, new_sched = build_optimizer()
    for p in trainable_parameters(model).values():
        if p in inner.state and all(p is not q for q in old_params):
            new_opt.state[p] = inner.state[p]
    if states is not None:
        for p, state in zip(adapter.cores, project_adam_state(old, [c.detach() for c in adapter.cores], states, cfg.moments)):
            new_opt.state[p] = state
    return accelerator.prepare(new_opt), new_sched


def _finish(cfg, run, task, splits, collator, accelerator, state, counts) -> dict:
    """Test the best adapter, write metrics.json, the markdown report and the curve plot."""
    result = {
        "method": cfg.method,
        "task": task.name,
        "model": cfg.model,
        "trainable_parameters": counts,
        "history": state["history"],
        "best": state["best"],
        "step_time_median_s": statistics.median(state["step_times"]) if state["step_times"] else None,
        "steps": state["global_step"],
    }
    if "test" in splits and accelerator.is_main_process:
        best = load_trained(run / "best", cfg, task.label_names)
        loader = accelerator.prepare(make_loader(splits["test"], collator, cfg.eval_batch_size, _by_length(splits["test"])))
        result["test"] = evaluate(accelerator.prepare(best), loader, accelerator, len(task.label_names))
        accelerator.print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in result["test"].items()))
    if accelerator.is_main_process:
        atomic_write_json(run / "metrics.json", result)
        write_training_report(run, result)
    return result


def load_trained(directory: Path, cfg: TrainConfig, label_names: list[str]) -> nn.Module:
    """The saved best adapter on a fresh base model, for testing after training."""
    if cfg.method != "lora":
        return mt.load_adapter(directory, base_model=cfg.model, tokenizer=False)[0]
    from peft import PeftModel

    base = load_classifier(cfg.model, label_names)
    return PeftModel.from_pretrained(base, str(directory)).eval()
