"""Parity: how far an exported graph's logits are from the PyTorch model's, and whether that is close enough.

Every parity figure of the exporters and validators comes from here, so they all measure the same
thing and fail the same way:

- ``max_abs_diff`` is NaN-safe: a NaN anywhere gives NaN (Python's ``max`` over a list keeps or
  drops a NaN depending on where it sits), and a NaN figure fails every gate (``within``), since
  NaN compares false with everything.
- The export gates judge against float64 as well as float32 PyTorch. PyTorch float32 rounds too:
  on one adapter it was the farther of the two from a float64 run (1.25e-4, against 7.8e-5 for ONNX
  Runtime), so judging ONNX against float32 alone refused a correct graph at a 1.1e-4 tolerance.
  A graph passes when it is within the tolerance of either reference: of float64 (the exact
  answer, up to float32 rounding of the graph itself) or of float32 (what the gate always accepted).
  A graph that computes something else is far from both, and the failure names both distances and
  the float32 reference's own distance from float64, so the reader sees whether rounding can explain it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from metatt_deploy.common.errors import MetaTTError

# the hint of an fp32 graph that fails: off from float64 PyTorch too, it computes something else than the model
GRAPH_HINT = "the graph computes something else than the model: look for optimum's warnings about this model type, then try another --opset"


@dataclass(frozen=True)
class References:
    """The reference outputs of the parity inputs: float32 PyTorch, and float64 PyTorch where it was run."""

    float32: list[np.ndarray]
    float64: list[np.ndarray] | None = None


def reference_logits(model: Any, run: Callable[[Any, Any], Any], inputs: Sequence[Any]) -> References:
    """``run(model, input)`` (a PyTorch forward returning logits) on every input in float32, then again in float64.

    ``model`` is converted to float64 in place for the second pass (a deep copy would double the
    memory of a large model): callers drop it afterwards. Integer inputs (token ids, masks) are unchanged.
    """
    import torch

    def logits() -> list[np.ndarray]:
        with torch.no_grad():
            return [run(model, x).detach().numpy() for x in inputs]

    float32 = logits()
    model.double()
    return References(float32, logits())


def max_abs(arrays: Iterable[np.ndarray]) -> float:
    """The largest |value| over ``arrays``; NaN if any value is NaN."""
    peaks = [float(np.max(np.abs(a))) for a in arrays if np.size(a)]
    return float(np.max(peaks)) if peaks else 0.0


def max_abs_diff(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> float:
    """The largest |output - reference| over pairs of arrays (computed in float64); NaN if any difference is NaN."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs against {len(references)} references")
    return max_abs(np.asarray(o, np.float64) - np.asarray(r, np.float64) for o, r in zip(outputs, references))


def label_agreement(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> tuple[float, int]:
    """The share of rows whose argmax agrees, and the number of rows."""
    agree = sum(int((np.asarray(o).argmax(-1) == np.asarray(r).argmax(-1)).sum()) for o, r in zip(outputs, references))
    total = sum(len(r) for r in references)
    return (agree / total if total else 1.0), total


def logit_parity(
    outputs: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    reference64: Sequence[np.ndarray] | None = None,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """The parity figures of ``outputs`` against the float32 ``reference`` (and the float64 one, where given).

    ``max_abs_logit_diff`` is always against float32 (the figure manifests have recorded since the
    first export); ``max_abs_diff_float64`` and ``reference_float32_vs_float64`` are added with
    ``reference64``. ``tolerance`` None: reported only (quantized graphs, judged by the quality gate).
    """
    fields: dict[str, Any] = {"max_abs_logit_diff": max_abs_diff(outputs, reference), "max_abs_logit": max_abs(reference)}
    if reference64 is not None:
        fields["max_abs_diff_float64"] = max_abs_diff(outputs, reference64)
        fields["reference_float32_vs_float64"] = max_abs_diff(reference, reference64)
    fields["tolerance"] = tolerance
    return fields


def within(parity: dict[str, Any]) -> bool:
    """Within the tolerance of the float32 or of the float64 reference; False on any NaN figure."""
    tolerance = parity["tolerance"]
    if tolerance is None:
        return bool(np.isfinite(parity["max_abs_logit_diff"]))
    to64 = parity.get("max_abs_diff_float64")
    return bool(parity["max_abs_logit_diff"] <= tolerance or (to64 is not None and to64 <= tolerance))


def describe(parity: dict[str, Any]) -> str:
    """The distances of a parity record in words, for failure messages: both references where both were run."""
    diff, tolerance = parity["max_abs_logit_diff"], parity["tolerance"]
    if not np.isfinite(diff):
        return "NaN or Inf logits"
    tol = "" if tolerance is None else f", tolerance {tolerance:.3g}"
    if parity.get("max_abs_diff_float64") is None:
        return f"max |logit diff| {diff:.3g}{tol}"
    rounding = parity["reference_float32_vs_float64"]
    cause = "float32 rounding cannot explain it" if tolerance is not None and rounding < tolerance else "float32 rounding is of that size"
    return (
        f"max |logit diff| {parity['max_abs_diff_float64']:.3g} from float64 PyTorch and {diff:.3g} from float32 PyTorch{tol}; "
        f"PyTorch float32 itself is {rounding:.3g} from float64, so {cause}"
    )


def enforce(parity: dict[str, Any], what: str, hint: str) -> None:
    """Raise a one-line error unless ``within(parity)``; ``hint`` says what to do about it."""
    if not within(parity):
        raise MetaTTError(f"{what} differs from the PyTorch model ({describe(parity)}); {hint}")


def parity_figures(pt: np.ndarray, ox: np.ndarray, base: np.ndarray, tolerance: float | None) -> dict:
    """Parity of the export ``ox`` with the adapter ``pt``, absolute and relative to the adapter's
    own effect ``|pt - base|`` (base: the same model with the adapter's update off).

    Fails on any NaN/Inf, above ``tolerance`` (when enforced), and, for enforced variants, when
    the export is closer to the base than to the adapter: an export that lost the update
    (judged only where the update moves the logits by more than a hundredth of the tolerance).
    """
    figures = logit_parity([ox], [pt], tolerance=tolerance)
    max_diff = figures["max_abs_logit_diff"]
    effect, to_base = max_abs_diff([pt], [base]), max_abs_diff([ox], [base])
    finite = bool(np.isfinite(pt).all() and np.isfinite(ox).all())
    # below a hundredth of the tolerance the update is within float noise: nothing can tell
    # export-with from export-without, and provenance (check_provenance) is the only check
    measurable = tolerance is not None and effect > tolerance / 100
    closer_to_base = measurable and to_base < max_diff
    failure = None
    if not finite:
        failure = "NaN or Inf logits"
    elif not within(figures):
        failure = describe(figures)
    elif closer_to_base:
        failure = f"the export is closer to the base model (max |diff| {to_base:.3g}) than to the adapter ({max_diff:.3g})"
    return {
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": float(np.abs(pt - ox).mean()),
        "max_abs_logit": figures["max_abs_logit"],
        "tolerance": tolerance,
        "enforced": tolerance is not None,
        "adapter_effect_max_abs": effect,
        "relative_to_adapter_effect": max_diff / effect if effect > 0 else None,
        "export_vs_base_max_abs": to_base,
        "closer_to_base": closer_to_base,
        "passed": failure is None,
        "failure": failure,
        "label_agreement": float((pt.argmax(-1) == ox.argmax(-1)).mean()),
        "reference": "PyTorch eager, base model + unmerged adapter, float32, CPU",
    }
