"""metatt_deploy.export.onnx_lm: decoders export with a KV cache, load in ORTModelForCausalLM and
generate as PyTorch does; int8 and int4 (MatMulNBits) variants."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from tiny_decoders import save_tiny_adapter

import metatt_deploy.export.onnx_lm as onnx_lm_module
from metatt_deploy.adapters.model import load_adapter
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.decoder_runs import greedy, load_ort_decoder
from metatt_deploy.export.int4 import INT4_ACCURACY_LEVEL, INT4_BLOCK_SIZE, INT4_HEAD_BITS, Int4Options
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.export.onnx_lm import FP32_ATOL, fp32_tolerance
from metatt_deploy.export.quality import QualityGate
from metatt_deploy.inference.formats import MANIFEST_NAME


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_fp32_decoder_export_has_a_kv_cache_and_generates_like_the_unmerged_adapter(tmp_path: Path, arch: str) -> None:
    _, adapter_dir = save_tiny_adapter(tmp_path, arch)
    out = export_onnx(adapter_dir, tmp_path / "onnx")  # an adapter folder: merged on the fly
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["pipeline_task"] == "text-generation-with-past" and manifest["kv_cache"]
    assert any(name.startswith("past_key_values.") for name in manifest["inputs"])
    assert manifest["adapter"]["method"] == "metatt-4d"
    final = manifest["parity"]["final"]
    assert final["max_abs_logit_diff"] <= FP32_ATOL and final["greedy_identical"] == 1.0
    # the float64 reference ran too: the graph is as close to it as float32 PyTorch is, within the tolerance
    assert 0 < final["reference_float32_vs_float64"] < FP32_ATOL and final["max_abs_diff_float64"] <= FP32_ATOL
    assert {"tokenizer.json", "generation_config.json", "config.json"} <= {p.name for p in out.iterdir()}
    # a prompt the export never saw: the served bundle generates what the unmerged adapter generates
    model, _, tok = load_adapter(adapter_dir)
    ids = tok("Review: this was boring and sad").input_ids
    ort = load_ort_decoder(out)
    assert greedy(ort, ids, 10, tok.eos_token_id, tok.pad_token_id) == greedy(model, ids, 10, tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_decoder_exports(tmp_path: Path, quantize: str) -> None:
    _, adapter_dir = save_tiny_adapter(tmp_path, "llama")
    # a random tiny decoder's logits are nearly flat, so quantization flips its top tokens: kept on purpose
    # edge layers 0: this 2-layer model would otherwise be all 8-bit, and the 4-bit path is what is tested here
    int4 = Int4Options(edge_layers=0)
    out = export_onnx(adapter_dir, tmp_path / quantize, quantize=quantize, int4=int4, gate=QualityGate(allow_loss=True))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["variant"]["quantize"] == quantize and manifest["parity"]["final"]["tolerance"] is None
    gate = manifest["quality_gate"]
    assert gate["kept_with_allow_quality_loss"] == (not gate["passed"]) and gate["tokens"] > 0
    assert manifest["parity"]["fp32_export"]["max_abs_logit_diff"] <= FP32_ATOL  # checked before quantizing
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    if quantize == "int4":
        q = manifest["quantization"]
        assert q["block_size"] == INT4_BLOCK_SIZE and q["accuracy_level"] == INT4_ACCURACY_LEVEL
        # every projection and the tied LM head are MatMulNBits (the head at 8 bits); the embedding lookup reads the head's weight
        assert ops["MatMulNBits"] == 2 * 7 + 1 and ops["GatherBlockQuantized"] == 1
        assert q["head_bits"] == INT4_HEAD_BITS == 8 and q["matmuls_by_bits"] == {"4": 2 * 7, "8": 1}
        assert q["tied_lm_head"] == {"untied": ["/lm_head/MatMul"], "embedding_shares_head_weight": 1}
        graph = onnx.load(str(out / "model.onnx")).graph
        config = json.loads((out / "config.json").read_text())
        table = config["vocab_size"] * config["hidden_size"]
        vocab_tables = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and math.prod(t.dims) >= table]
        assert vocab_tables == []  # no float32 embedding / LM head weight left
        assert all(n.input[1] not in {t.name for t in graph.initializer} for n in graph.node if n.op_type == "MatMul")
        assert manifest["sizes"]["final_bytes"] < 0.65 * manifest["sizes"]["fp32_bytes"]  # the 8-bit table is a third of this tiny model
        for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs["block_size"] == INT4_BLOCK_SIZE and attrs["accuracy_level"] == INT4_ACCURACY_LEVEL
    else:
        assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] == 2 * 6  # q,k,v,o,gate,up; down stays float32
        assert ops["MatMul"] >= 2 and manifest["quantization"]["float32_nodes"]["count"] >= 2
    ids = torch.tensor([[5, 6, 7, 8]])
    assert load_ort_decoder(out).generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False).shape == (
        1,
        7,
    )


def test_decoder_only_options_and_decoder_refusals_are_one_line_errors(tmp_path: Path, tiny_base: Path) -> None:
    with pytest.raises(MetaTTError, match="^--quantize int4 does not apply to a classifier export"):
        export_onnx(tiny_base, tmp_path / "x", quantize="int4")
    _, adapter_dir = save_tiny_adapter(tmp_path, "llama")
    with pytest.raises(MetaTTError, match="^--optimize does not apply to a decoder export"):
        export_onnx(adapter_dir, tmp_path / "y", optimize=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_fp32_tolerance_is_flat_for_small_logits_and_relative_for_large_ones() -> None:
    assert fp32_tolerance(3.0) == fp32_tolerance(10.0) == FP32_ATOL
    assert fp32_tolerance(38.0) == pytest.approx(3.8 * FP32_ATOL)


@pytest.mark.parametrize(("diff", "identical"), [(float("nan"), 1.0), (2 * FP32_ATOL, 1.0), (0.0, 5 / 6)])
def test_decoder_parity_enforcement_fails_on_nan_on_a_large_difference_and_on_a_greedy_token_apart(diff: float, identical: float) -> None:
    """NaN compares false with everything: a ``>`` test let a NaN difference through as a pass."""
    parity = {"max_abs_logit_diff": diff, "tolerance": FP32_ATOL, "greedy_identical": identical}
    with pytest.raises(MetaTTError, match="the fp32 ONNX export differs from the PyTorch model"):
        onnx_lm_module._enforce(parity, "the fp32 ONNX export")
    onnx_lm_module._enforce({**parity, "max_abs_logit_diff": FP32_ATOL, "greedy_identical": 1.0}, "the fp32 ONNX export")
