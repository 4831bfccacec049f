"""Rank reduction of tensor trains: every claim in rounding.py checked against dense tensors."""

from __future__ import annotations

import math

import pytest
import torch
from tt_reference import CASES, assert_left_orthogonal, assert_right_orthogonal, dense_error, lowered, random_tt

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.tt.cores import tt_full, tt_ranks
from metatt_deploy.tt.rounding import (
    left_orthogonalize,
    right_orthogonalize,
    round_tt,
    sweep,
    truncate_bond,
    tt_inner,
    tt_norm,
    tt_sub,
)

# --------------------------------------------------------------------------- orthogonalisation


@pytest.mark.parametrize("modes,ranks", CASES)
def test_orthogonalisation_keeps_the_tensor(modes, ranks):
    cores = random_tt(modes, ranks)
    full = tt_full(cores)
    left = left_orthogonalize(cores)
    right = right_orthogonalize(cores)
    torch.testing.assert_close(tt_full(left), full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tt_full(right), full, atol=1e-12, rtol=1e-12)
    for core in left[:-1]:
        assert_left_orthogonal(core)
    for core in right[1:]:
        assert_right_orthogonal(core)
    partial = left_orthogonalize(cores, upto=1)
    assert_left_orthogonal(partial[0])
    assert all(a is b for a, b in zip(partial[2:], cores[2:]))  # untouched cores are shared
    assert tt_ranks(left) == tt_ranks(right) == list(ranks)


def test_orthogonalisation_drops_only_redundant_rank():
    # bond 2 has rank 10 > r_1 * n_2 = 8: no basis of 10 orthonormal columns exists
    cores = random_tt((4, 4, 4, 4), (2, 10, 2))
    left = left_orthogonalize(cores)
    assert tt_ranks(left) == [2, 8, 2]
    torch.testing.assert_close(tt_full(left), tt_full(cores), atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("modes,ranks", CASES)
@pytest.mark.parametrize("target", ["two", "lowered"])
def test_sweep_error_is_exactly_the_discarded_singular_values(modes, ranks, target):
    cores = random_tt(modes, ranks, seed=1)
    caps = 2 if target == "two" else lowered(ranks)
    result = sweep(cores, caps)
    predicted = math.sqrt(sum(float(s.square().sum()) for s in result.discarded))
    actual = dense_error(cores, result.cores)
    assert actual > 1e-3 * result.norm  # a real truncation, not a vacuous check
    assert math.isclose(actual, predicted, rel_tol=1e-10)
    assert math.isclose(result.error_bound, predicted, rel_tol=1e-12)
    assert math.isclose(result.norm, float(torch.linalg.vector_norm(tt_full(cores))), rel_tol=1e-12)
    expected = [min(r, c) for r, c in zip(ranks, [caps] * len(ranks) if isinstance(caps, int) else caps)]
    assert result.ranks_before == list(ranks)
    assert result.ranks_after == expected
    for k, core in enumerate(result.cores[:-1]):
        assert_left_orthogonal(core)
        assert len(result.kept[k]) == expected[k]
        # fewer when an earlier truncation already shrank the two-site matrix below r_k
        assert len(result.discarded[k]) <= ranks[k] - expected[k]
    both = sweep(cores, caps, direction="both")
    torch.testing.assert_close(tt_full(both.cores), tt_full(result.cores), atol=1e-12, rtol=1e-10)
    assert math.isclose(both.error_bound, result.error_bound, rel_tol=1e-12)
    for core in both.cores[1:]:
        assert_right_orthogonal(core)


@pytest.mark.parametrize("modes,ranks", CASES)
def test_sweep_to_current_or_higher_ranks_changes_nothing(modes, ranks):
    cores = random_tt(modes, ranks, seed=2)
    for caps in (None, list(ranks), [r + 3 for r in ranks], 100):
        result = sweep(cores, caps)
        torch.testing.assert_close(tt_full(result.cores), tt_full(cores), atol=1e-12, rtol=1e-10)
        assert all(s.numel() == 0 for s in result.discarded)
        assert result.ranks_after == result.ranks_before == list(ranks)
        assert result.error_bound == 0.0


def test_sweep_of_zero_padded_train_is_exact():
    modes = (3, 4, 2, 5)
    small = random_tt(modes, (2, 2, 2), seed=3)
    padded = []
    for core in small:
        r0, n, r1 = core.shape
        big = core.new_zeros(1 if r0 == 1 else 5, n, 1 if r1 == 1 else 5)
        big[:r0, :, :r1] = core
        padded.append(big)
    assert tt_ranks(padded) == [5, 5, 5]
    result = sweep(padded, 2)
    assert result.ranks_after == [2, 2, 2]
    assert dense_error(padded, result.cores) <= 1e-12 * result.norm
    assert result.error_bound <= 1e-12 * result.norm


def test_both_directions_remove_ranks_later_bonds_cannot_support():
    cores = random_tt((3, 4, 2, 3), (3, 6, 3), seed=4)
    one_way = sweep(cores, [3, 6, 1])
    both = sweep(cores, [3, 6, 1], direction="both")
    assert one_way.ranks_after == [3, 6, 1]
    assert both.ranks_after == [3, 2, 1]  # n_3 * r_3 = 2 bounds bond 2 once bond 3 is 1
    torch.testing.assert_close(tt_full(both.cores), tt_full(one_way.cores), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("modes,ranks", CASES)
@pytest.mark.parametrize("relative,bound", [(True, 0.3), (True, 0.05), (False, 2.0)])
def test_error_bound_mode_respects_and_uses_its_budget(modes, ranks, relative, bound):
    cores = random_tt(modes, ranks, seed=5)
    result = sweep(cores, max_discarded=bound, relative=relative)
    budget = bound * (result.norm if relative else 1.0)
    per_bond = budget / math.sqrt(len(ranks))
    assert dense_error(cores, result.cores) <= budget * (1 + 1e-10)
    for kept, dropped in zip(result.kept, result.discarded):
        tail = float(dropped.square().sum())
        assert math.sqrt(tail) <= per_bond * (1 + 1e-12)
        if len(kept) > 1:  # dropping one more value would have broken this bond's share
            assert math.sqrt(tail + float(kept[-1]) ** 2) > per_bond
    if bound == 0.3:
        assert result.ranks_after != list(ranks)


def test_truncate_bond_alone():
    cores = right_orthogonalize(random_tt((3, 4, 5), (3, 4), seed=6))
    out, dropped = truncate_bond(cores, 0, max_rank=2)
    assert tt_ranks(out) == [2, 4]
    assert math.isclose(dense_error(cores, out), float(dropped.norm()), rel_tol=1e-10)
    out, dropped = truncate_bond(cores, 0, tol=float("inf"))
    assert tt_ranks(out) == [1, 4] and len(dropped) == 2


def test_sweep_validation():
    cores = random_tt((3, 4, 5), (3, 4))
    with pytest.raises(MetaTTError, match="2 bonds"):
        sweep(cores, [2, 2, 2])
    with pytest.raises(MetaTTError, match="below 1"):
        sweep(cores, [2, 0])
    with pytest.raises(MetaTTError, match="below 1"):
        sweep(cores, 0)
    with pytest.raises(MetaTTError, match="max_discarded"):
        sweep(cores, max_discarded=-0.1)
    with pytest.raises(MetaTTError, match="direction"):
        sweep(cores, 2, direction="right-to-left")


# --------------------------------------------------------------------------- norms and rounding


@pytest.mark.parametrize("modes,ranks", CASES)
def test_inner_norm_and_difference_against_dense(modes, ranks):
    a = random_tt(modes, ranks, seed=7)
    b = random_tt(modes, lowered(ranks), seed=8)
    fa, fb = tt_full(a), tt_full(b)
    assert math.isclose(float(tt_inner(a, b)), float((fa * fb).sum()), rel_tol=1e-10)
    assert math.isclose(float(tt_norm(a)), float(torch.linalg.vector_norm(fa)), rel_tol=1e-12)
    torch.testing.assert_close(tt_full(tt_sub(a, b)), fa - fb, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError):
        tt_inner(a, random_tt((*modes[:-1], modes[-1] + 1), ranks))


@pytest.mark.parametrize("modes,ranks", CASES)
def test_round_tt_reports_the_dense_relative_error(modes, ranks):
    cores = random_tt(modes, ranks, seed=9)
    new, rel = round_tt(cores, 2)
    dense = dense_error(cores, new) / float(torch.linalg.vector_norm(tt_full(cores)))
    assert rel > 1e-3
    assert math.isclose(rel, dense, rel_tol=1e-9)
    assert max(tt_ranks(new)) <= 2


def test_round_tt_error_of_tiny_truncation_is_not_lost_to_cancellation():
    # a rank-2 train plus a 1e-9 rank-1 perturbation: the error is 1e-9 relative, far below
    # the 1e-8 that ||a||^2 - 2<a,b> + ||b||^2 can resolve in float64
    base = random_tt((4, 5, 6), (2, 2), seed=10)
    bump = [c * 1e-3 for c in random_tt((4, 5, 6), (1, 1), seed=11)]
    cores = tt_sub(base, bump)
    new, rel = round_tt(cores, 2)
    dense = dense_error(cores, new) / float(torch.linalg.vector_norm(tt_full(cores)))
    assert 0 < dense < 1e-7
    assert math.isclose(rel, dense, rel_tol=1e-4)
