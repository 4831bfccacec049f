"""ORT format: .ort model + operator config written, loaded back, equal to the .onnx graph."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
from onnx_fixtures import build_tiny
from transformers import AutoTokenizer

from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.export.onnx_classifier import FP32_ATOL
from metatt_deploy.export.ort_format import OPERATOR_CONFIG


def test_export_format_ort_and_transformers_js_layout(tmp_path) -> None:
    tiny = build_tiny(tmp_path / "tiny")
    out = export_onnx(tiny.merged, tmp_path / "out", formats=("onnx", "ort"), layout="transformers.js")
    m = json.loads((out / "manifest.json").read_text())
    assert m["ort_format"]["models"] == ["model.ort"] and (out / OPERATOR_CONFIG).is_file()
    assert "ai.onnx;" in (out / OPERATOR_CONFIG).read_text() and m["ort_format"]["operator_config_lines"] >= 3
    assert m["ort_format"]["parity_vs_onnx"]["model.ort"]["max_abs_logit_diff"] <= FP32_ATOL
    # loaded back independently: the .ort file gives the .onnx graph's logits
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = {k: v.astype(np.int64) for k, v in tokenizer(["great film", "dull, slow and long"], padding=True, return_tensors="np").items()}
    cpu = ["CPUExecutionProvider"]
    a = ort.InferenceSession(str(out / "model.ort"), providers=cpu).run(["logits"], enc)[0]
    b = ort.InferenceSession(str(out / "model.onnx"), providers=cpu).run(["logits"], enc)[0]
    assert np.abs(a - b).max() <= FP32_ATOL
    # Transformers.js layout: the fp32 graph and an int8 one under onnx/, plus the tokenizer and config
    tjs = m["transformers_js"]
    assert tjs["files"] == ["onnx/model.onnx", "onnx/model_quantized.onnx"] and tjs["quantized_form"] == "int8"
    assert tjs["parity"]["model.onnx"]["max_abs_logit_diff"] <= FP32_ATOL
    assert all((out / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json", *tjs["files"]))
    assert m["web"]["graph"] == "../onnx/model.onnx" and (out / "web" / "index.html").is_file()
