"""DMRG-inspired rank reduction of tensor trains (the MetaTT paper's rank-adaptive sweeps).

Everything here is a pure function of a list of cores (tensorly's convention, see metatt_deploy/tt/cores.py):
no module, no optimizer, no training loop. The same code therefore serves rank-adaptive
training (a sweep at scheduled epochs; training/schedule.py parses the schedule and rebuilds
AdamW's moments) and post-hoc compression of a trained adapter (`round_tt`).

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.tt.cores import tt_ranks

Direction = Literal["left-to-right", "both"]

DIRECTIONS = ("left-to-right", "both")


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
    caps: list[int | None] = [ranks] * n_bonds if isinstance(ranks, int) else list(ranks)
    if len(caps) != n_bonds:
        raise MetaTTError(f"{len(caps)} target ranks for a train with {n_bonds} bonds; pass one rank or one per bond")
    for k, cap in enumerate(caps):
        _check_rank(cap, f"bond {k}")
    return caps


# --------------------------------------------------------------------------- norms and rounding


def tt_inner(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Frobenius inner product <A, B> of two trains with equal mode sizes (any ranks), as a 0-d tensor."""
    check_same_modes(a, b)
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
    check_same_modes(a, b)
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


def check_same_modes(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    modes_a, modes_b = [c.shape[1] for c in a], [c.shape[1] for c in b]
    if modes_a != modes_b:
        raise ValueError(f"trains with different mode sizes {modes_a} and {modes_b}")
