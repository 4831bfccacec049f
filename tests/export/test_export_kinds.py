"""metatt_deploy.export.kinds: each model gets its kind's pipeline and validation, an option its kind does not take is
refused in one line before anything is written, and both kinds check the adapter's weights sha256 and report beside the bundle."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from onnx_fixtures import build_tiny, write_jsonl
from tiny_decoders import save_tiny_adapter
from typer.testing import CliRunner

from metatt_deploy.adapters.model_kinds import MODEL_KINDS
from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.kinds import (
    CLASSIFIER_EXPORT,
    DECODER_EXPORT,
    EXPORT_KINDS,
    bundle_kind,
    export_kind_named,
    source_kind,
    validate,
)
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.export.options import Calibration
from metatt_deploy.export.peft import to_peft
from metatt_deploy.export.validate import report_paths
from metatt_deploy.inference.formats import CAUSAL_LM, CLASSIFICATION, MANIFEST_NAME

CLASSIFIER_FAST = dict(batch_sizes=(1,), seq_len=16, repeats=2, warmup=1)
DECODER_FAST = dict(prompt_lengths=(8,), new_tokens=3, repeats=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A classifier (base, adapter, merged) and a decoder (base, adapter), with an fp32 export of each adapter and held-out data."""
    root = tmp_path_factory.mktemp("kinds")
    tiny = build_tiny(root / "classifier")
    decoder_base, decoder_adapter = save_tiny_adapter(root / "decoder", "llama")
    rows = [
        {"prompt": f"Review: this was {w} today", "response": "positive" if i % 2 else "negative"}
        for i, w in enumerate(["good", "bad"] * 3)
    ]
    return {
        "classifier": (tiny.adapter, export_onnx(tiny.adapter, root / "classifier-onnx"), {**CLASSIFIER_FAST}),
        "decoder": (decoder_adapter, export_onnx(decoder_adapter, root / "decoder-onnx"), {**DECODER_FAST}),
        "classifier_base": tiny.base,
        "classifier_merged": tiny.merged,
        "decoder_base": decoder_base,
        "decoder_data": write_jsonl(root / "held.jsonl", rows),
        "root": root,
    }


def test_every_model_kind_has_one_export_kind_with_its_own_pipeline() -> None:
    assert [export_kind_named(m.name).model for m in MODEL_KINDS] == list(MODEL_KINDS)
    assert len({k.pipeline for k in EXPORT_KINDS}) == len({k.name for k in EXPORT_KINDS}) == len(EXPORT_KINDS)
    assert (CLASSIFIER_EXPORT.name, DECODER_EXPORT.name) == (CLASSIFICATION, CAUSAL_LM)
    with pytest.raises(MetaTTError, match="no export kind for task type 'regression'"):
        export_kind_named("regression")


def test_each_kind_is_chosen_for_its_model_and_its_bundle(models, tmp_path: Path) -> None:
    """Adapters by what they record (a decoder's PEFT form by PEFT's task_type), model folders by their architectures,
    bundles by their manifest's pipeline_task; the pipeline that ran is the kind's (its manifest's pipeline_task)."""
    assert source_kind(models["classifier"][0]) is CLASSIFIER_EXPORT
    assert source_kind(models["classifier_merged"]) is source_kind(models["classifier_base"]) is CLASSIFIER_EXPORT
    assert source_kind(models["decoder"][0]) is source_kind(models["decoder_base"]) is DECODER_EXPORT
    assert source_kind(to_peft(models["decoder"][0], tmp_path / "peft")) is DECODER_EXPORT
    for name, kind in (("classifier", CLASSIFIER_EXPORT), ("decoder", DECODER_EXPORT)):
        bundle = models[name][1]
        assert bundle_kind(bundle) is kind
        assert json.loads((bundle / MANIFEST_NAME).read_text())["pipeline_task"] == kind.pipeline
    bare = tmp_path / "bare"  # an ONNX folder written without a manifest: the classifier, as before manifests had a pipeline_task
    bare.mkdir()
    (bare / "model.onnx").write_bytes((models["classifier"][1] / "model.onnx").read_bytes())
    assert bundle_kind(bare) is CLASSIFIER_EXPORT


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("classifier_merged", {"quantize": "int4"}, "--quantize int4 does not apply to a classifier export"),
        ("decoder", {"optimize": True}, "--optimize does not apply to a decoder export"),
        ("decoder", {"dtype": "fp16"}, "--dtype fp16 does not apply to a decoder export"),
        ("decoder", {"layout": "transformers.js", "formats": ("onnx", "ort")}, "--layout transformers.js, --format ort do not apply"),
        # refused before its calibration file (which does not exist) is read
        ("decoder", {"quantize": "int8-static", "calibration": Calibration("no-such.jsonl")}, "--quantize int8-static does not apply"),
    ],
)
def test_an_export_option_the_kind_does_not_take_is_refused_in_one_line_before_anything_is_written(
    models, tmp_path: Path, model: str, options: dict, message: str
) -> None:
    source = models[model][0] if isinstance(models[model], tuple) else models[model]
    with pytest.raises(MetaTTError, match=f"^{message}") as e:
        export_onnx(source, tmp_path / "out", **options)
    assert "\n" not in str(e.value) and "; drop " in str(e.value)
    assert os.listdir(tmp_path) == []  # no bundle, no lock, no temporary merge folder


def test_the_cli_refuses_an_export_option_of_the_other_kind_with_exit_2(models, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(models["decoder"][0]), "-o", str(tmp_path / "out"), "--optimize"])
    assert result.exit_code == 2 and "--optimize does not apply to a decoder export" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_validation_option_the_kind_does_not_take_is_refused_in_one_line_before_any_work(models, tmp_path: Path) -> None:
    adapter, bundle, _ = models["classifier"]
    with pytest.raises(MetaTTError, match=r"^--compare, --new-tokens do not apply to a classifier export .*drop them") as e:
        validate(adapter, bundle, output=tmp_path / "r", compare=[bundle], new_tokens=4)
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()
    args = ["validate", str(adapter), str(bundle), "-o", str(tmp_path / "r"), "--prompt-lengths", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--prompt-lengths does not apply to a classifier export" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["classifier", "decoder"])
def test_both_kinds_check_the_adapters_weights_and_report_beside_the_bundle(models, tmp_path: Path, name: str) -> None:
    adapter, bundle, fast = models[name]
    data = {"data": str(models["decoder_data"])} if name == "decoder" else {}
    other = shutil.copytree(adapter, tmp_path / "other")  # one weight changed: its sha256 no longer matches the export's
    weights = other / "metatt_adapter.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(MetaTTError, match="was made from another adapter"):
        validate(other, bundle, output=tmp_path / "r", **data, **fast)
    assert not (tmp_path / "r").exists()

    copy = shutil.copytree(bundle, tmp_path / "exported" / name)
    before = sorted(p.name for p in copy.iterdir())
    report = validate(adapter, copy, **data, **fast)
    assert report["parity"]["passed"] and sorted(p.name for p in copy.iterdir()) == before
    json_path, md_path = report_paths(copy)
    assert json_path.parent == md_path.parent == copy.parent and json_path.is_file() and md_path.is_file()
    assert json.loads(json_path.read_text())["parity"] == report["parity"]


def test_an_adapter_of_the_other_kind_is_refused_in_one_line_before_any_work(models, tmp_path: Path) -> None:
    (classifier, classifier_bundle, _), (decoder, decoder_bundle, _) = models["classifier"], models["decoder"]
    with pytest.raises(MetaTTError, match=f"^{classifier} is a classifier's adapter and {decoder_bundle} a decoder export"):
        validate(classifier, decoder_bundle, data=str(models["decoder_data"]), output=tmp_path / "r")
    with pytest.raises(MetaTTError, match=f"^{decoder} is a decoder's adapter and {classifier_bundle} a classifier export"):
        validate(decoder, classifier_bundle, output=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_task_on_a_merged_model_is_refused_not_ignored(models, tmp_path: Path) -> None:
    """--task picks a task of an adapter; a merged model has one, so the option would silently do nothing."""
    with pytest.raises(MetaTTError, match="is a merged model of one task: drop --task"):
        export_onnx(models["classifier_merged"], tmp_path / "out", task="anything")
    assert os.listdir(tmp_path) == []
