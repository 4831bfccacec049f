"""metatt_deploy.export.validate_lm: a tiny decoder's fp32 and int4 bundles against the unmerged adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_decoders import save_tiny_adapter
from typer.testing import CliRunner

from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.export.validate_lm import REPORT_JSON, REPORT_MD, REPORT_PNG, validate_decoder


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    _, adapter_dir = save_tiny_adapter(root, "llama")
    fp32 = export_onnx(adapter_dir, root / "fp32")
    int4 = export_onnx(adapter_dir, root / "int4", quantize="int4")
    rows = [
        {"prompt": f"Review: this was {w} today", "response": "positive" if i % 2 else "negative"}
        for i, w in enumerate(["good", "bad"] * 3)
    ]
    data = root / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return adapter_dir, fp32, int4, data


def test_decoder_validation_reports_parity_quality_and_latency(bundles, tmp_path: Path) -> None:
    adapter_dir, fp32, int4, data = bundles
    report = validate_decoder(
        adapter_dir, fp32, data=str(data), compare=[int4], prompt_lengths=(8, 16), new_tokens=4, repeats=1, output=tmp_path / "r"
    )
    p, q = report["parity"], report["quality"]
    assert p["enforced"] and p["passed"] and p["max_abs_logit_diff"] <= 1e-4 and p["greedy_identical"] == 1.0 and p["prompts"] == 6
    assert q["bundles"]["fp32"]["exact_match"] == q["pytorch"]["exact_match"]
    assert abs(q["bundles"]["fp32"]["perplexity"] - q["pytorch"]["perplexity"]) < 1e-3 * q["pytorch"]["perplexity"]
    assert set(q["bundles"]) == {"fp32", "int4"} and "perplexity_change" in q["bundles"]["int4"]
    runtimes = [r["runtime"] for r in report["latency"]["rows"]]
    assert runtimes == ["pytorch-unmerged", "pytorch-merged", "onnx-fp32", "onnx-int4"]
    row = report["latency"]["rows"][2]
    assert row["ttft_8_ms"] > 0 and row["ttft_16_ms"] > 0 and row["decode_tokens_per_s"] > 0 and row["decode_vs_onnx_fp32"] == 1.0
    assert {REPORT_JSON, REPORT_MD, REPORT_PNG} <= {f.name for f in (tmp_path / "r").iterdir()}
    assert "greedy generation token-identical: 100.0%" in (tmp_path / "r" / REPORT_MD).read_text()


def test_cli_validates_a_decoder_and_refuses_bad_input(bundles, tmp_path: Path) -> None:
    adapter_dir, fp32, _, data = bundles
    args = ["validate", str(adapter_dir), str(fp32), "--data", str(data), "--prompt-lengths", "8", "--new-tokens", "3", "--repeats", "1"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "greedy tokens identical on 100%" in result.output and "tokens/s" in result.output
    result = CliRunner().invoke(app, [*args[:3], "-o", str(tmp_path / "none")])
    assert result.exit_code == 2 and "needs held-out prompts with answers" in result.output
    with pytest.raises(MetaTTError, match="exceed the model's context"):
        validate_decoder(adapter_dir, fp32, data=str(data), prompt_lengths=(600,), output=tmp_path / "long")
