"""DMRG-inspired rank reduction of tensor trains (the MetaTT paper's rank-adaptive sweeps).

Everything here is a pure function of a list of cores (tensorly's convention, see ``tt.py``):
no module, no optimizer, no training loop. The same code therefore serves rank-adaptive
training (a sweep at scheduled epochs, then `project_adam_state` to rebuild AdamW's moments)
and post-hoc compression of a trained adapter (`round_tt`).

The central fact this module relies on, and the tests check: if the train is first made
right-orthogonal and then truncated bond by bond from left to right with two-site SVDs, every
step is an orthogonal projection of the whole tensor, the projections are nested, and so

    ||T - T'||_F**2 == sum over bonds of the squared discarded singular values

exactly (not just as an upper bound). The error of a sweep is thus known without ever
forming the full tensor.

The functions do not detach: call them on ``param.detach()`` or under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import MetaTTError
from .tt import tt_ranks

Direction = Literal["left-to-right", "both"]
Strategy = Literal["project", "reset"]

DIRECTIONS = ("left-to-right", "both")
STRATEGIES = ("project", "reset")
SCHEDULE_SYNTAX = (
    "write START[,EPOCH:RANK]..., e.g. '10,1:8,2:6,3:4' (epochs count from 0; "
    "a rank may be given per bond as 8/8/6)"
)
# Relative cut-off for the pseudo-inverse of interface Gram matrices (float64): their
# condition number is the square of the interfaces', so this tolerates interfaces with a
# condition number up to about 1e6 and treats anything flatter (zero-padded ranks, a zero
# core) as absent instead of amplifying round-off.
_GRAM_RTOL = 1e-12

# Adam state entries mapped like a gradient (linear) and like a squared gradient.
_LINEAR_KEYS = ("exp_avg",)
_SQUARED_KEYS = ("exp_avg_sq", "max_exp_avg_sq")


# --------------------------------------------------------------------------- orthogonalisation


def left_orthogonalize(cores: Sequence[torch.Tensor], upto: int | None = None) -> list[torch.Tensor]:
    """Make cores ``0 .. upto-1`` left-orthogonal by QR, pushing each R into the next core.

    Afterwards core ``upto`` (default: the last) carries the whole norm of the tensor, and the
    cores before it form an orthonormal basis of the left interface, which is what makes local
    SVDs at ``upto`` globally optimal. The represented tensor is unchanged. A bond rank above
    ``r_{k-1} * n_k`` cannot be left-orthogonal; the reduced QR drops it to that size, which
    loses nothing (those directions were linearly dependent). Untouched cores are shared with
    the input list, nothing is modified in place.
    """
    last = len(cores) - 1
    upto = last if upto is None else upto
    if not 0 <= upto <= last:
        raise ValueError(f"upto={upto} is not a core index of a train with {len(cores)} cores")
    out = list(cores)
    for k in range(upto):
        out[k], out[k + 1] = _qr_left(out[k], out[k + 1])
    return out


def right_orthogonalize(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Make cores ``1 .. d-1`` right-orthogonal by QR (from the right), the norm ending in core 0.

    This is the starting point of a left-to-right sweep: with everything right of bond k
    orthonormal, the two-site SVD at bond k sees the singular values of the whole tensor's
    unfolding. As in `left_orthogonalize`, a rank above ``n_k * r_k`` shrinks losslessly.
    """
    out = list(cores)
    for k in range(len(out) - 1, 0, -1):
        out[k - 1], out[k] = _qr_right(out[k - 1], out[k])
    return out


def _qr_left(core: torch.Tensor, nxt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r0, n, r1 = core.shape
    q, r = torch.linalg.qr(core.reshape(r0 * n, r1))
    return q.reshape(r0, n, q.shape[1]), torch.tensordot(r, nxt, dims=([1], [0]))


def _qr_right(prev: torch.Tensor, core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r0, n, r1 = core.shape
    q, r = torch.linalg.qr(core.reshape(r0, n * r1).T)
    return torch.tensordot(prev, r.T, dims=([2], [0])), q.T.reshape(q.shape[1], n, r1)


# --------------------------------------------------------------------------- truncation


def truncate_bond(
    cores: Sequence[torch.Tensor], k: int, max_rank: int | None = None, tol: float | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One two-site step at bond ``k`` (between cores k and k+1); returns (cores, discarded).

    Cores k and k+1 are merged into a ``(r_{k-1} n_k, n_{k+1} r_{k+1})`` matrix and SVD'd; at
    most ``max_rank`` leading singular values are kept, and with ``tol`` the longest tail whose
    Frobenius norm ``sqrt(sum s_i**2)`` is ``<= tol`` is dropped too (at least one value always
    stays). U becomes core k (left-orthogonal), ``diag(S) V^T`` core k+1. The rank never grows:
    singular values beyond the current ``r_k`` are round-off and are neither kept nor reported.

    The returned discarded values equal the change of the whole tensor only when the train is
    in mixed-canonical form around the bond (cores < k left-, cores > k+1 right-orthogonal),
    which `sweep` arranges; on an arbitrary train this is a local truncation.
    """
    if not 0 <= k < len(cores) - 1:
        raise ValueError(f"bond {k} does not exist in a train with {len(cores)} cores")
    _check_rank(max_rank, f"bond {k}")
    if tol is not None and tol < 0:
        raise MetaTTError(f"truncation tolerance {tol} is negative; pass a tolerance >= 0")
    out = list(cores)
    out[k], out[k + 1], _, discarded = _two_site_svd(out[k], out[k + 1], max_rank, tol)
    return out, discarded


def _two_site_svd(
    left: torch.Tensor, right: torch.Tensor, max_rank: int | None, tol: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of two neighbouring cores: (new left, new right, kept, discarded)."""
    r0, n0, r = left.shape
    _, n1, r2 = right.shape
    theta = torch.tensordot(left, right, dims=([2], [0])).reshape(r0 * n0, n1 * r2)
    u, s, vh = torch.linalg.svd(theta, full_matrices=False)
    s = s[: min(s.numel(), r)]
    keep = s.numel()
    if max_rank is not None:
        keep = min(keep, max_rank)
    if tol is not None:
        keep = min(keep, _smallest_rank_within(s, tol))
    new_left = u[:, :keep].reshape(r0, n0, keep)
    new_right = (s[:keep, None] * vh[:keep]).reshape(keep, n1, r2)
    return new_left, new_right, s[:keep], s[keep:]


def _smallest_rank_within(s: torch.Tensor, tol: float) -> int:
    """Smallest rank >= 1 whose discarded tail of ``s`` (descending) has norm <= tol."""
    sq = s.square()
    tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])  # tail[j] = sum_{i>=j}
    return int(torch.nonzero(tail[1:] <= tol * tol)[0]) + 1


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did, per bond, so callers can log and check it without a dense tensor."""

    cores: list[torch.Tensor]
    discarded: list[torch.Tensor]  # per bond: singular values dropped (empty: nothing lost)
    kept: list[torch.Tensor]  # per bond: singular values kept in the left-to-right pass
    ranks_before: list[int]
    ranks_after: list[int]
    norm: float  # ||T||_F of the input
    error_bound: float  # ||T - T'||_F: sqrt of the sum of all squared discarded values

    @property
    def relative_error_bound(self) -> float:
        """``error_bound / norm`` (0 for a zero tensor, which every truncation keeps exactly)."""
        return self.error_bound / self.norm if self.norm > 0 else 0.0


def sweep(
    cores: Sequence[torch.Tensor],
    ranks: Sequence[int] | int | None = None,
    *,
    max_discarded: float | None = None,
    relative: bool = True,
    direction: Direction = "left-to-right",
) -> SweepResult:
    """Reduce bond ranks by one DMRG-style two-site SVD sweep; the error is known exactly.

    The train is first made right-orthogonal, then truncated bond by bond from left to right,
    so each step is the optimal (Eckart-Young) truncation of the whole tensor at that bond given
    the earlier ones, and ``error_bound`` is the exact Frobenius error (up to round-off).

    ``ranks`` caps every bond (an int) or each bond (one per bond); a cap at or above a bond's
    current rank leaves it alone - ranks are never raised or padded. ``max_discarded`` bounds
    the total error, relative to ``||T||_F`` (``relative=True``) or absolute; it is split as
    ``max_discarded / sqrt(d-1)`` per bond, TT-SVD style, so the total stays within it while
    every bond drops as much as its share allows. Rank caps are hard: with both, a cap may
    force more error than ``max_discarded``, which ``error_bound`` then reports.

    ``direction="both"`` adds a right-to-left QR pass. It discards nothing; it returns the
    orthogonality centre (and the tensor's scale) to core 0, where ``ze-id-id-id``
    initialisation keeps it, and drops ranks that later truncations left unsupportable
    (``r_k > n_{k+1} r_{k+1}``), so the result has minimal shapes for its tensor.
    """
    n_bonds = len(cores) - 1
    caps = _bond_caps(ranks, n_bonds)
    if max_discarded is not None and not max_discarded >= 0:
        raise MetaTTError(f"max_discarded={max_discarded} must be >= 0; pass an error bound such as 0.01")
    if direction not in DIRECTIONS:
        raise MetaTTError(f"unknown sweep direction '{direction}'; use one of {', '.join(DIRECTIONS)}")

    out = right_orthogonalize(cores)
    norm = float(torch.linalg.vector_norm(out[0]))
    tol = None
    if max_discarded is not None and n_bonds > 0:
        tol = max_discarded * (norm if relative else 1.0) / math.sqrt(n_bonds)
    kept, discarded = [], []
    for k in range(n_bonds):
        out[k], out[k + 1], s_kept, s_dropped = _two_site_svd(out[k], out[k + 1], caps[k], tol)
        kept.append(s_kept)
        discarded.append(s_dropped)
    if direction == "both":
        out = right_orthogonalize(out)
    error = math.sqrt(sum(float(s.square().sum()) for s in discarded))
    return SweepResult(
        cores=out,
        discarded=discarded,
        kept=kept,
        ranks_before=tt_ranks(cores),
        ranks_after=tt_ranks(out),
        norm=norm,
        error_bound=error,
    )


def _check_rank(rank: int | None, where: str) -> None:
    if rank is not None and rank < 1:
        raise MetaTTError(f"target rank {rank} for {where} is below 1; every bond needs rank >= 1")


def _bond_caps(ranks: Sequence[int] | int | None, n_bonds: int) -> list[int | None]:
    """One cap per bond (None: no cap) from an int, a per-bond list or None."""
    if ranks is None:
        return [None] * n_bonds
    caps = [ranks] * n_bonds if isinstance(ranks, int) else list(ranks)
    if len(caps) != n_bonds:
        raise MetaTTError(
            f"{len(caps)} target ranks for a train with {n_bonds} bonds; pass one rank or one per bond"
        )
    for k, cap in enumerate(caps):
        _check_rank(cap, f"bond {k}")
    return caps


# --------------------------------------------------------------------------- norms and rounding


def tt_inner(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Frobenius inner product <A, B> of two trains with equal mode sizes (any ranks), as a 0-d tensor."""
    _check_same_modes(a, b)
    env = a[0].new_ones(1, 1)
    for ca, cb in zip(a, b):
        env = torch.einsum("ab,aic,bid->cd", env, ca, cb)
    return env.reshape(())


def tt_norm(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Frobenius norm of a train, as a 0-d tensor.

    Computed by left-orthogonalisation (the norm ends up in the last core) rather than as
    ``sqrt(tt_inner(a, a))``: QR is backward stable, so the norm of a *difference* of two close
    trains (see `round_tt`) stays accurate instead of drowning in cancellation.
    """
    return torch.linalg.vector_norm(left_orthogonalize(cores)[-1])


def tt_sub(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The train of ``A - B``: block cores of rank ``r_a + r_b`` (never formed densely)."""
    _check_same_modes(a, b)
    if len(a) == 1:
        return [a[0] - b[0]]
    out = [torch.cat([a[0], b[0]], dim=2)]
    for ca, cb in zip(a[1:-1], b[1:-1]):
        (ra0, n, ra1), (rb0, _, rb1) = ca.shape, cb.shape
        block = ca.new_zeros(ra0 + rb0, n, ra1 + rb1)
        block[:ra0, :, :ra1] = ca
        block[ra0:, :, ra1:] = cb
        out.append(block)
    out.append(torch.cat([a[-1], -b[-1]], dim=0))
    return out


def round_tt(cores: Sequence[torch.Tensor], max_rank: Sequence[int] | int) -> tuple[list[torch.Tensor], float]:
    """Post-hoc compression to ``max_rank``: (new cores, true relative Frobenius error).

    The error is measured, not predicted: ``||T - T'|| / ||T||`` of the returned cores (in
    their own dtype, evaluated in float64) via the difference train, without the full tensor.
    Uses ``direction="both"``, so the shapes are minimal.
    """
    new = sweep(cores, max_rank, direction="both").cores
    ref64 = [c.detach().to(torch.float64) for c in cores]
    new64 = [c.detach().to(torch.float64) for c in new]
    norm = float(tt_norm(ref64))
    if norm == 0:
        return new, 0.0
    return new, float(tt_norm(tt_sub(ref64, new64))) / norm


def _check_same_modes(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    modes_a, modes_b = [c.shape[1] for c in a], [c.shape[1] for c in b]
    if modes_a != modes_b:
        raise ValueError(f"trains with different mode sizes {modes_a} and {modes_b}")


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
            f"rank schedule '{text}': '{item}' gives {len(parts)} ranks; give one rank or "
            f"{n_bonds} (one per bond) separated by '/'"
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
                f"rank schedule names epoch {epoch}, but the run has epochs 0 to {epochs - 1}; "
                "drop that reduction or train for more epochs"
            )
        if last_epoch is not None and epoch <= last_epoch:
            raise MetaTTError(
                f"rank schedule lists epoch {epoch} after epoch {last_epoch}; list epochs in increasing order"
            )
        per_bond = [ranks] * n_bonds if isinstance(ranks, int) else list(ranks)
        if len(per_bond) != n_bonds:
            raise MetaTTError(
                f"rank schedule gives {len(per_bond)} ranks at epoch {epoch} for {n_bonds} bonds; "
                "give one rank or one per bond"
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
    _check_same_modes(old_cores, new_cores)
    if strategy == "reset":
        return [_reset_state(s, o.shape, n.shape) for s, o, n in zip(states, old_cores, new_cores)]
    left_maps, right_maps = _covector_maps(old_cores, new_cores)
    return [
        _project_state(s, o.shape, left, right)
        for s, o, left, right in zip(states, old_cores, left_maps, right_maps)
    ]


def _covector_maps(
    old_cores: Sequence[torch.Tensor], new_cores: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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


def _project_state(
    state: Mapping[str, Any], old_shape: torch.Size, left: torch.Tensor, right: torch.Tensor
) -> dict[str, Any]:
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
