"""The one parity function: NaN-safe figures, and a gate judged against float64 as well as float32 PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.onnx_classifier import FP32_ATOL
from metatt_deploy.export.parity import enforce, logit_parity, max_abs_diff, parity_figures, reference_logits, within

TOL = 1.1e-4


def test_a_graph_closer_to_float64_than_float32_pytorch_passes() -> None:
    """Issue 27/10: PyTorch float32 was 1.25e-4 from a float64 run, ONNX Runtime 7.8e-5 (the other way): a correct graph."""
    exact = np.linspace(-3.0, 3.0, 12).reshape(3, 4)
    torch32 = exact.copy()
    torch32[1, 2] += 1.25e-4
    ort = exact.copy()
    ort[1, 2] -= 7.8e-5
    parity = logit_parity([ort], [torch32], [exact], TOL)
    assert parity["max_abs_logit_diff"] == pytest.approx(2.03e-4)  # judged against float32 alone it would fail
    assert parity["max_abs_diff_float64"] == pytest.approx(7.8e-5)
    assert parity["reference_float32_vs_float64"] == pytest.approx(1.25e-4)
    assert within(parity)
    enforce(parity, "the fp32 ONNX export", "hint")
    assert not within(logit_parity([ort], [torch32], None, TOL))  # the old gate's verdict on the same numbers


def test_a_graph_far_from_both_references_fails_with_both_distances() -> None:
    exact = np.zeros((2, 3))
    torch32 = exact + 1e-6
    wrong = exact + np.array([0.0, 3e-3, 0.0])
    with pytest.raises(MetaTTError) as e:
        enforce(logit_parity([wrong], [torch32], [exact], TOL), "the fp32 ONNX export", "look again")
    message = str(e.value)
    assert "0.003 from float64 PyTorch and 0.003 from float32 PyTorch" in message
    assert "PyTorch float32 itself is 1e-06 from float64, so float32 rounding cannot explain it); look again" in message
    assert "\n" not in message


@pytest.mark.parametrize("tolerance", [TOL, None])
def test_nan_fails_wherever_it_sits_even_when_only_reported(tolerance: float | None) -> None:
    """Python's max() over [0.1, nan] is 0.1: the figure must stay NaN, and NaN must fail."""
    ref = [np.zeros(3), np.zeros(3)]
    out = [np.array([0.0, 1e-6, 0.0]), np.array([np.nan, 0.0, 0.0])]
    assert np.isnan(max_abs_diff(out, ref)) and np.isnan(max_abs_diff(out[::-1], ref[::-1]))
    parity = logit_parity(out, ref, ref, tolerance)
    assert not within(parity)
    with pytest.raises(MetaTTError, match=r"differs from the PyTorch model \(NaN or Inf logits\); hint"):
        enforce(parity, "the export", "hint")


def test_reported_only_parity_passes_finite_figures_and_mismatched_lengths_are_a_bug() -> None:
    assert within(logit_parity([np.ones(2)], [np.zeros(2)], tolerance=None))
    with pytest.raises(ValueError, match="2 outputs against 1 references"):
        max_abs_diff([np.ones(2), np.ones(2)], [np.ones(2)])


def test_reference_logits_runs_float64_on_the_same_inputs() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    inputs = [torch.randn(4, 8), torch.randn(1, 8)]
    weight, bias = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    refs = reference_logits(model, lambda m, x: m(x.to(m.weight.dtype)), inputs)
    assert refs.float32[0].dtype == np.float32 and refs.float64 is not None and refs.float64[0].dtype == np.float64
    for x, r64 in zip(inputs, refs.float64):
        np.testing.assert_allclose(r64, x.double().numpy() @ weight.T + bias, rtol=0, atol=1e-12)  # numpy float64, independent
    assert 0 < max_abs_diff(refs.float32, refs.float64) < 1e-5


# ------------------------------------------------------------------ validate: parity relative to the adapter's own effect (issue 10)


def test_parity_figures_relative_to_the_adapters_effect():
    base = np.zeros((4, 2), dtype=np.float32)
    pt = base + np.float32(5e-5)  # an adapter that moves the logits by less than the 1e-4 tolerance
    honest = validation_figures(pt, pt + np.float32(1e-7), base)
    assert honest["passed"] and honest["relative_to_adapter_effect"] == pytest.approx(2e-3, rel=0.1)
    lost = validation_figures(pt, base.copy(), base)  # an export without the update: within 1e-4, yet wrong
    assert lost["max_abs_logit_diff"] < FP32_ATOL and lost["closer_to_base"] and not lost["passed"]
    assert "closer to the base model" in lost["failure"]
    nan = validation_figures(pt, np.full_like(pt, np.nan), base)
    assert not nan["passed"] and nan["failure"] == "NaN or Inf logits"
    assert not parity_figures(pt, np.full_like(pt, np.nan), base, None)["passed"]  # int8: reported only, but NaN fails
    zero = validation_figures(base, base.copy(), base)  # a fresh (zero) adapter: nothing to tell apart, passes
    assert zero["passed"] and zero["relative_to_adapter_effect"] is None


def validation_figures(pt, ox, base):
    return parity_figures(pt, ox, base, FP32_ATOL)
