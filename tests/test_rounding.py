"""Rank reduction of tensor trains: every claim in rounding.py checked against dense tensors."""

from __future__ import annotations

import math

import pytest
import torch

from metatt_deploy.errors import MetaTTError
from metatt_deploy.rounding import (
    check_schedule,
    left_orthogonalize,
    parse_rank_schedule,
    project_adam_state,
    right_orthogonalize,
    round_tt,
    sweep,
    truncate_bond,
    tt_inner,
    tt_norm,
    tt_sub,
)
from metatt_deploy.tt import core_shapes, max_ranks, tt_full, tt_ranks

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


# --------------------------------------------------------------------------- schedules


def test_parse_rank_schedule():
    assert parse_rank_schedule("10,1:8,2:6,3:4", 3) == {0: [10] * 3, 1: [8] * 3, 2: [6] * 3, 3: [4] * 3}
    assert parse_rank_schedule(" 10/9/8 , 2 : 8/8/6 ", 3) == {0: [10, 9, 8], 2: [8, 8, 6]}
    assert parse_rank_schedule("6", 4) == {0: [6] * 4}


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "not a valid rank"),
        ("ten", "not a valid rank"),
        ("1:8,2:6", "must start with the starting rank"),
        ("10,1", "not EPOCH:RANK"),
        ("10,x:8", "not a valid epoch"),
        ("10,1:y", "not a valid rank"),
        ("10,1:-2", "not a valid rank"),
        ("10,1:0", "below 1"),
        ("10,0:8", "increasing order"),
        ("10,2:8,2:6", "increasing order"),
        ("10,3:8,2:6", "increasing order"),
        ("10,1:8/8", "one per bond"),
    ],
)
def test_parse_rank_schedule_errors(text, match):
    with pytest.raises(MetaTTError, match=match) as err:
        parse_rank_schedule(text, 3)
    assert "\n" not in str(err.value)


def test_check_schedule_normalises():
    schedule = {0: 10, 1: [8, 8, 6], 3: 4}
    assert check_schedule(schedule, [10, 10, 10], 5, [16, 24, 16]) == {0: [10] * 3, 1: [8, 8, 6], 3: [4] * 3}
    assert check_schedule({}, [10, 10, 10], 5, [16, 24, 16]) == {}


@pytest.mark.parametrize(
    "schedule,match",
    [
        ({0: 10, 1: 12}, "raises bond 1 from 10 to 12"),
        ({0: 10, 1: [8, 9, 8], 2: [8, 10, 8]}, "raises bond 2 from 9 to 10"),
        ({0: 12}, "raises"),  # above the adapter's current ranks
        ({0: 10, 5: 8}, "epoch 5"),
        ({-1: 8}, "epoch -1"),
        ({0: 10, 3: 8, 2: 6}, "increasing order"),
        ({0: 10, 1: [8, 8, 20]}, "allows ranks 1 to 16"),
        ({0: 10, 1: 0}, "allows ranks 1 to"),
        ({0: 10, 1: [8, 8]}, "one per bond"),
    ],
)
def test_check_schedule_errors(schedule, match):
    with pytest.raises(MetaTTError, match=match) as err:
        check_schedule(schedule, [10, 10, 10], 5, [16, 24, 16])
    assert "\n" not in str(err.value)


def test_check_schedule_rejects_rank_above_what_modes_allow():
    # bond 1 of modes (4, 12, 2, 8) is bounded by n_1 = 4
    bounds = max_ranks((4, 12, 2, 8))
    with pytest.raises(MetaTTError, match="bond 1 at epoch 0, but that bond allows ranks 1 to 4"):
        check_schedule(parse_rank_schedule("6,1:4", 3), [6, 6, 6], 3, bounds)


# --------------------------------------------------------------------------- optimizer state


def adam_like_state(cores, seed):
    gen = torch.Generator().manual_seed(seed)
    states = []
    for c in cores:
        m = torch.randn(c.shape, generator=gen, dtype=c.dtype)
        v = m.square() * (1 + torch.rand(c.shape, generator=gen, dtype=c.dtype))
        states.append({"step": torch.tensor(37.0), "exp_avg": m, "exp_avg_sq": v})
    return states


@pytest.mark.parametrize("modes,ranks", CASES[:3])
def test_project_maps_gradients_in_the_old_span_exactly(modes, ranks):
    old = random_tt(modes, ranks, seed=12)
    new = sweep(old, lowered(ranks)).cores
    gen = torch.Generator().manual_seed(13)
    for k in range(len(old)):
        left, right = interfaces(old, k)
        z = torch.randn(old[k].shape, generator=gen, dtype=torch.float64)
        dT = torch.einsum("pa,aib,bq->piq", left, z, right)  # a tensor gradient in the old span
        states = [{"exp_avg": torch.zeros_like(c)} for c in old]
        states[k]["exp_avg"] = core_gradient(old, k, dT)
        mapped = project_adam_state(old, new, states)[k]["exp_avg"]
        torch.testing.assert_close(mapped, core_gradient(new, k, dT), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("modes,ranks", CASES[:3])
def test_project_is_exact_for_a_pure_gauge_change(modes, ranks):
    old = random_tt(modes, ranks, seed=14)
    new = left_orthogonalize(old)
    gen = torch.Generator().manual_seed(15)
    dT = torch.randn(modes, generator=gen, dtype=torch.float64)
    states = []
    for k in range(len(old)):
        n_left = math.prod(modes[:k])
        states.append({"exp_avg": core_gradient(old, k, dT.reshape(n_left, modes[k], -1))})
    for k, state in enumerate(project_adam_state(old, new, states)):
        n_left = math.prod(modes[:k])
        expected = core_gradient(new, k, dT.reshape(n_left, modes[k], -1))
        torch.testing.assert_close(state["exp_avg"], expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("modes,ranks", CASES)
def test_project_state_shapes_signs_and_step_bound(modes, ranks):
    old = [c.float() for c in random_tt(modes, ranks, seed=16)]
    result = sweep(old, 2, direction="both")
    states = [{k: (v.float() if k != "step" else v) for k, v in s.items()} for s in adam_like_state(old, 17)]
    projected = project_adam_state(old, result.cores, states)
    for state, before, core in zip(projected, states, result.cores):
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == core.shape
        assert state["exp_avg"].dtype == torch.float32
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()
        assert (state["exp_avg_sq"] >= 0).all()
        assert state["step"] == before["step"] and state["step"] is not before["step"]
        c = float((before["exp_avg"].abs() / before["exp_avg_sq"].sqrt()).max())
        assert (state["exp_avg"].abs() <= c * state["exp_avg_sq"].sqrt() * (1 + 1e-5) + 1e-12).all()


def test_project_with_unchanged_cores_is_the_identity():
    cores = random_tt((2, 3, 4, 3), (2, 5, 3), seed=18)
    states = adam_like_state(cores, 19)
    for before, after in zip(states, project_adam_state(cores, cores, states)):
        torch.testing.assert_close(after["exp_avg"], before["exp_avg"], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(after["exp_avg_sq"], before["exp_avg_sq"], atol=1e-10, rtol=1e-10)


def test_project_with_a_zero_core_stays_finite():
    # ze-id-id-id initialisation: core 0 is zero, so the left interfaces of the others vanish
    cores = random_tt((4, 3, 2, 4), (3, 3, 3), seed=20)
    cores[0] = torch.zeros_like(cores[0])
    new = sweep(cores, 2).cores
    for state in project_adam_state(cores, new, adam_like_state(cores, 21)):
        assert torch.isfinite(state["exp_avg"]).all() and (state["exp_avg_sq"] >= 0).all()


def test_reset_state():
    old = random_tt((3, 4, 5), (3, 4), seed=22)
    new = sweep(old, 2).cores
    states = adam_like_state(old, 23)
    states[0]["max_exp_avg_sq"] = states[0]["exp_avg_sq"].clone()
    reset = project_adam_state(old, new, states, strategy="reset")
    for state, core in zip(reset, new):
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == core.shape
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        assert state["step"] == 0  # fresh moments need fresh bias correction
    assert reset[0]["max_exp_avg_sq"].shape == new[0].shape
    assert project_adam_state(old, new, [{}, {}, {}]) == [{}, {}, {}]


def test_project_state_validation():
    old = random_tt((3, 4, 5), (3, 4), seed=24)
    states = adam_like_state(old, 25)
    with pytest.raises(MetaTTError, match="strategy"):
        project_adam_state(old, old, states, strategy="keep")
    states[1]["momentum_buffer"] = torch.zeros_like(old[1])
    with pytest.raises(ValueError, match="momentum_buffer"):
        project_adam_state(old, old, states)
