"""Checkpoints: the trainable tensors and AdamW's moments in safetensors, counters in JSON.

A run's ``checkpoint/`` folder holds everything an interrupted run needs to resume exactly
(never pickle: a checkpoint is a file a user may hand in). Cores whose ranks a schedule cut
are rebuilt at their saved shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from metatt_deploy.adapters.layer import MetaTT
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_dir, atomic_write_json, read_json


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    params = trainable_parameters(model)
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    index = {id(p): n for n, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            s = optimizer.state.get(p)
            if s:
                n = index[id(p)]
                tensors[f"exp_avg.{n}"] = s["exp_avg"].detach().cpu().contiguous()
                tensors[f"exp_avg_sq.{n}"] = s["exp_avg_sq"].detach().cpu().contiguous()
                tensors[f"step.{n}"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
    with atomic_dir(run / "checkpoint", force=True) as tmp:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        atomic_write_json(tmp / "state.json", state)


def load_checkpoint(run: Path, model: nn.Module, adapter: MetaTT | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore trainable tensors (re-shaping ``adapter``'s TT when ranks were cut); return state + moments."""
    state = read_json(run / "checkpoint" / "state.json", "checkpoint state")
    tensors = load_file(str(run / "checkpoint" / "trainable.safetensors"))
    params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    if adapter is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        keys = [names[id(c)] for c in adapter.cores]
        if all(k in params for k in keys):  # all cores trained (ranks may have been cut): rebuild them
            adapter.set_cores([params.pop(k) for k in keys])
    current = trainable_parameters(model)
    with torch.no_grad():
        for name, value in params.items():
            if name not in current or current[name].shape != value.shape:
                raise MetaTTError(f"checkpoint in {run} does not match this run's model ({name}); use a new --output or --force")
            current[name].copy_(value)
    return state, tensors


def restore_moments(optimizer: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, p in trainable_parameters(model).items():
        if f"exp_avg.{name}" in tensors and tensors[f"exp_avg.{name}"].shape == p.shape:
            optimizer.state[p] = {
                "step": tensors[f"step.{name}"].reshape(()).clone(),
                "exp_avg": tensors[f"exp_avg.{name}"].to(p.device),
                "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(p.device),
            }
