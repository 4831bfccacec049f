"""Multi-task MetaTT-(4+1)D: task specs, sampling, per-row routing, merging per task, joint training,
checkpoint/resume, and adding a task against a frozen adapter. Tiny random models only.

`build_tiny_multitask` is shared with test_factored.py and test_runtime.py.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from metatt_deploy import model as mt
from metatt_deploy import tt
from metatt_deploy.base import load_tokenizer
from metatt_deploy.errors import MetaTTError
from metatt_deploy.merge import merge_adapter
from metatt_deploy.multitask import (
    PAD_LOGIT,
    MultiTaskConfig,
    build_multitask,
    bundle_id,
    epoch_plan,
    load_multitask,
    parameter_counts,
    parse_task_spec,
    routers,
    save_multitask,
    task_probabilities,
    train_from_cli,
)
from tiny_models import inputs, tiny_model

LABELS = {"movie": ["negative", "positive"], "nli": ["entailment", "neutral", "contradiction"], "four": ["a", "b", "c", "d"]}


def randomise(mtm, seed: int = 1) -> None:
    """Non-trivial cores (every core normal) and heads, so parity checks are real checks."""
    cfg = mtm.adapter_config
    mtm.metatt.set_cores(tt.init_cores("-".join(["no"] * len(cfg.mode_names)), cfg.core_shapes(), seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers(mtm.model):
            for p in r.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    mtm.eval()


def build_tiny_multitask(root: Path, seed: int = 0, labels: dict | None = None, core_seed: int = 1):
    """A tiny BERT base folder (embedded tokenizer) and a saved 3-task adapter with random cores and heads."""
    labels = labels or LABELS
    tokenizer = load_tokenizer(None)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2, num_labels=2)
    torch.manual_seed(seed)
    base = root / "base"
    if not base.exists():
        BertForSequenceClassification(config).eval().save_pretrained(base)
        tokenizer.save_pretrained(base)
    model = mt.load_classifier(str(base), labels[next(iter(labels))])
    mtm = build_multitask(model, list(labels), labels, rank=4, base_model=str(base))
    randomise(mtm, core_seed)
    adapter = save_multitask(mtm, root / f"adapter-{core_seed}", tokenizer)
    return base, adapter, mtm, tokenizer


# ---------------------------------------------------------------- specs and sampling


def test_task_specs() -> None:
    assert parse_task_spec("snli") == parse_task_spec("snli=snli")
    s = parse_task_spec("nli=snli")
    assert (s.name, s.dataset, s.files) == ("nli", "snli", [])
    s = parse_task_spec("mine=data/tr.jsonl, data/va.csv,data/te.tsv")
    assert s.dataset is None and s.files == ["data/tr.jsonl", "data/va.csv", "data/te.tsv"]
    assert parse_task_spec("g=glue/mrpc").dataset == "glue/mrpc"
    for bad in ("=snli", "a b=snli", "x=a.jsonl,b.txt", "x=a.jsonl,b.jsonl,c.jsonl,d.jsonl", "x=snli,imdb"):
        with pytest.raises(MetaTTError, match="--task"):
            parse_task_spec(bad)


def test_task_probabilities_and_epoch_plan() -> None:
    np.testing.assert_allclose(task_probabilities([100, 300]), [0.25, 0.75])
    np.testing.assert_allclose(task_probabilities([100, 400], "temperature", 2.0), [1 / 3, 2 / 3])
    np.testing.assert_allclose(task_probabilities([100, 400], "temperature", 1e6), [0.5, 0.5], atol=1e-5)
    with pytest.raises(MetaTTError, match="temperature"):
        task_probabilities([1, 2], "temperature", 0)
    with pytest.raises(MetaTTError, match="task-sampling"):
        task_probabilities([1, 2], "uniform")
    lengths = [[5 + i % 7 for i in range(40)], [3] * 10, [9] * 23]
    probs = task_probabilities([40, 10, 23])
    plan = epoch_plan(lengths, 8, probs, seed=3, epoch=1)
    assert plan == epoch_plan(lengths, 8, probs, seed=3, epoch=1)  # a pure function: resumes replay it
    assert plan != epoch_plan(lengths, 8, probs, seed=3, epoch=2)
    assert len(plan) == 5 + 2 + 3
    for t, idx in plan:
        assert len(idx) == 8 and all(0 <= i < len(lengths[t]) for i in idx)
    # a task drawn more often than its size cycles through all its rows before repeating one
    many = epoch_plan([[1] * 10, [1] * 1000], 5, [0.5, 0.5], seed=0, epoch=0)
    rows = [i for t, idx in many if t == 0 for i in idx]
    assert sorted(rows[:10]) == list(range(10))


def test_config_checks() -> None:
    with pytest.raises(MetaTTError, match="at least two"):
        MultiTaskConfig(output="x", tasks=["a=snli"]).check()
    with pytest.raises(MetaTTError, match="lora"):
        MultiTaskConfig(output="x", tasks=["a=snli", "b=snli"], method="lora").check()
    with pytest.raises(MetaTTError, match="rank-schedule"):
        MultiTaskConfig(output="x", tasks=["a=snli", "b=snli"], rank_schedule="8,1:4").check()


# ---------------------------------------------------------------- routing, heads, merging


@pytest.mark.parametrize("arch", ["bert", "distilbert", "llama"])
def test_logits_layout_mixed_rows_and_merge_per_task(arch: str) -> None:
    mtm = build_multitask(tiny_model(arch), list(LABELS), LABELS, rank=4)
    cfg = mtm.adapter_config
    assert cfg.mode_names == ["in", "layer", "matrix", "task", "out"] and cfg.mode_size("task") == 3
    randomise(mtm)
    batch = inputs(batch=5)
    ids = torch.tensor([2, 0, 1, 2, 1])
    with torch.no_grad():
        mixed = mtm(**batch, task_ids=ids).logits
        alone = torch.cat([mtm(**{k: v[i:i + 1] for k, v in batch.items()}, task_ids=int(t)).logits for i, t in enumerate(ids)])
    assert mixed.shape == (5, 4)
    assert (mixed - alone).abs().max() <= 1e-5  # a row of a mixed batch gets what it gets alone (to fp32 rounding)
    for row, t in zip(mixed, ids.tolist()):
        n = len(LABELS[cfg.tasks[t]])
        assert torch.all(row[n:] == PAD_LOGIT) and torch.all(row[:n] > PAD_LOGIT / 2)
    # names and per-row lists work like ids
    with torch.no_grad():
        assert torch.equal(mtm(**batch, task_ids=["four", "movie", "nli", "four", "nli"]).logits, mixed)
    for t, task in enumerate(cfg.tasks):
        merged = mt.merge_and_unload(copy.deepcopy(mtm.model), task)
        assert merged.config.num_labels == len(LABELS[task]) and merged.config.id2label[0] == LABELS[task][0]
        with torch.no_grad():
            dense = merged(**batch).logits
            ref = mtm(**batch, task_ids=t).logits[:, : len(LABELS[task])]
        assert (dense - ref).abs().max() <= 1e-5


def test_unknown_tasks_are_errors_and_grads_stay_in_the_rows_task() -> None:
    mtm = build_multitask(tiny_model("bert"), list(LABELS), LABELS, rank=4)
    randomise(mtm)
    batch = inputs(batch=2)
    for bad, match in ((5, "unknown task id 5"), (-1, "unknown task id -1"), ("nope", "unknown task 'nope'"),
                       (torch.tensor([0, 3]), "unknown task id 3"), (torch.tensor([0]), "one task id per row")):
        with pytest.raises(MetaTTError, match=match):
            mtm(**batch, task_ids=bad)
    with pytest.raises(MetaTTError, match="pass task_ids"):
        mtm(**batch)
    mtm.train()
    out = mtm(**batch, task_ids=torch.tensor([1, 1]), labels=torch.tensor([2, 0]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    task_core = mtm.metatt.cores[3].grad
    assert task_core[:, 1].abs().sum() > 0 and task_core[:, [0, 2]].abs().sum() == 0
    heads = routers(mtm.model)[0].heads
    assert heads[1].weight.grad.abs().sum() > 0
    assert all(h.weight.grad is None or h.weight.grad.abs().sum() == 0 for h in (heads[0], heads[2]))


def test_parameter_counts_follow_the_paper() -> None:
    mtm = build_multitask(tiny_model("bert"), list(LABELS), LABELS, rank=4)
    counts = parameter_counts(mtm)
    d, L, M, T, r = 32, 2, 4, 3, 4  # (D_in + D_out) r + (L + M) r^2, plus T r^2 for the task core
    assert counts["shared_cores"] == 2 * d * r + (L + M) * r * r
    assert counts["adapter_total"] == counts["shared_cores"] + T * r * r
    assert counts["per_task"]["nli"] == {"task_slice": r * r, "head": 3 * d + 3, "total": r * r + 3 * d + 3}


def test_saved_adapter_merges_per_task_into_a_plain_hf_model(tmp_path: Path) -> None:
    base, adapter, mtm, tokenizer = build_tiny_multitask(tmp_path)
    loaded, config, _ = load_multitask(adapter)
    enc = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**enc, task_ids=[2, 1]).logits, mtm(**enc, task_ids=[2, 1]).logits)
    with pytest.raises(MetaTTError, match="several tasks"):
        merge_adapter(adapter, tmp_path / "m")
    merge_adapter(adapter, tmp_path / "nli", task="nli")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "nli").eval()  # no metatt code involved
    assert plain.config.id2label == dict(enumerate(LABELS["nli"]))
    with torch.no_grad():
        assert (plain(**enc).logits - mtm(**enc, task_ids="nli").logits[:, :3]).abs().max() <= 1e-5


# ---------------------------------------------------------------- training


def _task_files(root: Path, name: str, make, n: int) -> str:
    rng = random.Random(name)
    for split, k in (("train", n), ("validation", 10), ("test", 10)):
        (root / f"{name}.{split}.jsonl").write_text("".join(json.dumps(make(rng)) + "\n" for _ in range(k)))
    return f"{name}=" + ",".join(str(root / f"{name}.{s}.jsonl") for s in ("train", "validation", "test"))


WORDS = ["good", "bad", "fine", "awful", "great", "poor"]


def _sentiment(rng):
    w = rng.choice(WORDS)
    return {"text": f"this is {w} stuff", "label": "pos" if WORDS.index(w) % 2 == 0 else "neg"}


def _nli(rng):
    return {"premise": "a man sleeps", "hypothesis": rng.choice(["a man rests", "a cat", "a man runs"]),
            "label": rng.choice(["entailment", "neutral", "contradiction"])}


def _four(rng):
    i = rng.randrange(20)
    return {"text": f"item {i} here", "label": f"c{i % 4}"}


KNOBS = dict(epochs=2, batch_size=8, max_length=24, rank=4, lr=1e-2, save_steps=3, task_sampling="temperature", temperature=2.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt-train")
    base, _, _, _ = build_tiny_multitask(root)
    specs = [_task_files(root, "sent", _sentiment, 24), _task_files(root, "nli", _nli, 16), _task_files(root, "four", _four, 20)]
    result = train_from_cli(output=str(root / "run"), specs=specs, add_task=None, from_adapter=None, model=str(base), **KNOBS)
    return root, base, specs, result


def test_joint_training_logs_every_task_and_core(trained) -> None:
    root, _, _, result = trained
    run = root / "run"
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    for h in result["history"]:
        assert set(h["tasks"]) == {"sent", "nli", "four"}
        assert set(h["grad_norm_rms"]) == {"G1 (in)", "G2 (layer)", "G3 (matrix)", "G4 (task)", "G5 (out)"}
        assert all(v > 0 for v in h["grad_norm_rms"].values())
        assert sum(h["batches_per_task"].values()) == 3 + 2 + 3
    assert set(result["test"]) == {"sent", "nli", "four"}
    assert "macro_f1" in result["test"]["four"] and "f1" in result["test"]["sent"]
    probs = [t["sampling_probability"] for t in result["tasks"]]
    np.testing.assert_allclose(probs, task_probabilities([24, 16, 20], "temperature", 2.0))
    for f in ("metrics.json", "metrics.md", "curves.png", "best/metatt_config.json"):
        assert (run / f).is_file(), f
    assert "Gradient norm per core" in (run / "metrics.md").read_text()
    loaded, config, _ = load_multitask(run / "best")
    assert config.tasks == ["sent", "nli", "four"] and loaded.num_labels == [2, 3, 4]


def test_interrupted_run_resumes_to_the_same_result(trained, monkeypatch) -> None:
    root, base, specs, result = trained
    import metatt_deploy.multitask as mtmod

    original = mtmod.epoch_plan
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        plan = original(*args, **kwargs)
        if calls["n"] == 2:  # second epoch: stop after 2 of its steps (a checkpoint was written at step 9)
            return plan[:1] + [(None, None)]
        return plan

    monkeypatch.setattr(mtmod, "epoch_plan", interrupted)
    with pytest.raises(Exception):
        train_from_cli(output=str(root / "resumed"), specs=specs, add_task=None, from_adapter=None, model=str(base), **KNOBS)
    state = json.loads((root / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["global_step"] == 9
    monkeypatch.setattr(mtmod, "epoch_plan", original)
    again = train_from_cli(output=str(root / "resumed"), specs=specs, add_task=None, from_adapter=None, model=str(base), **KNOBS)
    assert again["steps"] == result["steps"]
    for a, b in zip(again["history"], result["history"]):
        for task in a["tasks"]:
            assert a["tasks"][task]["accuracy"] == pytest.approx(b["tasks"][task]["accuracy"])
    x, _, _ = load_multitask(root / "resumed" / "best", tokenizer=False)
    y, _, _ = load_multitask(root / "run" / "best", tokenizer=False)
    for p, q in zip(x.metatt.cores, y.metatt.cores):
        assert torch.allclose(p, q, atol=1e-5)


def test_add_task_trains_only_the_new_slice_and_head(trained) -> None:
    root, _, _, _ = trained
    spec = _task_files(root, "extra", _sentiment, 16)
    result = train_from_cli(output=str(root / "added"), specs=[], add_task=spec, from_adapter=str(root / "run" / "best"),
                            model=None, epochs=1, batch_size=8, max_length=24, rank=4, lr=5e-2, weight_decay=0.1)
    old, old_cfg, _ = load_multitask(root / "run" / "best", tokenizer=False)
    new, new_cfg, _ = load_multitask(root / "added" / "best", tokenizer=False)
    assert new_cfg.tasks == ["sent", "nli", "four", "extra"] and new.num_labels[-1] == 2
    t = new_cfg.mode_names.index("task")
    for k, (a, b) in enumerate(zip(old.metatt.cores, new.metatt.cores)):
        if k == t:
            assert torch.equal(a, b[:, :3]) and not torch.equal(b[:, 3], b[:, :3].mean(dim=1))
        else:
            assert torch.equal(a, b)
    for ra, rb in zip(routers(old.model), routers(new.model)):
        for ha, hb in zip(ra.heads, rb.heads[:3]):
            assert all(torch.equal(p, q) for p, q in zip(ha.parameters(), hb.parameters()))
    assert bundle_id(old_cfg, list(old.metatt.cores)) == bundle_id(new_cfg, list(new.metatt.cores))
    assert result["trainable_parameters"]["trained_in_this_run"] == 16 + 2 * 32 + 2
    assert set(result["history"][0]["tasks"]) == {"extra"}
    with pytest.raises(MetaTTError, match="already in this adapter"):
        train_from_cli(output=str(root / "again"), specs=[], add_task=spec.replace("extra=", "nli="),
                       from_adapter=str(root / "run" / "best"), model=None, epochs=1, batch_size=8, max_length=24)


def test_cli_train_options_and_errors(trained) -> None:
    from typer.testing import CliRunner

    from metatt_deploy.cli import app

    root, base, specs, _ = trained
    runner = CliRunner()
    out = root / "cli"
    res = runner.invoke(app, ["train", "-o", str(out), "--model", str(base), "--task", specs[0], "--task", specs[1],
                              "--max-steps", "2", "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--rank", "2"])
    assert res.exit_code == 0, res.output
    assert "best mean validation accuracy" in res.output and (out / "best" / "metatt_config.json").is_file()
    for args, message in (
        (["--task", specs[0]], "at least two"),
        (["--task", "bad name=snli", "--task", specs[1]], "bad --task"),
        (["--task", specs[0], "--task", specs[0]], "repeat"),
        (["--task", specs[0], "--task", specs[1], "--dataset", "snli"], "drop --dataset"),
        (["--add-task", specs[0]], "needs --from"),
        (["--task", specs[0], "--task", specs[1], "--task-sampling", "uniform"], "task-sampling"),
    ):
        res = runner.invoke(app, ["train", "-o", str(root / "err"), "--model", str(base), *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
