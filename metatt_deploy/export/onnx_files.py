"""The ONNX graph file of an export bundle: its size, whether its weights live beside it, and
swapping in a rewritten graph (optimised, quantised) without ever leaving a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metatt_deploy.inference.formats import ONNX_NAME


def model_bytes(folder: Path) -> int:
    """Bytes of the graph and its external data files."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(ONNX_NAME))


def has_external_data(folder: Path) -> bool:
    return any(p.name != ONNX_NAME and p.name.startswith(ONNX_NAME) for p in folder.iterdir())


def replace_model(folder: Path, write: Callable[[Path], Any]) -> Any:
    """Run ``write(path)`` into a stage folder, swap the staged graph (and its data) in; returns what ``write`` returned."""
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=folder))
    try:
        result = write(stage / ONNX_NAME)
        for old in [p for p in folder.iterdir() if p.is_file() and p.name.startswith(ONNX_NAME)]:
            old.unlink()
        for new in stage.iterdir():
            os.replace(new, folder / new.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result
