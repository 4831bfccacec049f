"""Validation of an export against its unmerged adapter: parity enforced, accuracy, latency, reports, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from onnx_fixtures import LABELLED, build_tiny, write_jsonl
from typer.testing import CliRunner

from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.kinds import validate
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.export.onnx_classifier import FP32_ATOL
from metatt_deploy.export.validate import REPORT_JSON, REPORT_MD, report_paths

FAST = dict(batch_sizes=(1, 2), seq_len=16, repeats=3, warmup=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {
        "fp32": export_onnx(tiny.merged, root / "fp32"),
        "int8": export_onnx(tiny.merged, root / "int8", quantize="int8"),
        "base": export_onnx(tiny.base, root / "base"),  # the base model without the adapter
        # the base model again, its manifest claiming the adapter (as `export BASE --adapter A` writes)
        "claimed": export_onnx(tiny.base, root / "claimed", adapter_dir=tiny.adapter),
    }


@pytest.fixture
def labelled(tmp_path):
    return write_jsonl(tmp_path / "held_out.jsonl", [{"text": t, "label": y} for t, y in LABELLED])


def test_fp32_parity_accuracy_latency_and_reports(tiny, exports, labelled, tmp_path):
    out = tmp_path / "report"
    report = validate(tiny.adapter, exports["fp32"], data=str(labelled), output=out, **FAST)
    parity = report["parity"]
    assert parity["enforced"] and parity["passed"] and parity["tolerance"] == FP32_ATOL
    assert parity["max_abs_logit_diff"] <= FP32_ATOL and parity["label_agreement"] == 1.0
    assert parity["max_abs_logit"] > 0.1
    assert report["data"]["examples"] == len(LABELLED) and report["data"]["labelled"]
    assert report["accuracy"]["pytorch"] == report["accuracy"]["onnx"]
    assert report["adapter_matches_manifest"] is True
    rows = report["latency"]["results"]
    assert {(r["runtime"].split()[0], r["batch"]) for r in rows} == {("pytorch", 1), ("onnxruntime", 1), ("pytorch", 2), ("onnxruntime", 2)}
    assert all(r["repeats"] == 3 and 0 < r["p50_ms"] <= r["p95_ms"] for r in rows)
    assert [s["batch"] for s in report["latency"]["speedups"]] == [1, 2]
    assert json.loads((out / REPORT_JSON).read_text())["parity"] == parity
    md = (out / REPORT_MD).read_text()
    assert "| max abs logit diff |" in md and "| runtime | device | batch | p50 ms | p95 ms |" in md


def test_int8_against_reference_reports_accuracy_change_and_speedup(tiny, exports, labelled, tmp_path):
    report = validate(tiny.adapter, exports["int8"], data=str(labelled), reference_onnx=exports["fp32"], output=tmp_path, **FAST)
    assert report["parity"]["enforced"] is False and report["parity"]["tolerance"] is None
    assert report["variant"]["quantize"] == "int8" and report["reference_variant"]["quantize"] is None
    acc = report["accuracy"]
    assert acc["change_vs_reference_points"] == pytest.approx(100 * (acc["onnx"] - acc["reference_onnx"]))
    assert 0 <= report["versus_reference"]["label_agreement"] <= 1
    assert all("onnx_vs_reference" in s for s in report["latency"]["speedups"])


def test_parity_failure_is_reported_then_raised(tiny, exports, tmp_path):
    """The base model's export is not the adapter's: without provenance it is refused before any
    work; with a manifest that claims the adapter, parity fails, the report says so."""
    with pytest.raises(MetaTTError, match="does not record which adapter"):
        validate(tiny.adapter, exports["base"], output=tmp_path, **FAST)
    assert not (tmp_path / REPORT_JSON).exists()
    with pytest.raises(MetaTTError, match="differ from the unmerged adapter"):
        validate(tiny.adapter, exports["claimed"], output=tmp_path, **FAST)
    report = json.loads((tmp_path / REPORT_JSON).read_text())
    parity = report["parity"]
    assert parity["passed"] is False and parity["max_abs_logit_diff"] > FP32_ATOL
    assert parity["export_vs_base_max_abs"] < 1e-5 and parity["relative_to_adapter_effect"] == pytest.approx(1.0, abs=1e-3)


def test_unlabelled_data_and_refusal_to_overwrite(tiny, exports, tmp_path):
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t, _ in LABELLED[:3]])
    out = tmp_path / "report"
    report = validate(tiny.adapter, exports["fp32"], data=str(data), output=out, **FAST)
    assert report["accuracy"] is None and report["data"]["examples"] == 3
    with pytest.raises(MetaTTError, match="already exists.*--force"):
        validate(tiny.adapter, exports["fp32"], data=str(data), output=out, **FAST)
    validate(tiny.adapter, exports["fp32"], data=str(data), output=out, force=True, **FAST)


def test_user_errors(tiny, exports, tmp_path):
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "x", "label": "spam"}, {"text": "y", "label": "ham"}])
    with pytest.raises(MetaTTError, match="not the adapter's"):
        validate(tiny.adapter, exports["fp32"], data=str(wrong), output=tmp_path, **FAST)
    with pytest.raises(MetaTTError, match="data file not found"):
        validate(tiny.adapter, exports["fp32"], data=str(tmp_path / "missing.jsonl"), output=tmp_path, **FAST)
    with pytest.raises(MetaTTError, match="not an ONNX export"):
        validate(tiny.adapter, tiny.merged, output=tmp_path, **FAST)
    with pytest.raises(MetaTTError, match="adapter directory not found"):
        validate(tmp_path / "nope", exports["fp32"], output=tmp_path, **FAST)
    with pytest.raises(MetaTTError, match="batch sizes"):
        validate(tiny.adapter, exports["fp32"], output=tmp_path, **{**FAST, "batch_sizes": (0,)})


def test_cli_validate(tiny, exports, labelled, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(tiny.adapter), str(tmp_path / "missing")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    result = runner.invoke(app, ["validate", str(tiny.adapter), str(exports["fp32"]), "--batch-sizes", "1,x"])
    assert result.exit_code == 2 and "--batch-sizes" in result.output
    result = runner.invoke(
        app,
        [
            "validate",
            str(tiny.adapter),
            str(exports["fp32"]),
            "--data",
            str(labelled),
            "-o",
            str(tmp_path / "r"),
            "--batch-sizes",
            "1",
            "--seq-len",
            "16",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "tolerance 1e-04" in result.output and "accuracy: PyTorch" in result.output
    assert f"data: {labelled}: all {len(LABELLED)} examples" in result.output
    assert "validate: logits: 1/1 batches (100%)" in result.output and "validate: latency: 1/1 batch sizes (100%)" in result.output
    assert (tmp_path / "r" / REPORT_MD).is_file()


def test_files_are_used_whole_unless_a_subset_is_asked_for_and_then_it_is_said(tiny, exports, labelled, tmp_path):
    report = validate(tiny.adapter, exports["fp32"], data=str(labelled), output=tmp_path / "all", **FAST)
    assert (report["data"]["examples"], report["data"]["available"], report["data"]["subset"]) == (6, 6, False)
    assert "all 6 examples" in (tmp_path / "all" / REPORT_MD).read_text()
    notes: list[str] = []
    report = validate(tiny.adapter, exports["fp32"], data=str(labelled), max_examples=4, output=tmp_path / "some", log=notes.append, **FAST)
    assert (report["data"]["examples"], report["data"]["available"], report["data"]["subset"]) == (4, 6, True)
    assert notes == [f"data: {labelled}: a random 4 of 6 examples (--max-examples; omit it to use all)"]
    assert "a random 4 of 6 examples (--max-examples)" in (tmp_path / "some" / REPORT_MD).read_text()
    again = validate(tiny.adapter, exports["fp32"], data=str(labelled), max_examples=4, output=tmp_path / "some", force=True, **FAST)
    assert again["parity"]["max_abs_logit_diff"] == report["parity"]["max_abs_logit_diff"]  # a fixed subset


def test_reports_go_beside_the_bundle_not_into_it(tiny, exports, tmp_path):
    bundle = tmp_path / "exported" / "mt"
    shutil.copytree(exports["fp32"], bundle)
    before = sorted(p.name for p in bundle.iterdir())
    validate(tiny.adapter, bundle, **FAST)
    assert report_paths(bundle) == (tmp_path / "exported" / "mt.validation.json", tmp_path / "exported" / "mt.validation.md")
    assert all(p.is_file() for p in report_paths(bundle)) and sorted(p.name for p in bundle.iterdir()) == before
    assert report_paths(bundle, tmp_path / "r") == (tmp_path / "r" / REPORT_JSON, tmp_path / "r" / REPORT_MD)


# ------------------------------------------------------------------ issue 10: provenance (relative parity: tests/export/test_parity.py)


def test_an_export_of_another_adapter_is_refused_before_any_work(tiny, exports, tmp_path):
    other = build_tiny(tmp_path / "other", seed=1)
    with pytest.raises(MetaTTError, match="was made from another adapter"):
        validate(other.adapter, exports["fp32"], output=tmp_path / "r", **FAST)
    assert not (tmp_path / "r").exists()
    with pytest.raises(MetaTTError, match="the input"):
        validate(tiny.adapter, exports["fp32"], output=tiny.adapter, **FAST)


def test_a_seq_len_past_the_position_table_is_capped_not_a_traceback(tiny, exports, labelled, tmp_path):
    """The tiny BERT has 128 positions: --seq-len 600 times (and truncates) at 128, and says so."""
    said: list[str] = []
    options = {**FAST, "seq_len": 600, "batch_sizes": (1,)}
    report = validate(tiny.adapter, exports["fp32"], data=str(labelled), output=tmp_path / "r", log=said.append, **options)
    assert report["parity"]["passed"] and report["latency"]["settings"]["seq_len"] == 128
    assert any("--seq-len 600 exceeds the model's 128 tokens; using 128" in line for line in said)
