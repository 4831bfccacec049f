"""Every knob of a training run, as immutable config objects with their defaults in one place.

`TrainConfig` is saved as ``train_config.json`` so a run can be resumed or repeated; a resume
with other settings is refused. The CLI builds these objects from its options and uses the
constants below as its defaults, so the API and the CLI cannot disagree.

Why the defaults are what they are: each was the best measured across tasks, or the safe side of a
measured failure. MetaTT-4D (and the joint (4+1)D adapter) trains at 3e-3 with a 5e-3 head because
5e-3 collapsed runs to the majority class and 1e-3 was too slow for NLI; a wide adapter (FFN
targets at rank >= ``WIDE_RANK``) collapsed at that lr, so it takes ``WIDE_LR``; gradient clipping
is off because clipping at 1.0 caused a collapse instead of preventing them. The measurements,
one default at a time, are in docs/nli-gap.md ("The shipped training defaults and the evidence for
each"); a default changes only with a sweep that beats it on more than one task.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from metatt_deploy.adapters.base_model import DEFAULT_MODEL
from metatt_deploy.adapters.config import DEFAULT_ALPHA, METATT_METHODS
from metatt_deploy.adapters.targets import DEFAULT_TARGETS
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.training.sampling import DEFAULT_SAMPLING, DEFAULT_TEMPERATURE, check_sampling

# PEFT baselines trained through the same loop (saved as PEFT folders with a metatt_lora.json record)
PEFT_METHODS = ("lora", "vera")
TRAIN_METHODS = (*METATT_METHODS, *PEFT_METHODS)
# (adapter lr, head lr) per method; a head lr of None trains the head at the adapter's lr
DEFAULT_LR = {"metatt-4d": 3e-3, "metatt-5d": 1e-3, "lora": 1e-3, "vera": 5e-3}
DEFAULT_HEAD_LR: dict[str, float | None] = {"metatt-4d": 5e-3, "metatt-5d": 5e-3, "lora": None, "vera": None}
# a MetaTT adapter with FFN matrices among its targets at a starting rank >= WIDE_RANK trains at WIDE_LR
FFN_TARGETS = ("up", "down", "gate")
WIDE_RANK = 8
WIDE_LR = {"metatt-4d": 1e-3, "metatt-5d": 5e-4}
# --add-task trains one slice and one head, nothing shared
ADD_TASK_LR = 5e-3
DEFAULT_RANK = 8
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 32
DEFAULT_EVAL_BATCH_SIZE = 128  # a classifier's evaluation is a forward pass: batches as large as memory allows
DEFAULT_MAX_LENGTH = 128
DEFAULT_SAVE_STEPS = 200
# --max-grad-norm: the global L2 norm gradients are clipped to before a step; 0 clips nothing
DEFAULT_MAX_GRAD_NORM = 0.0
MOMENTS = ("project", "reset")


@dataclass(frozen=True)
class TrainConfig:
    """A run's settings. ``lr``/``head_lr`` of None take the method's default (resolved on creation)."""

    output: str
    model: str = DEFAULT_MODEL
    method: str = "metatt-4d"
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    lora_alpha: float | None = None
    init: str | None = None
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE  # the task kind sets a causal LM's (training/kinds.py)
    max_length: int = DEFAULT_MAX_LENGTH
    seed: int = 0
    save_steps: int = DEFAULT_SAVE_STEPS
    max_steps: int | None = None
    rank_schedule: str | None = None
    moments: str = "project"

    def __post_init__(self) -> None:
        if self.lr is None:  # an unknown method fails in check()
            object.__setattr__(self, "lr", self.default_lr())
        if self.head_lr is None:
            object.__setattr__(self, "head_lr", DEFAULT_HEAD_LR.get(self.method))

    def default_lr(self) -> float:
        if self.method in WIDE_LR and self.is_wide():
            return WIDE_LR[self.method]
        return DEFAULT_LR.get(self.method, DEFAULT_LR["metatt-4d"])

    def is_wide(self) -> bool:
        """FFN matrices among the targets at a starting rank (--rank, or --rank-schedule's first
        entry, its largest bond) of at least WIDE_RANK: where the default MetaTT lrs collapsed."""
        start = self.rank
        if self.rank_schedule:
            first = self.rank_schedule.split(",")[0].split("/")
            start = max((int(r) for r in first if r.strip().isdigit()), default=self.rank)
        return start >= WIDE_RANK and any(t.split("=", 1)[0].strip() in FFN_TARGETS for t in self.targets)

    @property
    def adapter_lr(self) -> float:
        """The resolved adapter learning rate (never None after construction)."""
        return float(self.lr if self.lr is not None else self.default_lr())

    @property
    def resolved_head_lr(self) -> float:
        return float(self.head_lr or self.adapter_lr)

    def check(self) -> None:
        if self.method not in TRAIN_METHODS:
            raise MetaTTError(f"unknown method '{self.method}'; use one of {', '.join(TRAIN_METHODS)}")
        for name in ("rank", "epochs", "batch_size", "max_length", "save_steps"):
            if getattr(self, name) < 1:
                raise MetaTTError(f"--{name.replace('_', '-')} must be at least 1")
        if not all(lr > 0 and math.isfinite(lr) for lr in (self.adapter_lr, self.resolved_head_lr)):
            raise MetaTTError("--lr and --head-lr must be positive finite numbers")
        if not math.isfinite(self.alpha) or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise MetaTTError("--alpha must be a finite number and --weight-decay a finite number >= 0")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise MetaTTError("--max-grad-norm must be a finite number >= 0 (0 turns gradient clipping off)")
        if not 0 <= self.warmup_ratio <= 1 or (self.lora_alpha is not None and not math.isfinite(self.lora_alpha)):
            raise MetaTTError("the warm-up ratio must be between 0 and 1 and --lora-alpha finite")
        if self.rank_schedule and self.method in PEFT_METHODS:
            raise MetaTTError(f"--rank-schedule applies to MetaTT methods only; drop it for --method {self.method}")
        if self.moments not in MOMENTS:  # else it would fail only at the first cut
            raise MetaTTError(f"unknown --moments '{self.moments}'; use {' or '.join(MOMENTS)}")


@dataclass(frozen=True)
class MultiTaskConfig(TrainConfig):
    """A multi-task run: TrainConfig's knobs plus the tasks and how batches are drawn from them."""

    tasks: list[str] = field(default_factory=list)  # the --task values as given (NAME=SOURCE)
    task_sampling: str = DEFAULT_SAMPLING
    temperature: float = DEFAULT_TEMPERATURE
    task_weights: dict[str, float] = field(default_factory=dict)  # --task-weight: loss multipliers by task name (default 1)
    add_task_from: str | None = None  # with --add-task: the frozen multi-task adapter to extend
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    def __post_init__(self) -> None:
        """Joint training keeps the single-task defaults (cores 3e-3, or 1e-3 when wide; heads 5e-3): the shared cores
        take every task's gradient; 5e-3 for them left all three tasks of the real run at their
        majority class (docs/multitask.md), 3e-3 learned every task at 2k and 10k examples per
        task (docs/nli-gap.md). --add-task trains at ADD_TASK_LR.
        """
        if self.lr is None and self.add_task_from:
            object.__setattr__(self, "lr", ADD_TASK_LR)
        super().__post_init__()

    def check(self) -> None:
        super().check()
        if self.method in PEFT_METHODS:
            raise MetaTTError(f"multi-task training needs a MetaTT method (metatt-4d or metatt-5d); drop --method {self.method}")
        if self.add_task_from:
            if len(self.tasks) != 1:
                raise MetaTTError("--add-task trains exactly one new task; give --add-task NAME=SOURCE once")
            if self.rank_schedule:
                raise MetaTTError("--add-task trains a slice against frozen cores, whose ranks cannot change; drop --rank-schedule")
            if self.task_weights:
                raise MetaTTError("--add-task trains one task, so there is nothing to weigh it against; drop --task-weight")
        elif len(self.tasks) < 2:
            raise MetaTTError(
                "multi-task training needs at least two --task NAME=SOURCE; for one task use --dataset NAME or --train FILE "
                "(with --task-name NAME)"
            )
        check_sampling(self.task_sampling, self.temperature)
        if not all(w > 0 and math.isfinite(w) for w in self.task_weights.values()):
            raise MetaTTError("every --task-weight must be a positive finite number (NAME=W)")

    def sample_limits(self) -> dict[str, int] | None:
        return sample_limits(self.max_train_samples, self.max_eval_samples)


def sample_limits(max_train: int | None, max_eval: int | None) -> dict[str, int] | None:
    """The per-split sample caps of --max-train-samples / --max-eval-samples (None: every row)."""
    limits = {k: v for k, v in (("train", max_train), ("validation", max_eval), ("test", max_eval)) if v}
    return limits or None


# Settings added after runs were saved without them, with the value those runs trained under (so
# they resume as they began): runs saved before clipping existed trained unclipped, runs saved
# before loss weights existed weighted every task 1.
LEGACY_SETTINGS: dict[str, Any] = {"max_grad_norm": 0.0, "task_weights": {}}


def changed_settings(saved: dict[str, Any], cfg: TrainConfig) -> str:
    """The settings (other than the output folder) in which a saved train_config.json differs from
    ``cfg``, as "name (saved X, now Y), ..."; empty when it is the same run."""
    now = {**asdict(cfg), "output": None}
    then = {**{k: v for k, v in LEGACY_SETTINGS.items() if k in now}, **saved, "output": None}
    return ", ".join(f"{k} (saved {then.get(k)!r}, now {now.get(k)!r})" for k in sorted({*then, *now}) if then.get(k) != now.get(k))
