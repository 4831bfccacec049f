"""Multi-task MetaTT-(4+1)D on causal LMs (training/multitask.py with text-to-text tasks): the joint
run, per-task exact match and perplexity every epoch, --add-task, and the CLI on builtin tasks.
Tiny random Llama only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from multitask_fixtures import assert_only_new_slice_moved, train_specs
from tiny_decoders import save_tiny_decoder
from typer.testing import CliRunner

from metatt_deploy.adapters.multitask import bundle_id, load_multitask
from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError

TASKS = {
    "sent": [(f"Review: this was {w} today", a) for w, a in (("good", "positive"), ("bad", "negative"), ("great", "positive"))],
    "nli": [(f"Premise: a man plays. Hypothesis: a {w} plays.", a) for w, a in (("person", "entailment"), ("cat", "contradiction"))],
    "city": [("What is the capital of France?", "Paris"), ("What is the capital of the sea?", "none")],
}
KNOBS = dict(epochs=2, batch_size=4, max_length=64, rank=4, lr=5e-2, targets=["q", "k", "v", "o", "gate", "up", "down"])


def _files(root: Path, name: str, n: int) -> str:
    pairs = TASKS[name]
    for split, k in (("train", n), ("validation", 6), ("test", 6)):
        rows = [{"prompt": pairs[i % len(pairs)][0], "response": pairs[i % len(pairs)][1]} for i in range(k)]
        (root / f"{name}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"{name}=" + ",".join(str(root / f"{name}.{s}.jsonl") for s in ("train", "validation", "test"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt-lm")
    base = save_tiny_decoder(root, "llama")
    specs = [_files(root, "sent", 24), _files(root, "nli", 16), _files(root, "city", 16)]
    result = train_specs(str(root / "run"), specs, model=str(base), **KNOBS)
    return root, base, result


def test_joint_causal_run_scores_every_task_every_epoch(trained) -> None:
    root, _, result = trained
    assert result["task_type"] == "causal-lm" and result["primary_metric"] == "exact_match"
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    for h in result["history"]:
        assert set(h["tasks"]) == {"sent", "nli", "city"}
        for m in h["tasks"].values():
            assert 0.0 <= m["exact_match"] <= 1.0 and m["perplexity"] > 1.0 and m["examples"] == 6
        assert h["mean_exact_match"] == pytest.approx(sum(m["exact_match"] for m in h["tasks"].values()) / 3)
        assert set(h["grad_norm_rms"]) == {"G1 (in)", "G2 (layer)", "G3 (matrix)", "G4 (task)", "G5 (out)"}
    first, last = result["history"]
    assert last["mean_perplexity"] < first["mean_perplexity"]  # the responses become likelier
    assert set(result["test"]) == {"sent", "nli", "city"}
    counts = result["trainable_parameters"]
    assert all(v["head"] == 0 and v["task_slice"] == 16 for v in counts["per_task"].values())  # a decoder has no head
    report = (root / "run" / "metrics.md").read_text()
    assert "sent exact match" in report and "sent perplexity" in report
    mtm, config, _ = load_multitask(root / "run" / "best")
    assert config.kind.generates and config.tasks == ["sent", "nli", "city"] and config.mode_names[3] == "task"


def test_causal_multitask_model_routes_tasks_per_row_and_per_generation(trained) -> None:
    root, _, _ = trained
    mtm, _, tok = load_multitask(root / "run" / "best")
    ids = torch.tensor([tok("Review: this was good today").input_ids] * 2)
    alone = [mtm(input_ids=ids[:1], task_ids=t).logits for t in ("sent", "city")]
    mixed = mtm(input_ids=ids, task_ids=["sent", "city"]).logits
    assert not torch.allclose(alone[0], alone[1], atol=1e-4)  # the task slice matters
    for row in range(2):
        torch.testing.assert_close(mixed[row : row + 1], alone[row], atol=1e-5, rtol=0)
    out = mtm.generate(ids[:1], task_ids="nli", max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)
    with pytest.raises(MetaTTError, match="unknown task"):
        mtm.generate(ids[:1], task_ids="nope", max_new_tokens=1)
    with pytest.raises(MetaTTError, match="pass task_ids"):
        mtm.generate(ids[:1], max_new_tokens=1)


def test_add_task_to_a_causal_adapter_moves_only_its_slice(trained) -> None:
    root, _, _ = trained
    spec = _files(root, "city", 8).replace("city=", "extra=")
    result = train_specs(str(root / "added"), [spec], add_task_from=str(root / "run" / "best"), epochs=1, batch_size=8)
    old, old_cfg, _ = load_multitask(root / "run" / "best", tokenizer=False)
    new, new_cfg, _ = load_multitask(root / "added" / "best", tokenizer=False)
    assert new_cfg.tasks == ["sent", "nli", "city", "extra"] and new_cfg.kind.generates
    assert_only_new_slice_moved(old, new, new_cfg.mode_names.index("task"))
    assert bundle_id(old_cfg, list(old.metatt.cores)) == bundle_id(new_cfg, list(new.metatt.cores))
    assert result["trainable_parameters"]["trained_in_this_run"] == 16 and set(result["history"][0]["tasks"]) == {"extra"}
    assert "exact_match" in result["history"][0]["tasks"]["extra"]


def test_cli_trains_builtin_text_tasks_jointly(trained) -> None:
    root, base, _ = trained
    common = ["--model", str(base), "--max-train-samples", "8", "--max-eval-samples", "2", "--epochs", "1", "--batch-size", "8"]
    common += ["--max-length", "512", "--rank", "2", "--targets", "q,v"]
    tasks = ["--task", "nli=snli", "--task", "tweet=tweet-sentiment", "--task", "news=nyt-sentiment"]
    res = CliRunner().invoke(app, ["train", "-o", str(root / "builtin"), *common, *tasks])
    assert res.exit_code == 0, res.output
    assert "best mean validation exact match" in res.output and "test exact match: nli" in res.output
    metrics = json.loads((root / "builtin" / "metrics.json").read_text())
    assert [t["name"] for t in metrics["tasks"]] == ["nli", "tweet", "news"]
    res = CliRunner().invoke(app, ["train", "-o", str(root / "bad"), *common, "--task", "a=snli", "--task", "b=snli", "--labels", "x,y"])
    assert res.exit_code == 2 and "--labels" in res.output
