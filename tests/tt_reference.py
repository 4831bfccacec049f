"""Random tensor trains and dense references shared by the TT and rank-schedule tests."""

from __future__ import annotations

import torch

from metatt_deploy.tt.cores import core_shapes, tt_full

# (mode sizes, bond ranks): 3 to 6 cores, every rank attainable (r_k <= r_{k-1} n_k and
# r_k <= n_{k+1} r_{k+1}), so no orthogonalisation may shrink a bond on its own.
CASES = [
    ((3, 4, 5), (3, 4)),
    ((2, 3, 4, 3), (2, 5, 3)),
    ((4, 2, 3, 2, 3), (3, 4, 5, 3)),
    ((2, 2, 3, 2, 2, 3), (2, 4, 5, 4, 3)),
]


def random_tt(modes, ranks, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for shape in core_shapes(modes, ranks)]


def dense_error(a, b):
    return float(torch.linalg.vector_norm(tt_full(a) - tt_full(b)))


def assert_left_orthogonal(core):
    mat = core.reshape(-1, core.shape[2])
    torch.testing.assert_close(mat.T @ mat, torch.eye(mat.shape[1], dtype=mat.dtype), atol=1e-12, rtol=0)


def assert_right_orthogonal(core):
    mat = core.reshape(core.shape[0], -1)
    torch.testing.assert_close(mat @ mat.T, torch.eye(mat.shape[0], dtype=mat.dtype), atol=1e-12, rtol=0)


def interfaces(cores, k):
    """Dense X_<k (N_<k x r_{k-1}) and X_>k (r_k x N_>k), for reference gradients."""
    left = cores[0].new_ones(1, 1)
    for c in cores[:k]:
        left = torch.einsum("pa,aib->pib", left, c).reshape(-1, c.shape[2])
    right = cores[0].new_ones(1, 1)
    for c in reversed(cores[k + 1 :]):
        right = torch.einsum("aib,bq->aiq", c, right).reshape(c.shape[0], -1)
    return left, right


def core_gradient(cores, k, dT):
    """dL/dG_k for a loss whose gradient w.r.t. the tensor (as N_<k x n_k x N_>k) is dT."""
    left, right = interfaces(cores, k)
    return torch.einsum("pa,piq,bq->aib", left, dT, right)


def lowered(ranks):
    return [max(1, r - 2) for r in ranks]
