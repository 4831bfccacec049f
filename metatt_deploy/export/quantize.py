"""Quantization of an exported graph: int8 dynamic, or static (QDQ) calibrated on real task data;
int4 weight-only for decoders.

Two forms, both with int8 weights, one scale per output channel:

- ``int8`` (dynamic, ``quantize_dynamic``): activations are quantized at run time with a scale
  taken from the tensor at hand, i.e. from the whole batch: a sentence's logits then depend on
  its batch-mates and on the padding (tools/bench_latency.py measured -0.3 points at batch 32 and
  about -1.3 at batch 64 on MiniLM).
- ``int8-static`` (``quantize_static``, QDQ format): every weight MatMul's input gets a fixed
  scale and zero point, calibrated once on real task data, so a row's logits do not depend on
  the rest of its batch. Calibration: the ``validation`` split of the task (never ``test``,
  which judges the result), ``CALIBRATION_ROWS`` rows in a fixed random order, each fed alone
  and unpadded (so padding never enters the ranges), through ONNX Runtime's ``MinMax``
  calibrator (the observed min and max of each activation). ``Percentile`` and ``Entropy``
  (``--calibration-method``) build histograms over every calibration row at once, which needs
  one shape: for them the rows are zero-padded to the longest one (masked positions then enter
  the histograms). docs/int8.md compares the three.

Only MatMuls whose second input is a weight are quantized (``MatMulConstBOnly``); attention
score products, softmax, layer norms, GELU, embeddings and the head stay float32, as in the
dynamic form. ``reduce_range`` (7-bit weights) exists for CPUs without VNNI, whose u8 x s8
AVX2 kernel saturates 16-bit intermediate sums; `default_reduce_range` picks it from the CPU's
flags, and docs/int8.md gives the measurements behind the choice.

Decoders (export/onnx_lm.py):

- ``int8`` keeps two kinds of MatMul in float32 (``DECODER_INT8_EXCLUDE``): the MLP down
  projections, whose inputs carry the outlier features of LLMs that one per-tensor activation
  scale cannot cover, and the rotary-embedding frequencies. Measured on SmolLM2-135M-Instruct:
  quantizing every MatMul turned the answer to "What is the capital of France?" into French
  gibberish (max |logit diff| 10-24 on 3 prompts); without those two kinds it answers "The
  capital of France is Paris." (2.5-4.6).
- ``int4``: weight-only 4-bit MatMulNBits, the format LLMs ship in for edge devices
  (export/int4.py).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.training.data import load_task

DECODER_ONLY = ("int4",)
# substrings of ONNX node names (optimum keeps the module path) that decoder int8 leaves in float32
DECODER_INT8_EXCLUDE = ("rotary_emb", "mlp/down_proj", "mlp/c_proj")
CALIBRATION_ROWS = 256
CALIBRATION_SPLITS = ("validation", "train")  # the first one the data has; never test
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

Feeds = Callable[[Sequence[tuple[str, ...]]], dict[str, np.ndarray]]


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo is not readable)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI_FLAGS)


def default_reduce_range(flags: set[str] | None = None) -> bool:
    """7-bit weights only where the CPU lacks VNNI (ONNX Runtime's advice for AVX2-only CPUs)."""
    return not has_vnni(flags)


def cpu_summary(flags: set[str] | None = None) -> dict[str, Any]:
    flags = cpu_flags() if flags is None else flags
    return {"flags": sorted(f for f in ("avx2", "avx512f", "avx512bw", *VNNI_FLAGS) if f in flags), "vnni": has_vnni(flags)}


@contextlib.contextmanager
def root_log_level(level: int):
    """The quantizer logs a generic "consider pre-processing" warning on the root logger: mute it."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)


def quantize_dynamic_int8(
    source: Path,
    target: Path,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    external: bool = False,
    exclude: Sequence[str] = (),
) -> dict:
    """Dynamic int8 of ``source`` into ``target``; returns the settings for the manifest.

    MatMul nodes whose names contain one of ``exclude`` stay float32 (decoders: DECODER_INT8_EXCLUDE).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = ["MatMul", "Attention"]
    graph = onnx.load(str(source), load_external_data=False).graph
    excluded = [n.name for n in graph.node if any(e in n.name for e in exclude)]
    with root_log_level(logging.ERROR):
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=op_types,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            use_external_data_format=external,
            # fused graphs hold com.microsoft ops that ONNX shape inference cannot type
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {
        **({"float32_nodes": {"patterns": list(exclude), "count": len(excluded)}} if exclude else {}),
        "method": "onnxruntime.quantization.quantize_dynamic",
        "op_types": op_types,
        "weight_type": "QInt8",
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "activations": "uint8, per tensor, quantized at run time (scale from the batch at hand)",
    }


class TextCalibrationReader:
    """ONNX Runtime CalibrationDataReader over real sentences: one row per call, unpadded unless ``padded``."""

    def __init__(self, rows: Sequence[tuple[str, ...]], feeds: Feeds, padded: bool = False):
        self._rows = list(rows)
        self._feeds = feeds
        self._iter: Iterator[tuple[str, ...]] = iter(self._rows)
        self.padded = padded
        self._width = max(self._feeds([r])["input_ids"].shape[1] for r in self._rows) if padded and self._rows else 0

    def with_padding(self) -> TextCalibrationReader:
        """The same rows, each zero-padded to the longest (attention mask 0 there): one shape for histogram calibrators."""
        return TextCalibrationReader(self._rows, self._feeds, padded=True)

    def get_next(self) -> dict[str, np.ndarray] | None:
        row = next(self._iter, None)
        if row is None:
            return None
        feeds = self._feeds([row])
        if self.padded:
            feeds = {k: np.pad(v, ((0, 0), (0, self._width - v.shape[1]))) for k, v in feeds.items()}
        return feeds

    def rewind(self) -> None:
        self._iter = iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def load_calibration_rows(
    data: str, *, max_rows: int = CALIBRATION_ROWS, text_columns: Sequence[str] | None = None, seed: int = 0
) -> tuple[list[tuple[str, ...]], str]:
    """Calibration sentences from a builtin task, Hub data set or file: (rows, where they came from).

    A task's validation split is used (its train split if it has none; never test); a file is used whole.
    """
    if max_rows < 1:
        raise MetaTTError(f"--calibration-rows is {max_rows}; give at least 1")
    path = Path(data)
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise MetaTTError(f"calibration file not found: {path}; pass a data file or a builtin task name")
        task = load_task(test=str(path), text_columns=text_columns, seed=seed)  # a file is used whole
        split = "test"
    else:
        task = load_task(dataset=data, text_columns=text_columns, seed=seed)
        split = next(s for s in CALIBRATION_SPLITS if s in task.splits)
    ds = task.splits[split].shuffle(seed=seed)
    ds = ds.select(range(min(max_rows, len(ds))))
    columns = ds.select_columns(list(task.text_columns))[:]
    rows = list(zip(*(columns[c] for c in task.text_columns)))
    return rows, f"{data} ({split} split, {len(rows)} rows)"


def down_projections(model: Path) -> list[str]:
    """Names of the MatMul nodes whose constant weight has more rows than columns (FFN outputs)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2 and shapes[n.input[1]][0] > shapes[n.input[1]][1]
    ]


def quantize_static_int8(
    source: Path,
    target: Path,
    reader: TextCalibrationReader,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    method: str = "minmax",
    fp32_down_projections: bool = True,
    external: bool = False,
) -> dict:
    """Static QDQ int8 of ``source`` into ``target``, activation ranges from ``reader``; returns the settings.

    ``fp32_down_projections`` keeps the MatMuls that project down (weight rows > columns: the FFN
    output, whose input after GELU has outliers that a fixed per-tensor scale cannot cover) in
    fp32: on MiniLM that took label agreement with fp32 from 93% to 96% and the accuracy change
    from -1.8 to +0.6 points (docs/int8.md).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise MetaTTError(f"unknown calibration method '{method}'; use one of {', '.join(CALIBRATION_METHODS)}")
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    if method != "minmax":  # ONNX Runtime's histogram collector stacks every row's activations: one shape
        reader = reader.with_padding()
    with tempfile.TemporaryDirectory(prefix="metatt-calib-") as tmp, root_log_level(logging.ERROR):
        # ONNX shape inference first (ONNX Runtime's advice; its symbolic pass fails on optimum's graphs); graph
        # optimisation is left to the session, so the file stays provider-neutral
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_optimization=True, skip_symbolic_shape=True, save_as_external_data=external)
        kept = down_projections(prepared) if fp32_down_projections else []
        quantize_static(
            prepared,
            target,
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=external,
            calibrate_method=calibrate[method],
            calibration_providers=["CPUExecutionProvider"],
            nodes_to_exclude=kept,
            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return {
        "method": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "op_types": ["MatMul (weight inputs only)"],
        "fp32_nodes": {"rule": "down projections (weight rows > columns)" if fp32_down_projections else None, "count": len(kept)},
        "weight_type": "QInt8, symmetric",
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "activations": "uint8, per tensor, fixed scale and zero point from calibration",
        "calibration": {
            "method": method,
            "rows": len(reader),
            "fed": "one row per call, zero-padded to the longest row" if reader.padded else "one unpadded row per call",
        },
    }
