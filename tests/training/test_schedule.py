"""training/schedule.py: the --rank-schedule syntax and checks, and AdamW moments across a rank cut."""

from __future__ import annotations

import math

import pytest
import torch
from tt_reference import CASES, core_gradient, interfaces, lowered, random_tt

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.training.schedule import check_schedule, parse_rank_schedule, project_adam_state
from metatt_deploy.tt.cores import max_ranks
from metatt_deploy.tt.rounding import left_orthogonalize, sweep

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
