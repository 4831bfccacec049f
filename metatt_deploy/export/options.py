"""What an ONNX export is asked to do, as two frozen values built once (by the CLI or a caller) and passed whole.

``ExportOptions`` gathers every choice of ``export_onnx`` that shapes the bundle (opset, variant,
int8 settings, layout, formats, threads, int4 settings, quality gate); ``Calibration`` the data
int8-static calibrates on and how. They replace an options dict and a 4-tuple that the pipeline
unpacked by position; being frozen, no stage can change what a later stage sees, and ``check``
refuses a bad combination with one line before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.int4 import Int4Options
from metatt_deploy.export.quality import QualityGate
from metatt_deploy.export.quantize import CALIBRATION_ROWS, load_calibration_rows
from metatt_deploy.inference.formats import DTYPES, QUANTIZE

LAYOUTS = ("optimum", "transformers.js")
FORMATS = ("onnx", "ort")


@dataclass(frozen=True)
class Calibration:
    """The data of ``--quantize int8-static`` (``data``: a builtin task, Hub data set or file) and how it calibrates.

    ``loaded`` fills ``texts`` and ``source`` (where the rows came from, for the manifest); the quality
    gate of every quantized export reads the same ``data``.
    """

    data: str | None = None
    max_rows: int = CALIBRATION_ROWS
    method: str = "minmax"
    fp32_down_projections: bool = True
    texts: tuple[tuple[str, ...], ...] = ()
    source: str | None = None

    def loaded(self) -> Calibration:
        if self.data is None:
            return self
        texts, source = load_calibration_rows(self.data, max_rows=self.max_rows)
        return dataclasses.replace(self, texts=tuple(texts), source=source)


@dataclass(frozen=True)
class ExportOptions:
    """Every choice of an export but its paths; defaults give a plain fp32 optimum bundle (docs/export.md)."""

    opset: int | None = None
    optimize: bool = False
    quantize: str | None = None
    dtype: str = "fp32"
    calibration: Calibration = field(default_factory=Calibration)
    per_channel: bool = True
    reduce_range: bool | None = None  # None: 7-bit weights only on CPUs without VNNI (export/quantize.py)
    layout: str = "optimum"
    formats: tuple[str, ...] = ("onnx",)
    threads: int | None = None
    int4: Int4Options = field(default_factory=Int4Options)
    gate: QualityGate = field(default_factory=QualityGate)

    def check(self) -> None:
        """One-line errors for values and combinations no export takes, before anything is loaded."""
        if self.dtype not in DTYPES:
            raise MetaTTError(f"unknown dtype '{self.dtype}'; use one of {', '.join(DTYPES)}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise MetaTTError(f"unknown quantization '{self.quantize}'; use {', '.join(QUANTIZE)}")
        if self.quantize and self.dtype != "fp32":
            raise MetaTTError("--quantize int8 and --dtype fp16 exclude each other; choose one")
        if self.quantize == "int8-static" and self.calibration.data is None:
            raise MetaTTError("--quantize int8-static needs --calibration DATA (a task or file)")
        if self.calibration.data is not None and not self.quantize:
            raise MetaTTError("--calibration applies to --quantize (int8-static ranges and the quality gate); drop it or add --quantize")
        self.int4.check()
        self.gate.check()
        if self.layout not in LAYOUTS:
            raise MetaTTError(f"unknown layout '{self.layout}'; use one of {', '.join(LAYOUTS)}")
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown or "onnx" not in self.formats:
            raise MetaTTError(f"unknown format(s) {', '.join(unknown) or '(none given)'}; use onnx, optionally with ort")
        if self.opset is not None and not 11 <= self.opset <= 25:
            raise MetaTTError(f"opset {self.opset} is out of range; use an opset between 11 and 25, or omit it for optimum's default")

    @property
    def variant(self) -> str:
        """``-opt``, ``-int8``, ``-int8-static``, ``-fp16`` and their combinations: the default bundle name's suffix."""
        fp16 = "-fp16" if self.dtype == "fp16" else ""
        return ("-opt" if self.optimize else "") + (f"-{self.quantize}" if self.quantize else "") + fp16
