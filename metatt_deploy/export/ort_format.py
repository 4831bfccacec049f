"""ORT format: the ``.ort`` flatbuffer models that mobile and minimal ONNX Runtime builds load.

``convert_to_ort`` runs ONNX Runtime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``,
optimization style ``Fixed``: the graph optimisations of the converting build are applied and
baked in, which is what the CPU execution provider of a minimal build expects) on a bundle's
graph(s) and writes, next to each ``NAME.onnx``, ``NAME.ort``, plus ``required_operators.config``:
the operator list to give a reduced build (``build.sh --minimal_build --include_ops_by_config``).
Callers load every ``.ort`` back and compare it with its ``.onnx`` (export/onnx_classifier.py does).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OPERATOR_CONFIG = "required_operators.config"
ORT_STYLE = "Fixed"


def convert_to_ort(folder: Path, names: tuple[str, ...] = ("model.onnx",)) -> dict:
    """Convert ``folder/NAME`` for each name into ``folder/NAME.ort`` + the operator config; returns what was written."""
    with tempfile.TemporaryDirectory(prefix="metatt-ort-") as tmp:
        work = Path(tmp) / "in"
        work.mkdir()
        for name in names:  # the converter takes every .onnx under a folder: give it only these
            (work / name).symlink_to((folder / name).resolve())
            data = folder / f"{name}_data"
            if data.is_file():
                (work / data.name).symlink_to(data.resolve())
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work), "--output_dir", str(out)]
        command += ["--optimization_style", ORT_STYLE]
        done = subprocess.run(command, capture_output=True, text=True)
        models = sorted(p.name for p in out.glob("*.ort")) if out.is_dir() else []
        if done.returncode != 0 or len(models) != len(names) or not (out / OPERATOR_CONFIG).is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"onnxruntime's ORT format converter failed: {' | '.join(tail)}")
        for f in [*models, OPERATOR_CONFIG]:
            shutil.move(str(out / f), folder / f)
    operators = [line for line in (folder / OPERATOR_CONFIG).read_text().splitlines() if line and not line.startswith("#")]
    return {
        "models": models,
        "operator_config": OPERATOR_CONFIG,
        "operator_config_lines": len(operators),
        "optimization_style": ORT_STYLE,
        "converter": "onnxruntime.tools.convert_onnx_models_to_ort",
    }
