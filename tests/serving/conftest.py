"""Serving tests build their tiny bundles with `build_tiny_multitask` from tests/adapters/test_multitask.py;
put that folder on sys.path so a serving test file also runs on its own (not only in the whole suite)."""

from __future__ import annotations

import sys
from pathlib import Path

ADAPTER_TESTS = str(Path(__file__).resolve().parents[1] / "adapters")
if ADAPTER_TESTS not in sys.path:
    sys.path.insert(0, ADAPTER_TESTS)
