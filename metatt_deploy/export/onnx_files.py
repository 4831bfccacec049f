"""The ONNX graph file of an export bundle: its size, its opset and input/output names, whether its weights live beside it, and
swapping in a rewritten graph (optimised, quantised) without ever leaving a half-written one; and the library versions
that manifests and validation reports record.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from metatt_deploy import __version__
from metatt_deploy.inference.formats import ONNX_NAME


def library_versions() -> dict[str, str]:
    """Versions of this package and of every library an export or a validation ran on."""
    out = {"metatt_deploy": __version__}
    for dist in ("onnx", "onnxruntime", "onnxruntime-gpu", "optimum", "optimum-onnx", "transformers", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist.replace("-", "_")] = metadata.version(dist)
    return out


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


def graph_fields(model_path: Path) -> dict[str, Any]:
    """The manifest's opset, input and output names, read from the graph (not its weights)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False)
    return {
        "opset": next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": [i.name for i in graph.graph.input],
        "outputs": [o.name for o in graph.graph.output],
    }
