"""Plain functional tensor-train routines (tensorly's conventions).

A tensor train is a list of 3-way cores; core k has shape ``(r_{k-1}, n_k, r_k)`` with
``r_0 = r_d = 1``. Everything here is a pure function of the cores, so the same code serves
training (the adapter modules), rank truncation, merging and the tests' dense references.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from metatt_deploy.common.errors import MetaTTError

INIT_KINDS = ("ze", "id", "no")
NORMAL_STD = 0.2


def core_shapes(mode_sizes: Sequence[int], ranks: Sequence[int]) -> list[tuple[int, int, int]]:
    """Shapes of the cores for modes ``n_1..n_d`` and inner bond ranks ``r_1..r_{d-1}``."""
    if len(ranks) != len(mode_sizes) - 1:
        raise MetaTTError(
            f"{len(mode_sizes)} modes need {len(mode_sizes) - 1} bond ranks, got {len(ranks)}; "
            "pass one rank (used for every bond) or one per bond"
        )
    full = [1, *ranks, 1]
    return [(full[k], n, full[k + 1]) for k, n in enumerate(mode_sizes)]


def max_ranks(mode_sizes: Sequence[int]) -> list[int]:
    """The largest useful rank of each bond: min(prod of modes left of it, prod right of it).

    A bond rank above this bound adds parameters but cannot add expressiveness, and the SVD of
    a rank-adaptive sweep could never fill it, so it is rejected up front.
    """
    out = []
    for k in range(1, len(mode_sizes)):
        out.append(min(math.prod(mode_sizes[:k]), math.prod(mode_sizes[k:])))
    return out


def check_ranks(mode_names: Sequence[str], mode_sizes: Sequence[int], ranks: Sequence[int]) -> None:
    """Reject ranks below 1 or above what the adjacent modes allow, naming the bond."""
    for k, (r, bound) in enumerate(zip(ranks, max_ranks(mode_sizes)), start=1):
        if r < 1 or r > bound:
            raise MetaTTError(
                f"rank {r} of bond {k} (between modes '{mode_names[k - 1]}' and '{mode_names[k]}') "
                f"must be between 1 and {bound}, the most the modes around it allow; lower --rank"
            )


def init_core(kind: str, shape: tuple[int, int, int], position: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """One core initialised as the paper's ``ze`` (zeros), ``id`` (identity) or ``no`` (normal).

    ``id`` means: for a middle core every slice ``G[:, i, :]`` is a (rectangular) identity, so
    the chain of middle cores multiplies to the identity; for the first core (``position ==
    "first"``) the ``(n_1, r_1)`` matrix ``G[0]`` is a rectangular identity and for the last core
    the ``(r_{d-1}, n_d)`` matrix ``G[..., 0]`` is. Taking the identity slice-wise on a boundary
    core would instead give a rank-one factor (every row the same unit vector), which starves
    all but one direction of gradient.
    """
    r0, n, r1 = shape
    if kind == "ze":
        return torch.zeros(shape)
    if kind == "no":
        return torch.randn(shape, generator=generator) * NORMAL_STD
    if kind != "id":
        raise MetaTTError(f"unknown core initialisation '{kind}'; use one of {', '.join(INIT_KINDS)}")
    if position == "first":
        return torch.eye(n, r1).unsqueeze(0)
    if position == "last":
        return torch.eye(r0, n).unsqueeze(-1)
    return torch.eye(r0, r1).unsqueeze(1).expand(r0, n, r1).clone()


def parse_init(init: str, n_cores: int) -> list[str]:
    """Split an init string like ``ze-id-id-id`` into one kind per core, checking its length."""
    kinds = init.split("-")
    if len(kinds) != n_cores or any(k not in INIT_KINDS for k in kinds):
        raise MetaTTError(
            f"init '{init}' must name {n_cores} cores with {'/'.join(INIT_KINDS)}, e.g. {'-'.join(['ze'] + ['id'] * (n_cores - 1))}"
        )
    return kinds


def init_cores(init: str, shapes: Sequence[tuple[int, int, int]], seed: int = 0) -> list[torch.Tensor]:
    """All cores of a TT, initialised per core from an init string (seeded, reproducible)."""
    kinds = parse_init(init, len(shapes))
    gen = torch.Generator().manual_seed(seed)
    last = len(shapes) - 1
    return [
        init_core(kind, shape, "first" if k == 0 else "last" if k == last else "middle", gen)
        for k, (kind, shape) in enumerate(zip(kinds, shapes))
    ]


def tt_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract a TT into its full tensor of shape ``(n_1, ..., n_d)`` (for tests and small TTs)."""
    out = cores[0]  # (1, n1, r1)
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([-1], [0]))
    return out.squeeze(0).squeeze(-1)


def chain(slices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Product of matrices left to right (the slices of consecutive cores at fixed indices)."""
    out = slices[0]
    for s in slices[1:]:
        out = out @ s
    return out


def parameter_count(mode_sizes: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of entries of all cores: sum of r_{k-1} * n_k * r_k."""
    return sum(a * n * b for a, n, b in core_shapes(mode_sizes, ranks))


def tt_ranks(cores: Iterable[torch.Tensor]) -> list[int]:
    """The inner bond ranks of a TT, read off its cores (a list, or a module's ParameterList)."""
    return [c.shape[-1] for c in list(cores)[:-1]]
