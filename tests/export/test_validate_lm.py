"""metatt_deploy.export.validate_lm: a tiny decoder's fp32 and int4 bundles against the unmerged adapter
(MetaTT, or a PEFT LoRA: trained with --method lora, or written by merge --to peft)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_decoders import save_tiny_adapter, save_tiny_decoder
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from metatt_deploy.adapters.lora import load_lora
from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.kinds import validate
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.export.peft import to_peft
from metatt_deploy.export.quality import QualityGate
from metatt_deploy.export.validate_lm import REPORT_JSON, REPORT_MD, REPORT_PNG, validate_decoder

WORDS = ["good", "bad", "great", "awful", "fine", "poor"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    _, adapter_dir = save_tiny_adapter(root, "llama")
    fp32 = export_onnx(adapter_dir, root / "fp32")
    int4 = export_onnx(adapter_dir, root / "int4", quantize="int4", gate=QualityGate(allow_loss=True))  # a random tiny model: lossy
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
    assert f"report: {tmp_path / 'cli' / 'validation.md'}" in result.output
    result = CliRunner().invoke(app, [*args[:3], "-o", str(tmp_path / "none")])
    assert result.exit_code == 2 and "needs held-out prompts with answers" in result.output
    with pytest.raises(MetaTTError, match="exceed the model's context"):
        validate_decoder(adapter_dir, fp32, data=str(data), prompt_lengths=(600,), output=tmp_path / "long")


def test_a_metatt_decoder_as_a_peft_lora_validates_against_its_own_export_only(bundles, tmp_path: Path) -> None:
    """The PEFT form is the same model, but not the adapter the MetaTT export records (weights sha256): refused, as for
    classifiers. Its own export validates, and the reports land beside the bundle, which keeps only its manifest's files."""
    adapter_dir, fp32, _, data = bundles
    peft_dir = to_peft(adapter_dir, tmp_path / "peft")  # lossless: the PEFT LoRA is the same model
    with pytest.raises(MetaTTError, match="was made from another adapter"):
        validate_decoder(peft_dir, fp32, data=str(data), prompt_lengths=(8,), new_tokens=3, repeats=1, output=tmp_path / "r")
    bundle = export_onnx(peft_dir, tmp_path / "peft-onnx")
    files = sorted(p.name for p in bundle.iterdir())
    report = validate_decoder(peft_dir, bundle, data=str(data), prompt_lengths=(8,), new_tokens=3, repeats=1)
    assert report["method"] == "lora" and report["parity"]["passed"] and report["parity"]["max_abs_logit_diff"] <= 1e-4
    assert "unmerged PEFT LoRA adapter" in report["parity"]["reference"]
    assert sorted(p.name for p in bundle.iterdir()) == files
    beside = {f"peft-onnx.{name}" for name in (REPORT_JSON, REPORT_MD, REPORT_PNG)}
    assert beside <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / f"peft-onnx.{REPORT_JSON}").read_text())["parity"] == report["parity"]


def test_decoder_validation_refuses_the_classifier_options_in_one_line(bundles, tmp_path: Path) -> None:
    adapter_dir, fp32, _, data = bundles
    with pytest.raises(MetaTTError, match=r"^--batch-sizes, --task, --label-column do not apply to a decoder export .*drop them") as e:
        validate(adapter_dir, fp32, data=str(data), output=tmp_path / "r", batch_sizes=[1, 8], task="movie", label_column="label")
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()
    with pytest.raises(MetaTTError, match=r"^--seq-len does not apply to a decoder export .*drop it"):
        validate(adapter_dir, fp32, data=str(data), output=tmp_path / "r", seq_len=128)
    result = CliRunner().invoke(app, ["validate", str(adapter_dir), str(fp32), "--data", str(data), "--batch-sizes", "1,8"])
    assert result.exit_code == 2 and "--batch-sizes does not apply to a decoder export" in result.output


def test_a_lora_trained_decoder_goes_through_merge_export_and_validate(tmp_path: Path) -> None:
    """train --method lora on a tiny Llama, then merge (a causal-LM folder), export (KV cache) and validate, all by the CLI."""
    base = save_tiny_decoder(tmp_path, "llama")
    rows = [{"prompt": f"Review: this was {w} today", "response": "positive" if w in ("good", "great") else "negative"} for w in WORDS]
    files = {}
    for split, n in (("train", 24), ("validation", 6)):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(rows[i % len(rows)]) + "\n" for i in range(n)))
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    cli("train", "--model", base, "--method", "lora", "--rank", "4", "--targets", "q,k,v,o,gate,up,down", "--lr", "5e-2", "--epochs", "1",
        "--batch-size", "8", "--max-length", "64", "--train", files["train"], "--validation", files["validation"], "-o", tmp_path / "run")  # fmt: skip
    best = tmp_path / "run" / "best"
    cli("merge", best, "-o", tmp_path / "merged")
    merged = tmp_path / "merged"
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in merged.iterdir()}
    peft_model, record, tok = load_lora(best)
    assert record["task_type"] == "causal-lm" and record["label_names"] == []
    dense = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Review: this was fine today"}], add_generation_prompt=True)])
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)
        with peft_model.disable_adapter():
            assert (peft_model(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() > 1e-3  # the pairs moved
    refused = runner.invoke(app, ["merge", str(best), "-o", str(tmp_path / "p"), "--to", "peft"])
    assert refused.exit_code == 2 and "already a PEFT LoRA adapter" in refused.output
    cli("export", merged, "-o", tmp_path / "onnx")
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["adapter"]["method"] == "lora" and manifest["pipeline_task"] == "text-generation-with-past"
    out = cli("validate", best, tmp_path / "onnx", "--data", files["validation"], "--prompt-lengths", "8", "--new-tokens", "3",
              "--repeats", "1", "-o", tmp_path / "report")  # fmt: skip
    assert "greedy tokens identical on 100%" in out
    report = json.loads((tmp_path / "report" / REPORT_JSON).read_text())
    assert report["method"] == "lora" and report["parity"]["passed"] and report["parity"]["max_abs_logit_diff"] <= 1e-4
