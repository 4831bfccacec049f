"""Guards every training loop shares: a diverged loss stops the run, one run per output folder.

Both are small on purpose: each loop calls `check_loss` once per step and is wrapped by
`exclusive_run`, so a single-task, multi-task or future loop gets the same behaviour.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import output_lock

F = TypeVar("F", bound=Callable[..., Any])


def check_loss(loss: torch.Tensor, step: int) -> None:
    """Stop training at the first NaN or Inf loss, naming the step (1-based).

    Without it a diverged run keeps stepping on NaN gradients and saves an all-NaN adapter that
    merges and exports without complaint.
    """
    value = float(loss.detach())
    if not math.isfinite(value):
        raise MetaTTError(
            f"training diverged: the loss is {value} at step {step}; lower --lr or --alpha (the adapter is not saved from this step on)"
        )


def exclusive_run(fn: F) -> F:
    """Run ``fn(cfg, ...)`` holding the lock of ``cfg.output``: a second run into the same folder
    fails at once instead of interleaving its checkpoints with the first one's."""

    @functools.wraps(fn)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        if os.environ.get("RANK", "0") != "0":  # accelerate launch / torchrun: the first process holds the lock
            return fn(cfg, *args, **kwargs)
        with output_lock(cfg.output, what="run directory"):
            return fn(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
