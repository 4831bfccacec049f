"""int8: CPU-flag driven defaults, calibration data, and static int8 independent of batch composition."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx_fixtures import build_tiny
from tiny_models import save_tiny_bert
from transformers import AutoTokenizer

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.export.options import Calibration
from metatt_deploy.export.quantize import cpu_flags, default_reduce_range, has_vnni, load_calibration_rows

WORDS = ["good", "bad", "great", "awful", "fine", "dull", "lovely", "boring"]


@pytest.fixture(scope="module")
def static(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    tiny = build_tiny(root / "tiny")
    data = root / "calibration.jsonl"
    rows = [{"text": f"this film was {WORDS[i % 8]} and {WORDS[(i * 3) % 8]} " * (1 + i % 4), "label": str(i % 2)} for i in range(60)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny, export_onnx(tiny.merged, root / "static", quantize="int8-static", calibration=Calibration(str(data), max_rows=32))


def test_reduce_range_only_without_vnni(tmp_path) -> None:
    assert has_vnni({"avx2", "avx512_vnni"}) and has_vnni({"avx_vnni"}) and not has_vnni({"avx2", "avx512f"})
    assert default_reduce_range({"avx2"}) is True and default_reduce_range({"avx2", "avx512_vnni"}) is False
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_vnni"} and cpu_flags(str(tmp_path / "none")) == set()


def test_static_int8_manifest_and_qdq_graph(static) -> None:
    tiny, out = static
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert q["format"] == "QDQ" and q["per_channel"] is True and q["calibration"]["rows"] == 32
    assert q["fp32_nodes"]["count"] == 2  # the FFN output MatMul of each of the tiny model's 2 layers (48 -> 32)
    assert q["calibration"]["method"] == "minmax" and "calibration.jsonl" in q["calibration"]["data"]
    assert m["variant"]["quantize"] == "int8-static"  # (size: the tiny model is mostly its fp32 embeddings)
    assert m["session"]["graph_optimization_level"] == "ORT_ENABLE_ALL" and m["session"]["intra_op_num_threads"] >= 1
    import onnx

    nodes = onnx.load(str(out / "model.onnx")).graph.node
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in nodes}
    quantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    down = [n for n in nodes if n.op_type == "MatMul" and "/output/dense/" in n.name and "attention" not in n.name]
    assert len(down) == 2 and not any(i in quantized for n in down for i in n.input)  # kept fp32
    final = m["parity"]["final"]
    assert final["tolerance"] is None and final["max_abs_logit_diff"] < 0.5 * max(1.0, final["max_abs_logit"])


def test_static_int8_row_does_not_depend_on_its_batch(static) -> None:
    """The same row alone and inside a padded batch of 64 gives the same logits (fixed activation scales)."""
    tiny, out = static
    tokenizer = AutoTokenizer.from_pretrained(out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    texts = [f"a {WORDS[i % 8]} story " * (1 + i % 7) for i in range(64)]
    texts[5] = "An uneven but ultimately rewarding story."

    def run(batch):
        enc = tokenizer(batch, padding=True, return_tensors="np")
        return session.run(["logits"], {k: v.astype(np.int64) for k, v in enc.items()})[0]

    alone, inside = run([texts[5]])[0], run(texts)[5]
    assert np.abs(alone - inside).max() <= 1e-4


def test_histogram_calibration_pads_rows_to_one_shape(static, tmp_path) -> None:
    """Percentile (and Entropy) stack every row's activations: rows of different lengths are padded, not a crash."""
    tiny, _ = static
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": "a fine film " * (1 + i % 5), "label": "0"}) + "\n" for i in range(12)))
    out = export_onnx(
        tiny.merged,
        tmp_path / "pct",
        quantize="int8-static",
        calibration=Calibration(str(data), method="percentile", fp32_down_projections=False),
    )
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["calibration"]["method"] == "percentile" and q["calibration"]["fed"].startswith("one row per call, zero-padded")
    assert q["fp32_nodes"] == {"rule": None, "count": 0}  # --int8-down-projections: every weight MatMul in int8


def test_calibration_errors(tmp_path) -> None:
    with pytest.raises(MetaTTError, match="calibration file not found"):
        load_calibration_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(MetaTTError, match="at least 1"):
        load_calibration_rows("movie-sentiment", max_rows=0)
    tiny = build_tiny(tmp_path / "tiny")
    with pytest.raises(MetaTTError, match="needs --calibration"):
        export_onnx(tiny.merged, tmp_path / "out", quantize="int8-static")
    with pytest.raises(MetaTTError, match="--calibration applies to --quantize"):
        export_onnx(tiny.merged, tmp_path / "out", calibration=Calibration("movie-sentiment"))
    with pytest.raises(MetaTTError, match="unknown layout"):
        export_onnx(tiny.merged, tmp_path / "out", layout="tfjs")
    with pytest.raises(MetaTTError, match="unknown format"):
        export_onnx(tiny.merged, tmp_path / "out", formats=("onnx", "tflite"))
    assert not (tmp_path / "out").exists()


def test_static_calibration_rows_are_truncated_to_the_models_own_length(tmp_path) -> None:
    """A model with 48 positions and calibration rows of ~150 tokens: rows are cut at 48, not at the fixed 128."""
    base = tmp_path / "short"
    save_tiny_bert(base, 0, intermediate_size=64, max_position_embeddings=48, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": "a long review " * 50, "label": str(i % 2)}) + "\n" for i in range(8)))
    out = export_onnx(base, tmp_path / "static", quantize="int8-static", calibration=Calibration(str(data), max_rows=8))
    assert json.loads((out / "manifest.json").read_text())["variant"]["quantize"] == "int8-static"
