"""cli/stack.py: the training verbs quiet the libraries' notes, so their summary is what a person reads."""

from __future__ import annotations

import warnings

import torch

from metatt_deploy.cli.stack import quiet_libraries


def test_tracer_notes_are_silenced_and_other_warnings_are_not() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("trace note", torch.jit.TracerWarning, stacklevel=1)
        warnings.warn("a real problem", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a real problem"]
