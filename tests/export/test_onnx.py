"""ONNX export: parity enforced and recorded, optimiser fusions, int8/fp16 variants, manifest, errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_fixtures import build_tiny
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from metatt_deploy.adapters.base_model import resolve_model
from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export import onnx_classifier as export_module
from metatt_deploy.export.onnx import export_onnx, sha256_file
from metatt_deploy.export.onnx_classifier import FP32_ATOL, SAMPLE_SENTENCES
from metatt_deploy.inference.formats import MANIFEST_NAME


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory):
    return export_onnx(tiny.merged, tmp_path_factory.mktemp("exports") / "fp32")


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def ort_logits(folder: Path, texts: list[str]) -> np.ndarray:
    from optimum.onnxruntime import ORTModelForSequenceClassification

    model = ORTModelForSequenceClassification.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(texts, padding=True, return_tensors="pt")
    return model(**enc).logits.detach().numpy()


def torch_logits(folder: Path, texts: list[str]) -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()


def test_fp32_export_parity_manifest_and_ort_loading(tiny, fp32):
    m = manifest(fp32)
    assert {p.name for p in fp32.iterdir()} >= {"model.onnx", "config.json", "tokenizer.json", MANIFEST_NAME}
    # parity is measured, recorded and within the fp32 bound, both for the raw graph and as served
    for key in ("fp32_export", "final"):
        parity = m["parity"][key]
        assert parity["max_abs_logit_diff"] <= FP32_ATOL == parity["tolerance"]
        assert parity["label_agreement"] == 1.0 and parity["examples"] == len(SAMPLE_SENTENCES) + 1
        assert parity["max_abs_logit"] > 0.1  # the tiny model's logits are not all ~0: the bound means something
        # judged against float64 PyTorch too: both distances and the float32 reference's own rounding are recorded
        assert 0 < parity["reference_float32_vs_float64"] < FP32_ATOL and parity["max_abs_diff_float64"] <= FP32_ATOL
    assert m["parity"]["final"]["loaded_with"].endswith("ORTModelForSequenceClassification")
    # provenance: adapter (from metatt_merge.json), base model, versions, opset, hashes
    assert m["adapter"]["path"] == str(tiny.adapter.resolve()) and m["adapter"]["method"] == "metatt-4d"
    assert m["adapter"]["weights_sha256"] == sha256_file(tiny.adapter / "metatt_adapter.safetensors")
    assert m["base_model"] == str(tiny.base) and m["base_fingerprint"] and m["task"] == "default"
    assert m["source"]["kind"] == "merged" and m["variant"] == {"dtype": "fp32", "optimize": False, "quantize": None}
    assert isinstance(m["opset"], int) and m["inputs"][:2] == ["input_ids", "attention_mask"]
    assert {"onnx", "onnxruntime", "optimum", "transformers", "torch"} <= set(m["versions"])
    for name, entry in m["files"].items():
        assert sha256_file(fp32 / name) == entry["sha256"]
    # independent check: optimum's runtime class loads the bundle and matches PyTorch
    texts = ["great movie", "a long and boring film that never ends"]
    assert np.abs(ort_logits(fp32, texts) - torch_logits(tiny.merged, texts)).max() <= FP32_ATOL


def test_optimize_keeps_parity_and_records_fused_nodes(tiny, tmp_path):
    out = export_onnx(tiny.merged, tmp_path / "opt", optimize=True)
    m = manifest(out)
    fused = m["fused_nodes"]
    assert fused["Attention"] + fused["MultiHeadAttention"] == 2
    assert fused["SkipLayerNormalization"] == 4 and fused["EmbedLayerNormalization"] == 1
    assert fused["Gelu"] + fused["FastGelu"] + fused["BiasGelu"] == 2 and fused["complete"] is True
    assert m["optimizer"]["model_type"] == "bert" and m["optimizer"]["num_heads"] == 4
    assert m["parity"]["final"]["max_abs_logit_diff"] <= FP32_ATOL


def test_int8_is_smaller_and_default_name_has_the_variant(tiny, fp32, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = export_onnx(tiny.merged, optimize=True, quantize="int8")
    assert out == Path("exported") / "merged-opt-int8"
    m = manifest(out)
    assert (out / "model.onnx").stat().st_size < (fp32 / "model.onnx").stat().st_size
    assert m["sizes"]["final_bytes"] < m["sizes"]["fp32_bytes"]
    assert m["quantization"]["per_channel"] is True and m["quantization"]["weight_type"] == "QInt8"
    final = m["parity"]["final"]
    assert final["tolerance"] is None and 0 < final["max_abs_logit_diff"] < 0.5  # reported, not enforced
    assert m["parity"]["fp32_export"]["max_abs_logit_diff"] <= FP32_ATOL  # the graph before quantizing is checked
    assert ort_logits(out, ["fine"]).shape == (1, 2)


def test_fp16_export_loads_and_meets_its_tolerance(tiny, tmp_path):
    out = export_onnx(tiny.merged, tmp_path / "fp16", dtype="fp16")
    final = manifest(out)["parity"]["final"]
    assert final["max_abs_logit_diff"] <= final["tolerance"] == pytest.approx(1e-2 * max(1.0, final["max_abs_logit"]))
    assert manifest(out)["sizes"]["final_bytes"] < 0.7 * manifest(out)["sizes"]["fp32_bytes"]


def test_adapter_folder_is_merged_on_the_fly(tiny, fp32, tmp_path):
    out = export_onnx(tiny.adapter, tmp_path / "from-adapter")
    m = manifest(out)
    assert m["source"]["kind"].startswith("adapter") and m["adapter"]["path"] == str(tiny.adapter.resolve())
    assert m["files"]["model.onnx"]["sha256"] == manifest(fp32)["files"]["model.onnx"]["sha256"]


def test_parity_failure_raises_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "FP32_ATOL", -1.0)
    with pytest.raises(MetaTTError, match="differs from the PyTorch model"):
        export_onnx(tiny.merged, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_user_errors(tiny, fp32, tmp_path):
    with pytest.raises(MetaTTError, match="already exists.*--force"):
        export_onnx(tiny.merged, fp32)
    with pytest.raises(MetaTTError, match="model directory not found"):
        export_onnx(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(MetaTTError, match="neither a model"):
        export_onnx(tmp_path, tmp_path / "out")
    with pytest.raises(MetaTTError, match="not a sequence classifier"):
        export_onnx(resolve_model(None), tmp_path / "out")  # the embedded model has no classification head
    with pytest.raises(MetaTTError, match="exclude each other"):
        export_onnx(tiny.merged, tmp_path / "out", quantize="int8", dtype="fp16")
    with pytest.raises(MetaTTError, match="unknown quantization"):
        export_onnx(tiny.merged, tmp_path / "out", quantize="int3")
    with pytest.raises(MetaTTError, match="^--quantize int4 does not apply to a classifier export"):  # weight-only 4-bit: the decoder form
        export_onnx(tiny.merged, tmp_path / "out", quantize="int4")
    with pytest.raises(MetaTTError, match="is not an adapter"):
        export_onnx(tiny.merged, tmp_path / "out", adapter_dir=tmp_path)
    other = shutil.copytree(tiny.adapter, tmp_path / "other-adapter")
    with pytest.raises(MetaTTError, match="records adapter"):
        export_onnx(tiny.merged, tmp_path / "out", adapter_dir=other)
    assert not (tmp_path / "out").exists()


def test_cli_export(tiny, fp32, tmp_path):
    runner = CliRunner()
    for args in (["export", str(tmp_path / "missing")], ["export", str(tiny.merged), "-o", str(fp32)]):
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    result = runner.invoke(app, ["export", str(tiny.merged), "-o", str(tmp_path / "cli"), "--optimize"])
    assert result.exit_code == 0, result.output
    assert "max |logit diff| vs PyTorch float32 " in result.output and ", float64 " in result.output and "Attention 2" in result.output
    assert (tmp_path / "cli" / "model.onnx").is_file()


@pytest.mark.slow
def test_embedded_model_export_parity(tmp_path):
    """The real embedded MiniLM with a random non-zero adapter: merged export within 1e-4, loadable."""
    from metatt_deploy.adapters.base_model import load_classifier, load_tokenizer
    from metatt_deploy.adapters.model import attach, build_config, get_adapter, save_adapter
    from metatt_deploy.export.merge import merge_adapter
    from metatt_deploy.tt import cores as tt

    torch.manual_seed(0)
    model = load_classifier(None, ["negative", "positive"]).eval()
    config = build_config(model, rank=8, base_model=resolve_model(None))
    attach(model, config)
    get_adapter(model).set_cores(tt.init_cores("no-no-no-no", config.core_shapes(), seed=1))
    save_adapter(model, tmp_path / "adapter", load_tokenizer(None))
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    out = export_onnx(tmp_path / "merged", tmp_path / "onnx")
    parity = manifest(out)["parity"]["final"]
    assert parity["max_abs_logit_diff"] <= FP32_ATOL and parity["label_agreement"] == 1.0
    texts = SAMPLE_SENTENCES[:3]
    assert np.abs(ort_logits(out, texts) - torch_logits(tmp_path / "merged", texts)).max() <= FP32_ATOL


# ------------------------------------------------------------------ issue 10


def test_export_never_writes_over_or_around_its_inputs(tiny, fp32, tmp_path):
    merged = shutil.copytree(tiny.merged, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    for out in (merged, merged / "onnx", tmp_path):
        with pytest.raises(MetaTTError, match="the input|did not write"):
            export_onnx(merged, out, force=True)
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("k")
    with pytest.raises(MetaTTError, match="did not write .*no manifest.json"):
        export_onnx(merged, unrelated, force=True)
    assert (unrelated / "keep.txt").is_file()


def test_non_finite_weights_and_parity_figures_fail(tiny, tmp_path):
    broken = shutil.copytree(tiny.merged, tmp_path / "nan")
    model = AutoModelForSequenceClassification.from_pretrained(broken)
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    model.save_pretrained(broken)
    with pytest.raises(MetaTTError, match="model weight classifier.bias holds NaN or Inf"):
        export_onnx(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_wrong_graph_fails_against_both_float32_and_float64_pytorch(tiny, tmp_path, monkeypatch):
    """A perturbed initializer (the head's bias, +1e-2): far from both references, so not float32 rounding."""
    import onnx
    from onnx import numpy_helper

    run_main_export = export_module._run_main_export

    def perturbed(source, tmp, opset):
        run_main_export(source, tmp, opset)
        graph = onnx.load(str(tmp / "model.onnx"))
        bias = next(i for i in graph.graph.initializer if i.name == "classifier.bias")
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(1e-2), bias.name))
        onnx.save(graph, str(tmp / "model.onnx"))

    monkeypatch.setattr(export_module, "_run_main_export", perturbed)
    with pytest.raises(MetaTTError) as e:
        export_onnx(tiny.merged, tmp_path / "wrong")
    message = str(e.value)
    assert message.startswith("the fp32 ONNX export differs from the PyTorch model (max |logit diff| 0.01 from float64 PyTorch and 0.01")
    assert "so float32 rounding cannot explain it); the graph computes something else than the model" in message
    assert not (tmp_path / "wrong").exists()


def test_mpnet_adapter_merges_and_exports_within_fp32_parity(tmp_path):
    """MPNet (all-mpnet-base-v2's architecture, tiny): q,k,v,o + FFN adapter, merged, exported, parity held."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from metatt_deploy.adapters.base_model import load_tokenizer
    from metatt_deploy.adapters.model import attach, build_config, get_adapter, save_adapter
    from metatt_deploy.export.merge import merge_adapter
    from metatt_deploy.tt import cores as tt

    tokenizer = load_tokenizer(None)
    tokenizer.model_input_names = tokenizer.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]  # as MPNet's own
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=130,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
        initializer_range=0.2,
    )
    model = MPNetForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter_config = build_config(model, rank=4, targets="q,k,v,o,up,down", base_model=str(tmp_path / "base"))
    attach(model, adapter_config)
    get_adapter(model).set_cores(tt.init_cores("no-no-no-no", adapter_config.core_shapes(), seed=1))
    merge_adapter(save_adapter(model, tmp_path / "adapter", tokenizer), tmp_path / "merged")
    out = export_onnx(tmp_path / "merged", tmp_path / "onnx")
    parity = manifest(out)["parity"]["final"]
    assert parity["max_abs_logit_diff"] <= FP32_ATOL and parity["label_agreement"] == 1.0 and parity["max_abs_logit"] > 0.1


def test_a_failing_or_concurrent_export_loses_nothing(tiny, tmp_path):
    """--name stays under exported/; an output another export holds is refused; a bad --web-runtime keeps the old export."""
    with pytest.raises(MetaTTError, match=r"--name '../../x' must be a folder name under exported/"):
        export_onnx(tiny.merged, name="../../x")
    busy = tmp_path / "busy"
    lock = tmp_path / ".busy.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live owner: this process
    with pytest.raises(MetaTTError, match="is in use by process"):
        export_onnx(tiny.merged, busy)
    assert not busy.exists() and lock.read_text().startswith(str(os.getpid()))
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / MANIFEST_NAME).write_text("{}")
    (previous / "model.onnx").write_bytes(b"the old export")
    args = ["export", str(tiny.merged), "-o", str(previous), "--force", "--web-runtime", str(tmp_path / "no-node-modules")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "lacks" in result.output and (previous / "model.onnx").read_bytes() == b"the old export"
