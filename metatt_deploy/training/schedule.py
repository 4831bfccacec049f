"""Rank-adaptive training: the ``--rank-schedule`` syntax, its checks, and AdamW moments across a cut.

A schedule says at which epochs the adapter's bond ranks are cut (tt/rounding.py's `sweep`
does the cut); after a cut the cores have new shapes, so the optimizer state is rebuilt
here, reset or projected onto the kept subspace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.tt.rounding import check_same_modes

Strategy = Literal["project", "reset"]
STRATEGIES = ("project", "reset")
SCHEDULE_SYNTAX = "write START[,EPOCH:RANK]..., e.g. '10,1:8,2:6,3:4' (epochs count from 0; a rank may be given per bond as 8/8/6)"

# Relative cut-off for the pseudo-inverse of interface Gram matrices (float64): their
# condition number is the square of the interfaces', so this tolerates interfaces with a
# condition number up to about 1e6 and treats anything flatter (zero-padded ranks, a zero
# core) as absent instead of amplifying round-off.
_GRAM_RTOL = 1e-12

# Adam state entries mapped like a gradient (linear) and like a squared gradient.
_LINEAR_KEYS = ("exp_avg",)
_SQUARED_KEYS = ("exp_avg_sq", "max_exp_avg_sq")


# --------------------------------------------------------------------------- rank schedules


def parse_rank_schedule(text: str, n_bonds: int) -> dict[int, list[int]]:
    """Parse ``START[,EPOCH:RANK]...`` into {epoch: per-bond ranks}, the start under epoch 0.

    ``10,1:8,2:6,3:4`` builds the adapter at rank 10 and sweeps to 8, 6 and 4 before the first
    step of epochs 1, 2 and 3 (0-based). Any rank may be one per bond, ``8/8/6``. Only the
    syntax is checked here (epochs increasing from 1, ranks >= 1, per-bond counts); whether the
    schedule fits the model and the run is `check_schedule`'s job.
    """
    items = [item.strip() for item in text.split(",")]
    if ":" in items[0]:
        raise MetaTTError(f"rank schedule '{text}' must start with the starting rank; {SCHEDULE_SYNTAX}")
    schedule = {0: _parse_ranks(items[0], n_bonds, text)}
    last = 0
    for item in items[1:]:
        epoch_text, colon, ranks_text = item.partition(":")
        if not colon:
            raise MetaTTError(f"rank schedule '{text}': item '{item}' is not EPOCH:RANK; {SCHEDULE_SYNTAX}")
        epoch = _parse_number(epoch_text, "epoch", text)
        if epoch <= last:
            raise MetaTTError(
                f"rank schedule '{text}': epoch {epoch} comes after epoch {last}; list epochs in "
                "increasing order, from 1 (epoch 0 is the starting rank, the first item)"
            )
        schedule[epoch] = _parse_ranks(ranks_text, n_bonds, text)
        last = epoch
    return schedule


def _parse_ranks(item: str, n_bonds: int, text: str) -> list[int]:
    parts = item.split("/")
    if len(parts) not in (1, n_bonds):
        raise MetaTTError(
            f"rank schedule '{text}': '{item}' gives {len(parts)} ranks; give one rank or {n_bonds} (one per bond) separated by '/'"
        )
    ranks = [_parse_number(p, "rank", text) for p in parts]
    for r in ranks:
        if r < 1:
            raise MetaTTError(f"rank schedule '{text}': rank {r} is below 1; every bond needs rank >= 1")
    return ranks * n_bonds if len(ranks) == 1 else ranks


def _parse_number(token: str, what: str, text: str) -> int:
    token = token.strip()
    if not token.isdecimal():
        raise MetaTTError(f"rank schedule '{text}': '{token}' is not a valid {what}; {SCHEDULE_SYNTAX}")
    return int(token)


def check_schedule(
    schedule: Mapping[int, Sequence[int] | int],
    current_ranks: Sequence[int],
    epochs: int,
    max_ranks: Sequence[int],
) -> dict[int, list[int]]:
    """Check a rank schedule against the adapter and the run; return it with per-bond lists.

    Fails (one line each) on epochs out of order or outside ``0 .. epochs-1`` (a reduction
    that would never run), ranks below 1, per-bond lists of the wrong length, ranks above what
    the modes allow (``tt.max_ranks``), and any entry that raises a bond above the one before
    it, starting from ``current_ranks``: a sweep can only truncate.
    """
    n_bonds = len(current_ranks)
    if len(max_ranks) != n_bonds:
        raise ValueError(f"{len(max_ranks)} rank bounds for {n_bonds} bonds")
    out: dict[int, list[int]] = {}
    previous, last_epoch = list(current_ranks), None
    for epoch, ranks in schedule.items():
        if epoch < 0 or epoch >= epochs:
            raise MetaTTError(
                f"rank schedule names epoch {epoch}, but the run has epochs 0 to {epochs - 1}; drop that reduction or train for more epochs"
            )
        if last_epoch is not None and epoch <= last_epoch:
            raise MetaTTError(f"rank schedule lists epoch {epoch} after epoch {last_epoch}; list epochs in increasing order")
        per_bond = [ranks] * n_bonds if isinstance(ranks, int) else list(ranks)
        if len(per_bond) != n_bonds:
            raise MetaTTError(
                f"rank schedule gives {len(per_bond)} ranks at epoch {epoch} for {n_bonds} bonds; give one rank or one per bond"
            )
        for bond, (r, bound, before) in enumerate(zip(per_bond, max_ranks, previous), start=1):
            if r < 1 or r > bound:
                raise MetaTTError(
                    f"rank schedule asks for rank {r} at bond {bond} at epoch {epoch}, but that bond "
                    f"allows ranks 1 to {bound}; lower the rank"
                )
            if r > before:
                raise MetaTTError(
                    f"rank schedule raises bond {bond} from {before} to {r} at epoch {epoch}; sweeps only "
                    "truncate, so make the ranks non-increasing (or start from a higher rank)"
                )
        out[epoch] = per_bond
        previous, last_epoch = per_bond, epoch
    return out


# --------------------------------------------------------------------------- optimizer state


def project_adam_state(
    old_cores: Sequence[torch.Tensor],
    new_cores: Sequence[torch.Tensor],
    states: Sequence[Mapping[str, Any]],
    strategy: Strategy = "project",
) -> list[dict[str, Any]]:
    """Rebuild Adam/AdamW state for cores whose shapes (or gauge) a sweep changed.

    ``states[k]`` is ``optimizer.state[param_k]`` of old core k (``step``, ``exp_avg``,
    ``exp_avg_sq``, optionally ``max_exp_avg_sq``); the result holds one state dict per new core,
    to install as the new parameters' state. The maps are computed from the old and new cores
    alone, so this works after any rank change (`sweep`, `round_tt`) or pure re-gauging.

    ``"reset"``: zero moments and ``step`` 0, i.e. a fresh Adam for the new cores. The step is
    reset too: Adam's bias correction assumes moments that started at zero ``step`` steps ago;
    keeping a large step with zero moments would make the first updates several times too large.

    ``"project"`` (``step`` kept): ``exp_avg`` is an average of gradients, and a gradient of core
    k is the loss gradient D w.r.t. the full tensor seen through the interfaces:
    ``g_k = X_<k^T D X_>k^T``. The new moment is ``L_k g_k R_k`` with
    ``L_k = (X'_<k^T X_<k)(X_<k^T X_<k)^+`` and ``R_k = (X_>k X_>k^T)^+ (X_>k X'_>k^T)``, which is
    the new core's gradient for the minimum-norm D consistent with ``g_k`` - exact for a pure
    gauge change and for any D in the span of the old interfaces. ``exp_avg_sq`` maps its
    square root through the entrywise magnitudes, ``v' = (|L_k| sqrt(v) |R_k|)**2``: it stays
    non-negative, and by the triangle inequality every elementwise bound ``|m| <= C sqrt(v)``
    survives, so Adam's per-coordinate step does not jump right after a sweep (squaring the
    maps instead would allow steps up to sqrt(rank) times larger for coherent gradients).
    """
    if strategy not in STRATEGIES:
        raise MetaTTError(f"unknown optimizer-state strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
    if not len(old_cores) == len(new_cores) == len(states):
        raise ValueError(f"{len(old_cores)} old cores, {len(new_cores)} new cores and {len(states)} states")
    check_same_modes(old_cores, new_cores)
    if strategy == "reset":
        return [_reset_state(s, o.shape, n.shape) for s, o, n in zip(states, old_cores, new_cores)]
    left_maps, right_maps = _covector_maps(old_cores, new_cores)
    return [_project_state(s, o.shape, left, right) for s, o, left, right in zip(states, old_cores, left_maps, right_maps)]


def _covector_maps(old_cores: Sequence[torch.Tensor], new_cores: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per core k: L_k (r'_{k-1} x r_{k-1}) and R_k (r_k x r'_k), in float64.

    Interface Grams and old/new overlaps are accumulated core by core (O(d n r^3)), so no
    interface matrix of size prod(n) is ever formed.
    """
    old = [c.detach().to(torch.float64) for c in old_cores]
    new = [c.detach().to(torch.float64) for c in new_cores]
    d = len(old)
    one = old[0].new_ones(1, 1)
    gram_l, over_l = [one], [one]  # X_<k^T X_<k and X'_<k^T X_<k
    for k in range(d - 1):
        gram_l.append(torch.einsum("ab,aic,bid->cd", gram_l[-1], old[k], old[k]))
        over_l.append(torch.einsum("ab,aic,bid->cd", over_l[-1], new[k], old[k]))
    gram_r, over_r = [one], [one]  # X_>k X_>k^T and X_>k X'_>k^T, built from the right
    for k in range(d - 1, 0, -1):
        gram_r.append(torch.einsum("cd,aic,bid->ab", gram_r[-1], old[k], old[k]))
        over_r.append(torch.einsum("cd,aic,bid->ab", over_r[-1], old[k], new[k]))
    gram_r.reverse()
    over_r.reverse()
    left = [e @ torch.linalg.pinv(g, rtol=_GRAM_RTOL, hermitian=True) for e, g in zip(over_l, gram_l)]
    right = [torch.linalg.pinv(g, rtol=_GRAM_RTOL, hermitian=True) @ e for e, g in zip(over_r, gram_r)]
    return left, right


def _state_items(state: Mapping[str, Any], old_shape: torch.Size) -> Iterator[tuple[str, Any, str]]:
    """Yield (key, value, kind) with kind 'linear', 'squared' or 'other'; reject unknown moments."""
    for key, value in state.items():
        if key in _LINEAR_KEYS:
            yield key, value, "linear"
        elif key in _SQUARED_KEYS:
            yield key, value, "squared"
        elif isinstance(value, torch.Tensor) and value.shape == old_shape and value.dim() == 3:
            raise ValueError(f"optimizer state '{key}' is shaped like the core but is not an Adam moment")
        else:
            yield key, value, "other"


def _reset_state(state: Mapping[str, Any], old_shape: torch.Size, new_shape: torch.Size) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value, kind in _state_items(state, old_shape):
        if kind != "other":
            out[key] = value.new_zeros(new_shape)
        elif key == "step":
            out[key] = torch.zeros_like(value) if isinstance(value, torch.Tensor) else 0
        else:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def _project_state(state: Mapping[str, Any], old_shape: torch.Size, left: torch.Tensor, right: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value, kind in _state_items(state, old_shape):
        if kind == "linear":
            mapped = torch.einsum("pa,aib,bq->piq", left, value.to(torch.float64), right)
        elif kind == "squared":
            rms = value.to(torch.float64).clamp_min(0).sqrt()
            mapped = torch.einsum("pa,aib,bq->piq", left.abs(), rms, right.abs()).square()
        else:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        out[key] = mapped.to(dtype=value.dtype, device=value.device)
    return out
