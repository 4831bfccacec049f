"""Multi-task training (multitask_train.py): task specs, sampling, the joint loop, checkpoint/resume,
and adding a task against a frozen adapter. Tiny random models only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from multitask_fixtures import assert_only_new_slice_moved, build_tiny_multitask, train_specs
from safetensors.torch import load_file
from typer.testing import CliRunner

from metatt_deploy.adapters.heads import routers
from metatt_deploy.adapters.multitask import bundle_id, load_multitask
from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.inference.formats import task_records
from metatt_deploy.training.config import MultiTaskConfig
from metatt_deploy.training.multitask import parse_task_spec
from metatt_deploy.training.sampling import epoch_plan, parse_task_weights, task_loss_weights, task_probabilities

# ---------------------------------------------------------------- specs and sampling


def test_task_specs() -> None:
    assert parse_task_spec("snli") == parse_task_spec("snli=snli")
    s = parse_task_spec("nli=snli")
    assert (s.name, s.dataset, s.files) == ("nli", "snli", {})
    s = parse_task_spec("mine=data/tr.jsonl, data/va.csv,data/te.tsv")
    assert s.dataset is None and s.files == {"train": "data/tr.jsonl", "validation": "data/va.csv", "test": "data/te.tsv"}
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


def test_task_weights_parse_and_check() -> None:
    assert parse_task_weights(["snli=2", "movie=0.5, tweet=1"]) == {"snli": 2.0, "movie": 0.5, "tweet": 1.0}
    assert parse_task_weights([]) == {}
    for bad in ("snli", "snli=", "=2", "snli=0", "snli=-1", "snli=inf", "snli=x"):
        with pytest.raises(MetaTTError, match="--task-weight"):
            parse_task_weights([bad])
    with pytest.raises(MetaTTError, match="twice"):
        parse_task_weights(["a=2", "a=3"])
    assert task_loss_weights(["a", "b"], {"b": 2.0}) == [1.0, 2.0]
    assert task_loss_weights(["a", "b"], {"a": 1.0}) is None  # all ones: the loop multiplies nothing
    with pytest.raises(MetaTTError, match="unknown task.*c.*a, b"):
        task_loss_weights(["a", "b"], {"c": 2.0})


def test_config_checks() -> None:
    with pytest.raises(MetaTTError, match="at least two"):
        MultiTaskConfig(output="x", tasks=["a=snli"]).check()
    with pytest.raises(MetaTTError, match="lora"):
        MultiTaskConfig(output="x", tasks=["a=snli", "b=snli"], method="lora").check()
    MultiTaskConfig(output="x", tasks=["a=snli", "b=snli"], rank_schedule="8,1:4").check()  # one loop: schedules work jointly
    with pytest.raises(MetaTTError, match="rank-schedule"):
        MultiTaskConfig(output="x", tasks=["c=snli"], add_task_from="run/best", rank_schedule="8,1:4").check()
    with pytest.raises(MetaTTError, match="task-weight"):
        MultiTaskConfig(output="x", tasks=["c=snli"], add_task_from="run/best", task_weights={"c": 2.0}).check()
    with pytest.raises(MetaTTError, match="task-weight"):
        MultiTaskConfig(output="x", tasks=["a=snli", "b=snli"], task_weights={"a": 0.0}).check()


def test_learning_rate_defaults() -> None:
    joint = MultiTaskConfig(output="x", tasks=["a=snli", "b=snli"])
    # the single-task MetaTT-4D defaults; 5e-3 for the shared cores left every task at chance
    assert (joint.lr, joint.head_lr) == (3e-3, 5e-3)
    added = MultiTaskConfig(output="x", tasks=["c=snli"], add_task_from="run/best")
    assert (added.lr, added.head_lr) == (5e-3, 5e-3)  # one slice + one head, nothing shared
    given = MultiTaskConfig(output="x", tasks=["a=snli", "b=snli"], lr=2e-3, head_lr=1e-2)
    assert (given.lr, given.head_lr) == (2e-3, 1e-2)


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
    return {
        "premise": "a man sleeps",
        "hypothesis": rng.choice(["a man rests", "a cat", "a man runs"]),
        "label": rng.choice(["entailment", "neutral", "contradiction"]),
    }


def _pair(rng):
    """A pair task whose labels name no relation: only its recorded text columns say it takes pairs."""
    i = rng.randrange(20)
    j = i if i % 2 else i + 1
    return {"sentence1": f"item {i}", "sentence2": f"item {j}", "label": "same" if i == j else "other"}


def _four(rng):
    i = rng.randrange(20)
    return {"text": f"item {i} here", "label": f"c{i % 4}"}


KNOBS = dict(epochs=2, batch_size=8, max_length=24, rank=4, lr=1e-2, save_steps=3, task_sampling="temperature", temperature=2.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt-train")
    base, _, _, _ = build_tiny_multitask(root)
    specs = [_task_files(root, "sent", _sentiment, 24), _task_files(root, "nli", _nli, 16), _task_files(root, "four", _four, 20)]
    result = train_specs(str(root / "run"), specs, model=str(base), **KNOBS)
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


def test_rank_schedule_in_a_joint_run_ends_at_the_final_ranks(trained) -> None:
    """The one loop cuts a (4+1)D train too; best/ is chosen among epochs at the final ranks."""
    root, base, specs, _ = trained
    result = train_specs(
        str(root / "scheduled"),
        specs,
        model=str(base),
        **{**KNOBS, "rank_schedule": "4,1:2"},
    )
    assert [h["ranks"] for h in result["history"]] == [[4, 4, 4, 4], [2, 2, 2, 2]]
    assert result["best"]["epoch"] == 2
    _, config, _ = load_multitask(root / "scheduled" / "best")
    assert config.ranks == [2, 2, 2, 2]


def test_task_weight_scales_that_tasks_gradient(trained) -> None:
    """One step, the same batch and dropout: weighting the drawn task by 3 triples every core's
    gradient; weighting only another task changes nothing."""
    root, base, specs, _ = trained

    def one_step(name: str, weights: dict[str, float]) -> tuple[str, np.ndarray]:
        result = train_specs(
            str(root / name),
            specs,
            model=str(base),
            **{**KNOBS, "max_steps": 1, "task_weights": weights},
        )
        entry = result["history"][0]
        drawn = next(t for t, n in entry["batches_per_task"].items() if n)
        return drawn, np.array(list(entry["grad_norm_rms"].values()))

    drawn, plain = one_step("w-none", {})
    other = next(n for n in ("sent", "nli", "four") if n != drawn)
    _, weighted = one_step("w-drawn", {drawn: 3.0, other: 0.5})
    np.testing.assert_allclose(weighted, 3.0 * plain, rtol=1e-5)
    _, elsewhere = one_step("w-other", {other: 5.0})
    np.testing.assert_allclose(elsewhere, plain, rtol=1e-6)
    saved = json.loads((root / "w-drawn" / "metrics.json").read_text())
    assert {t["name"]: t["loss_weight"] for t in saved["tasks"]}[drawn] == 3.0
    assert "loss weight" in (root / "w-drawn" / "metrics.md").read_text()


def test_interrupted_run_resumes_to_the_same_result(trained, monkeypatch) -> None:
    root, base, specs, result = trained
    import metatt_deploy.training.loop as loop_module

    original = loop_module.epoch_plan
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        plan = original(*args, **kwargs)
        if calls["n"] == 2:  # second epoch: stop after 2 of its steps (a checkpoint was written at step 9)
            return plan[:1] + [(None, None)]
        return plan

    monkeypatch.setattr(loop_module, "epoch_plan", interrupted)
    with pytest.raises(TypeError):  # the (None, None) sentinel step
        train_specs(str(root / "resumed"), specs, model=str(base), **KNOBS)
    state = json.loads((root / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["global_step"] == 9
    monkeypatch.setattr(loop_module, "epoch_plan", original)
    again = train_specs(str(root / "resumed"), specs, model=str(base), **KNOBS)
    assert again["steps"] == result["steps"]
    for a, b in zip(again["history"], result["history"]):
        for task in a["tasks"]:
            assert a["tasks"][task]["accuracy"] == pytest.approx(b["tasks"][task]["accuracy"])
    x, _, _ = load_multitask(root / "resumed" / "best", tokenizer=False)
    y, _, _ = load_multitask(root / "run" / "best", tokenizer=False)
    for p, q in zip(x.metatt.cores, y.metatt.cores):
        assert torch.allclose(p, q, atol=1e-5)
    # best/ may be epoch 1, from before the interruption: the final checkpoints (cores, heads,
    # AdamW moments after every step, dropout active) show that the resumed steps were the same steps
    final = [load_file(str(root / r / "checkpoint" / "trainable.safetensors")) for r in ("resumed", "run")]
    assert final[0].keys() == final[1].keys()
    for k in final[0]:
        assert torch.allclose(final[0][k], final[1][k], atol=1e-6, rtol=1e-5), k


def test_add_task_trains_only_the_new_slice_and_head(trained) -> None:
    root, _, _, _ = trained
    spec = _task_files(root, "extra", _pair, 16)
    result = train_specs(
        str(root / "added"),
        [spec],
        add_task_from=str(root / "run" / "best"),
        epochs=1,
        batch_size=8,
        max_length=24,
        rank=4,
        lr=5e-2,
        weight_decay=0.1,
    )
    old, old_cfg, _ = load_multitask(root / "run" / "best", tokenizer=False)
    new, new_cfg, _ = load_multitask(root / "added" / "best", tokenizer=False)
    assert new_cfg.tasks == ["sent", "nli", "four", "extra"] and new.num_labels[-1] == 2
    assert_only_new_slice_moved(old, new, new_cfg.mode_names.index("task"))
    for ra, rb in zip(routers(old.model), routers(new.model)):
        for ha, hb in zip(ra.heads, rb.heads[:3]):
            assert all(torch.equal(p, q) for p, q in zip(ha.parameters(), hb.parameters()))
    assert bundle_id(old_cfg, list(old.metatt.cores)) == bundle_id(new_cfg, list(new.metatt.cores))
    assert result["trainable_parameters"]["trained_in_this_run"] == 16 + 2 * 32 + 2
    assert set(result["history"][0]["tasks"]) == {"extra"}
    # every task's training columns are recorded, the added one's too, and reach a deployed bundle's task records
    assert {t: new_cfg.text_columns(t) for t in new_cfg.tasks} == {
        "sent": ["text"],
        "nli": ["premise", "hypothesis"],
        "four": ["text"],
        "extra": ["sentence1", "sentence2"],
    }
    bundle = root / "bundle"
    write_bundle(root / "run" / "best", bundle)
    write_bundle(root / "added" / "best", bundle, tasks=["extra"])
    assert {r["task"]: r["text_columns"] for r in task_records(bundle)}["extra"] == ["sentence1", "sentence2"]
    res = CliRunner().invoke(app, ["predict", str(bundle), "--task", "extra", "--text", "item 1"])
    assert res.exit_code == 2 and "task 'extra' takes a sentence pair" in res.output, res.output
    res = CliRunner().invoke(app, ["predict", str(bundle), "--task", "extra", "--text", "item 1 ||| item 1"])
    assert res.exit_code == 0, res.output
    with pytest.raises(MetaTTError, match="already in this adapter"):
        train_specs(
            str(root / "again"),
            [spec.replace("extra=", "nli=")],
            add_task_from=str(root / "run" / "best"),
            epochs=1,
            batch_size=8,
            max_length=24,
        )


def test_cli_train_options_and_errors(trained) -> None:
    from typer.testing import CliRunner

    from metatt_deploy.cli import app

    root, base, specs, _ = trained
    runner = CliRunner()
    out = root / "cli"
    res = runner.invoke(
        app,
        [
            "train",
            "-o",
            str(out),
            "--model",
            str(base),
            "--task",
            specs[0],
            "--task",
            specs[1],
            "--max-steps",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--max-length",
            "16",
            "--rank",
            "2",
        ],
    )
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
