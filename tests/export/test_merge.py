"""Sweeps that discard nothing leave the model alone; merge (and merge --max-rank) is exact.

Tiny random BERTs only: the sweep test uses tests/tiny_models.py's vocabulary-64 model; the
merge tests save a width-32 BERT with the embedded tokenizer (so the merged folder is a complete
Hugging Face model) and ``initializer_range=0.2`` so logits are of order 1 and a 1e-5 parity
bound is a real check.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import HEAD_DIM, inputs, logits, random_cores, tiny_model
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification
from typer.testing import CliRunner

from metatt_deploy.adapters.base_model import load_tokenizer
from metatt_deploy.adapters.lora import LORA_RECORD, load_lora
from metatt_deploy.adapters.model import attach, build_config, get_adapter, load_adapter, save_adapter
from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.merge import MERGE_RECORD, merge_adapter, merge_factored
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.export.peft import to_peft
from metatt_deploy.inference.formats import read_manifest
from metatt_deploy.inference.tasks import text_inputs
from metatt_deploy.training.config import TrainConfig
from metatt_deploy.training.data import load_task
from metatt_deploy.training.single import train
from metatt_deploy.tt.cores import tt_full, tt_ranks
from metatt_deploy.tt.rounding import round_tt, sweep

SENTENCES = ["A wonderful film, I loved it.", "Dull and slow.", "Not bad at all, actually quite good!"]


# ------------------------------------------------------------------ sweeps keep the function


def _adapted(kind: str, ranks: list[int]):
    """A tiny BERT with random adapter cores of the given ranks: 4D, 5D or (4+1)D (tasks a, b)."""
    model = tiny_model("bert")
    if kind == "4+1d":
        config = build_config(model, rank=ranks, tasks=["a", "b"], label_names={"a": ["x", "y", "z"], "b": ["u", "v", "w"]})
    else:
        config = build_config(model, method=f"metatt-{kind}", rank=ranks)
    attach(model, config, random_cores(config.core_shapes(), seed=7))
    return model, get_adapter(model)


def _all_logits(model, adapter) -> list[torch.Tensor]:
    batch = inputs()
    if not adapter.config.multitask:
        return [logits(model, batch)]
    out = []
    for t in range(len(adapter.config.tasks)):
        with adapter.routed(t):
            out.append(logits(model, batch))
    return out


@pytest.mark.parametrize(
    "kind,ranks",
    [("4d", [5, 6, 4]), ("5d", [5, 6, 4, 3]), ("4+1d", [5, 6, 2, 4])],
)
@pytest.mark.parametrize("target", ["same", "above", "both-directions"])
def test_sweep_that_discards_nothing_leaves_logits_unchanged(kind, ranks, target):
    model, adapter = _adapted(kind, ranks)
    if kind == "5d":
        assert adapter.config.mode_sizes[-1] == HEAD_DIM
    before = _all_logits(model, adapter)
    cores = [c.detach() for c in adapter.cores]
    caps = ranks if target == "same" else [r + 3 for r in ranks] if target == "above" else 1000
    result = sweep(cores, caps, direction="both" if target == "both-directions" else "left-to-right")
    assert result.ranks_after == ranks and result.error_bound == 0.0
    adapter.set_cores(result.cores)
    assert any(not torch.equal(a, b) for a, b in zip(cores, adapter.cores))  # re-gauged, not copied
    for old, new in zip(before, _all_logits(model, adapter)):
        torch.testing.assert_close(new, old, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,ranks", [("4d", [5, 6, 4]), ("4+1d", [5, 6, 2, 4])])
def test_sweep_that_discards_changes_logits(kind, ranks):
    """The check above can fail: a lossy sweep moves the logits well beyond its tolerance."""
    model, adapter = _adapted(kind, ranks)
    before = _all_logits(model, adapter)
    result = sweep([c.detach() for c in adapter.cores], 1)
    assert result.error_bound > 0
    adapter.set_cores(result.cores)
    assert max(float((a - b).abs().max()) for a, b in zip(before, _all_logits(model, adapter))) > 1e-3


# ------------------------------------------------------------------ merge


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_base):
    """(base folder, adapter folder, adapter cores) with random rank-6 cores on conftest's tiny BERT."""
    root = tmp_path_factory.mktemp("merge")
    tokenizer = load_tokenizer(str(tiny_base))
    model = BertForSequenceClassification.from_pretrained(tiny_base).eval()
    base = tiny_base
    adapter_config = build_config(model, rank=6, base_model=str(base))
    attach(model, adapter_config, random_cores(adapter_config.core_shapes(), seed=3, std=0.3))
    adapter_dir = save_adapter(model, root / "adapter", tokenizer)
    cores = [c.detach().clone() for c in get_adapter(model).cores]
    return base, adapter_dir, cores


def _batch(folder: Path) -> dict[str, torch.Tensor]:
    return dict(load_tokenizer(str(folder))(SENTENCES, padding=True, return_tensors="pt"))


def _hf_logits(folder: Path, batch) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(**batch).logits


def _adapted_weights(base: Path, adapter_dir: Path) -> dict[str, tuple[int, int, torch.Tensor]]:
    """name -> (layer, matrix, base weight) of every adapted module, from the adapter's config."""
    config = json.loads((adapter_dir / "metatt_config.json").read_text())
    weights = load_file(str(base / "model.safetensors"))
    out = {}
    for module in config["modules"]:
        ((m, start, end),) = module["segments"]
        out[module["name"] + ".weight"] = (module["layer"], m, weights[module["name"] + ".weight"])
    return out


def test_cli_merge_matches_the_adapter_and_refuses_to_overwrite(tiny, tmp_path):
    base, adapter_dir, _ = tiny
    runner = CliRunner()
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(adapter_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "merged task" in result.output and (out / MERGE_RECORD).is_file()

    batch = _batch(out)
    merged = _hf_logits(out, batch)  # transformers only: no metatt code involved
    model, _, _ = load_adapter(adapter_dir)
    with torch.no_grad():
        reference = model(**batch).logits
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=0)
    assert float((_hf_logits(base, batch) - reference).abs().max()) > 1e-2  # the adapter matters

    again = runner.invoke(app, ["merge", str(adapter_dir), "-o", str(out)])
    lines = [line for line in again.output.splitlines() if line.strip()]
    assert again.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), again.output
    assert "--force" in lines[0]
    forced = runner.invoke(app, ["merge", str(adapter_dir), "-o", str(out), "--force"])
    assert forced.exit_code == 0, forced.output

    bad = runner.invoke(app, ["merge", str(adapter_dir), "-o", str(tmp_path / "m0"), "--max-rank", "0"])
    assert bad.exit_code == 2 and "below 1" in bad.output and not (tmp_path / "m0").exists()


@pytest.mark.parametrize("max_rank", [3, 1])
def test_merge_max_rank_reports_the_true_error_and_merges_the_rounded_tensor(tiny, tmp_path, max_rank):
    base, adapter_dir, cores = tiny
    out = tmp_path / "merged"
    record = merge_adapter(adapter_dir, out, max_rank=max_rank)
    assert record["rounded_to"] == max_rank and record["rounded_ranks"] == [max_rank] * 3
    assert record["ranks"] == [6, 6, 6]  # the trained adapter's, kept for the record

    # the tensor the merge actually added, read back from the weights: (W' - W)^T / alpha per (l, m)
    alpha = record["alpha"]
    merged = load_file(str(out / "model.safetensors"))
    full = tt_full([c.double() for c in cores])
    applied = torch.zeros_like(full)
    for name, (layer, matrix, w) in _adapted_weights(base, adapter_dir).items():
        applied[:, layer, matrix, :] = (merged[name].double() - w.double()).T / alpha
    true_error = float(torch.linalg.vector_norm(full - applied) / torch.linalg.vector_norm(full))
    assert 0.01 < true_error < 1
    assert record["rounding_relative_error"] == pytest.approx(true_error, rel=1e-4)

    # and it is the rounded train's tensor, of the requested rank
    rounded, error = round_tt(cores, max_rank)
    assert tt_ranks(rounded) == [max_rank] * 3 and error == pytest.approx(true_error, rel=1e-4)
    torch.testing.assert_close(applied, tt_full([c.double() for c in rounded]), atol=1e-5, rtol=0)
    d_in = full.shape[0]
    assert int(torch.linalg.matrix_rank(applied.reshape(d_in, -1), rtol=1e-4)) == max_rank

    # the merged folder runs like the rounded adapter (and unlike the exact one)
    model, _, _ = load_adapter(adapter_dir)
    batch = _batch(out)
    with torch.no_grad():
        exact = model(**batch).logits
        get_adapter(model).set_cores(rounded)
        approx = model(**batch).logits
    torch.testing.assert_close(_hf_logits(out, batch), approx, atol=1e-5, rtol=0)
    assert float((approx - exact).abs().max()) > 1e-4


def test_merge_max_rank_at_or_above_the_ranks_is_lossless(tiny, tmp_path):
    base, adapter_dir, _ = tiny
    exact = merge_adapter(adapter_dir, tmp_path / "exact")
    rounded = merge_adapter(adapter_dir, tmp_path / "rounded", max_rank=50)
    assert rounded["rounding_relative_error"] < 1e-6 and rounded["rounded_ranks"] == exact["ranks"] == [6, 6, 6]
    a = load_file(str(tmp_path / "exact" / "model.safetensors"))
    b = load_file(str(tmp_path / "rounded" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)  # float32 round-off of re-gauged cores


def test_cli_merge_max_rank_prints_the_recorded_error(tiny, tmp_path):
    _, adapter_dir, _ = tiny
    result = CliRunner().invoke(app, ["merge", str(adapter_dir), "-o", str(tmp_path / "m"), "--max-rank", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "m" / MERGE_RECORD).read_text())
    assert f"rounding error {record['rounding_relative_error']:.3e}" in result.output


@pytest.fixture(scope="module")
def lora_run(tiny_base, tiny_task, tmp_path_factory) -> Path:
    """A PEFT LoRA run's best/ (a few steps with a large lr, so the pairs and the head move)."""
    run = tmp_path_factory.mktemp("lora") / "run"
    cfg = TrainConfig(output=str(run), model=str(tiny_base), method="lora", rank=4, lr=5e-2, epochs=1, batch_size=8, max_length=16)
    train(cfg, tiny_task)
    return run / "best"


def test_lora_run_merges_like_a_metatt_adapter(lora_run, tiny_task, tmp_path) -> None:
    record = merge_adapter(lora_run, tmp_path / "merged")
    assert (record["method"], record["task"], record["ranks"]) == ("lora", tiny_task.name, [4])
    assert record["text_columns"] == list(tiny_task.text_columns) == ["text"]  # recorded by training, carried by merge
    assert json.loads((tmp_path / "merged" / MERGE_RECORD).read_text()) == record
    peft_model, lora, tokenizer = load_lora(lora_run)
    assert lora["label_names"] == tiny_task.label_names
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == dict(enumerate(tiny_task.label_names))
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, got = peft_model(**enc).logits, merged(**enc).logits
    assert (expected - got).abs().max() <= 1e-5
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(**enc).logits - expected).abs().max() > 1e-4  # the LoRA pairs do something


def test_a_pair_tasks_recorded_columns_reach_the_export_and_predict_refuses_one_sentence(tiny_base_128, tmp_path) -> None:
    """Trained on sentence pairs with labels that name no relation: only the recorded columns can tell predict it is a pair task."""
    for split, n in (("train", 16), ("validation", 8)):
        rows = [{"sentence1": f"a cat {i}", "sentence2": f"a dog {i % 3}", "label": "same" if i % 2 else "other"} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(train=str(tmp_path / "train.jsonl"), validation=str(tmp_path / "validation.jsonl"))
    assert task.text_columns == ("sentence1", "sentence2") and text_inputs({"labels": task.label_names}) == 1  # labels say single
    cfg = TrainConfig(output=str(tmp_path / "run"), model=str(tiny_base_128), rank=4, epochs=1, batch_size=8, max_length=16)
    train(cfg, task)
    record = merge_adapter(tmp_path / "run" / "best", tmp_path / "merged")
    assert record["text_columns"] == ["sentence1", "sentence2"]
    export_onnx(tmp_path / "merged", tmp_path / "onnx")
    assert read_manifest(tmp_path / "onnx")["text_columns"] == ["sentence1", "sentence2"]
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(tmp_path / "onnx"), "--text", "a cat sleeps"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "takes a sentence pair" in lines[0], result.output
    result = runner.invoke(app, ["predict", str(tmp_path / "onnx"), "--text", "a cat 1 ||| a dog 1"])
    assert result.exit_code == 0 and json.loads(result.output.strip().splitlines()[0])["label"] in ("same", "other"), result.output


def test_lora_refusals(lora_run, tmp_path) -> None:
    with pytest.raises(MetaTTError, match="drop --max-rank"):
        merge_adapter(lora_run, tmp_path / "a", max_rank=2)
    with pytest.raises(MetaTTError, match="already a PEFT LoRA adapter"):
        to_peft(lora_run, tmp_path / "b")
    with pytest.raises(MetaTTError, match="--factored needs a multi-task MetaTT adapter"):
        merge_factored(lora_run, tmp_path / "c")
    with pytest.raises(MetaTTError, match="unknown task 'other'"):
        merge_adapter(lora_run, tmp_path / "d", task="other")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in lora_run.iterdir():
        if f.name != LORA_RECORD:
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(MetaTTError, match=f"without {LORA_RECORD}"):
        merge_adapter(bare, tmp_path / "e")


# ------------------------------------------------------------------ issue 10: inputs, NaN, architectures, modes, litter


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_merge_never_replaces_or_deletes_its_inputs(tiny, tmp_path):
    base, adapter_dir, _ = tiny
    runner = CliRunner()
    before = _tree(adapter_dir)
    for out in (adapter_dir, adapter_dir / "merged", adapter_dir.parent):
        for extra in ([], ["--to", "peft"]):
            error = _one_error(runner.invoke(app, ["merge", str(adapter_dir), "-o", str(out), "--force", *extra]))
            assert "the input" in error or "did not write" in error
    assert _tree(adapter_dir) == before
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("years of work")
    assert "did not write" in _one_error(runner.invoke(app, ["merge", str(adapter_dir), "-o", str(unrelated), "--force"]))
    assert (unrelated / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file" in _one_error(runner.invoke(app, ["merge", str(adapter_dir), "-o", str(a_file), "--force"]))
    assert "which is a file" in _one_error(runner.invoke(app, ["merge", str(adapter_dir), "-o", str(a_file / "sub")]))
    assert "adapter folder not found" in _one_error(runner.invoke(app, ["merge", str(tmp_path / "nope"), "-o", str(tmp_path / "m")]))


def test_merge_refuses_non_finite_cores(tiny, tmp_path):
    _, adapter_dir, _ = tiny
    broken = tmp_path / "nan-adapter"
    shutil.copytree(adapter_dir, broken)
    state = load_file(str(broken / "metatt_adapter.safetensors"))
    state["core.0"][0, 0, 0] = float("nan")
    save_file(state, str(broken / "metatt_adapter.safetensors"))
    error = _one_error(CliRunner().invoke(app, ["merge", str(broken), "-o", str(tmp_path / "m")]))
    assert "core.0 holds NaN or Inf" in error and not (tmp_path / "m").exists()


def test_merge_onto_another_architecture_is_one_line(tiny, tmp_path):
    _, adapter_dir, _ = tiny
    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    error = _one_error(CliRunner().invoke(app, ["merge", str(adapter_dir), "-o", str(tmp_path / "m"), "--base-model", str(gpt2)]))
    assert "for a bert model, but the base model is a gpt2" in error


def test_merged_outputs_follow_the_umask_and_stale_temporaries_go(tiny, tmp_path):
    """Another user can read an exported model (modes were 0700/0600); a killed run's temporary is removed."""
    import subprocess
    import sys

    _, adapter_dir, _ = tiny
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    litter = tmp_path / f".merged.tmp-{proc.pid}-x1y2"  # as kill -9 during a merge leaves it
    litter.mkdir()
    (litter / "model.safetensors").write_bytes(b"half")
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(app, ["merge", str(adapter_dir), "-o", str(tmp_path / "merged")])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "merged").iterdir()} == {
        p.name: 0o644 for p in (tmp_path / "merged").iterdir()
    }


# ------------------------------------------------------------------ decoders


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_merged_decoder_is_a_standard_causal_lm_folder_that_generates_like_the_adapter(tmp_path: Path, arch: str) -> None:
    from tiny_decoders import save_tiny_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from metatt_deploy.adapters.base_model import load_causal_lm

    base, adapter_dir = save_tiny_adapter(tmp_path, arch)
    model, config, tok = load_adapter(adapter_dir)
    assert config.extra == {"task_type": "causal-lm"} and config.head_modules == []
    out = tmp_path / "merged"
    merge_adapter(adapter_dir, out)
    assert {"config.json", "generation_config.json", "tokenizer.json", MERGE_RECORD} <= {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    assert GenerationConfig.from_pretrained(out).eos_token_id == AutoTokenizer.from_pretrained(out).eos_token_id
    ids = torch.tensor([tok("Review: this was good").input_ids])
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, merged(input_ids=ids).logits
        untouched = load_causal_lm(str(base))(input_ids=ids).logits
    assert (expected - untouched).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(merged.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_an_adapter_trained_on_another_decoder_is_refused(tmp_path: Path) -> None:
    from tiny_decoders import save_tiny_adapter, save_tiny_decoder

    from metatt_deploy.common.errors import MetaTTError

    _, adapter_dir = save_tiny_adapter(tmp_path, "llama")
    other = save_tiny_decoder(tmp_path / "other", "llama", seed=1)
    with pytest.raises(MetaTTError, match="adapter was trained on base model"):
        merge_adapter(adapter_dir, tmp_path / "merged", base_model=str(other))
    assert not (tmp_path / "merged").exists()
