"""metatt_deploy.export.quality: quantized exports are judged against their fp32 graph and refused, in one line and
before anything is written, when they lose quality; --allow-quality-loss keeps them with the numbers recorded."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_fixtures import build_tiny
from tiny_decoders import save_peaked_decoder
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.decoder_runs import chat_prompts, load_ort_decoder
from metatt_deploy.export.int4 import Int4Options
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.export.onnx_classifier import SAMPLE_SENTENCES
from metatt_deploy.export.quality import (
    GATE_NEW_TOKENS,
    GATE_PROMPTS,
    MIN_AGREEMENT,
    QualityGate,
    Scored,
    decoder_quality,
    judge_classifier,
    judge_decoder,
)
from metatt_deploy.inference.formats import MANIFEST_NAME
from metatt_deploy.inference.sessions import make_session, onnx_feeds

OUTLIER = 60.0  # the trap of save_peaked_decoder: 4-bit blocks round every other weight of a row to 0


@pytest.fixture(scope="module")
def trapped(tmp_path_factory) -> Path:
    return save_peaked_decoder(tmp_path_factory.mktemp("trapped"), OUTLIER)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_a_broken_int4_export_is_refused_in_one_line_and_nothing_is_written(trapped: Path, tmp_path: Path) -> None:
    out = tmp_path / "exports" / "int4"
    result = CliRunner().invoke(app, ["export", str(trapped), "-o", str(out), "--quantize", "int4", "--int4-head-bits", "4"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert (
        "greedy agreement 0.0% (minimum 90%)" in lines[0] and "--int4-head-bits 8 or 32" in lines[0] and "--allow-quality-loss" in lines[0]
    )
    assert not out.exists() and leftovers(out.parent) == []  # no final folder, no temporary beside it


def test_allow_quality_loss_keeps_it_with_numbers_an_independent_reference_reproduces(trapped: Path, tmp_path: Path) -> None:
    out = export_onnx(trapped, tmp_path / "int4", quantize="int4", int4=Int4Options(head_bits=4), gate=QualityGate(allow_loss=True))
    gate = json.loads((out / MANIFEST_NAME).read_text())["quality_gate"]
    assert gate["passed"] is False and gate["kept_with_allow_quality_loss"] is True
    assert gate["thresholds"] == {"min_greedy_agreement": MIN_AGREEMENT, "max_perplexity_increase": 0.1}
    # reference: PyTorch float32 picks the continuations and scores them; the int4 bundle's logits are scored by torch too
    tokenizer = AutoTokenizer.from_pretrained(trapped)
    model = AutoModelForCausalLM.from_pretrained(trapped, dtype=torch.float32).eval()
    bundle = load_ort_decoder(out)
    nll_fp32, nll_int4, agree, tokens = 0.0, 0.0, 0, 0
    for ids in chat_prompts(tokenizer, GATE_PROMPTS):
        x = torch.tensor([ids])
        full = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=GATE_NEW_TOKENS, do_sample=False)[0]
        target = full[len(ids) :]
        span = slice(len(ids) - 1, len(full) - 1)
        with torch.no_grad():
            ref = model(full[None]).logits[0, span]
        quant = torch.as_tensor(np.asarray(bundle(input_ids=full[None], attention_mask=torch.ones_like(full[None])).logits))[0, span]
        nll_fp32 += float(torch.nn.functional.cross_entropy(ref, target, reduction="sum"))
        nll_int4 += float(torch.nn.functional.cross_entropy(quant, target, reduction="sum"))
        agree += int((ref.argmax(-1) == quant.argmax(-1)).sum())
        tokens += len(target)
    assert gate["tokens"] == tokens == len(GATE_PROMPTS) * GATE_NEW_TOKENS
    assert gate["greedy_agreement"] == agree / tokens == 0.0
    assert gate["perplexity_fp32"] == pytest.approx(math.exp(nll_fp32 / tokens), rel=1e-4)
    assert gate["perplexity"] == pytest.approx(math.exp(nll_int4 / tokens), rel=1e-5)
    # every weight of the 4-bit table rounds to 0 but the trap unit, which the final norm zeroes: flat logits, ppl = vocabulary
    assert gate["perplexity"] == pytest.approx(len(tokenizer), rel=1e-5)


def test_the_defaults_8_bit_head_and_edge_layers_pass_the_gate_on_the_same_model(trapped: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(trapped), "-o", str(tmp_path / "int4"), "--quantize", "int4"])
    assert result.exit_code == 0, result.output
    assert "quality gate passed: greedy agreement with fp32 100.0%" in result.output
    manifest = json.loads((tmp_path / "int4" / MANIFEST_NAME).read_text())
    q = manifest["quantization"]
    assert (q["head_bits"], q["edge_layers"]) == (8, 2) and manifest["quality_gate"]["passed"] is True
    assert manifest["quality_gate"]["calibration"].startswith(f"{len(GATE_PROMPTS)} built-in prompts")


def test_decoder_quality_and_verdict_on_hand_made_scores() -> None:
    fp32 = [Scored([1, 2], np.array([1, 2]), np.array([0.1, 0.3])), Scored([3, 4], np.array([3, 4]), np.array([0.2, 0.2]))]
    quant = [Scored([1, 2], np.array([1, 0]), np.array([0.2, 0.4])), Scored([3, 4], np.array([3, 4]), np.array([0.3, 0.3]))]
    record = decoder_quality(fp32, quant)
    assert record["tokens"] == 4 and record["greedy_agreement"] == 0.75
    assert record["perplexity_fp32"] == pytest.approx(math.exp(0.2)) and record["perplexity"] == pytest.approx(math.exp(0.3))
    assert record["perplexity_increase"] == pytest.approx(math.exp(0.1) - 1)
    with pytest.raises(MetaTTError, match=r"greedy agreement 75\.0% \(minimum 90%\).*\(\+10\.5%, maximum \+10%\)") as e:
        judge_decoder(record, QualityGate(), "int4", "4 rows")
    assert "\n" not in str(e.value)
    assert judge_decoder(record, QualityGate(min_agreement=0.7, max_ppl_increase=0.11), "int4", "4 rows")["passed"] is True
    kept = judge_decoder(record, QualityGate(allow_loss=True), "int8", "4 rows")
    assert kept["passed"] is False and kept["kept_with_allow_quality_loss"] is True


def test_gate_options_are_checked(trapped: Path, tmp_path: Path) -> None:
    for gate, message in [
        (QualityGate(rows=0), "at least 1"),
        (QualityGate(min_agreement=1.5), "between 0 and 1"),
        (QualityGate(max_ppl_increase=-0.1), "0 or more"),
    ]:
        with pytest.raises(MetaTTError, match=message):
            export_onnx(trapped, tmp_path / "x", quantize="int4", gate=gate)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- classifiers


def broken_for_int8(tiny_root: Path, target: Path) -> Path:
    """The tiny classifier with a 1000-wide activation outlier that its float32 pooler ignores (weight column 0).

    Dynamic int8 quantizes the pooler's input with one scale per tensor, set by the outlier (step 1000/255):
    the other values round to a few levels and most of what tells sentences apart is lost.
    """
    tiny = build_tiny(tiny_root)
    model = AutoModelForSequenceClassification.from_pretrained(tiny.merged).eval()
    with torch.no_grad():
        model.bert.encoder.layer[-1].output.LayerNorm.bias[0] = 1000.0
        model.bert.pooler.dense.weight[:, 0] = 0.0
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny.merged / name).exists():
            shutil.copy(tiny.merged / name, target / name)
    return target


def test_a_lossy_int8_classifier_is_refused_and_kept_on_request_with_its_label_agreement(tmp_path: Path) -> None:
    folder = broken_for_int8(tmp_path / "tiny", tmp_path / "broken")
    with pytest.raises(MetaTTError, match=r"the int8 export loses quality .* label agreement \d+\.\d% \(minimum 90%") as e:
        export_onnx(folder, tmp_path / "out", quantize="int8")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    out = export_onnx(folder, tmp_path / "out", quantize="int8", gate=QualityGate(allow_loss=True))
    gate = json.loads((out / MANIFEST_NAME).read_text())["quality_gate"]
    # reference: PyTorch float32 labels against the int8 bundle's, every built-in sentence fed alone
    rows = [*SAMPLE_SENTENCES, *GATE_PROMPTS]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    session = make_session(out / "model.onnx", ["CPUExecutionProvider"])
    fp32, int8 = [], []
    for text in rows:
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            fp32.append(int(model(**enc).logits.argmax()))
        int8.append(int(session.run(["logits"], onnx_feeds(session, dict(enc)))[0].argmax()))
    assert len(set(fp32)) > 1  # float32 tells the sentences apart
    agreement = float(np.mean(np.array(fp32) == np.array(int8)))
    assert gate["rows"] == len(rows) and gate["label_agreement"] == pytest.approx(agreement) and agreement < 0.9
    assert gate["passed"] is False and gate["kept_with_allow_quality_loss"] is True


def test_judge_classifier_counts_changed_labels() -> None:
    record = judge_classifier(np.array([0, 1, 1, 0]), np.array([0, 1, 1, 0]), QualityGate(), "int8", "4 rows")
    assert record["label_agreement"] == 1.0 and record["labels_changed"] == 0 and record["passed"]
    with pytest.raises(MetaTTError, match=r"label agreement 75\.0% \(minimum 90%, 1 of 4 labels changed\)"):
        judge_classifier(np.array([0, 1, 1, 0]), np.array([0, 1, 1, 1]), QualityGate(), "int8-static", "4 rows")
