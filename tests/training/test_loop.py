"""The training loop on a tiny BERT: both methods end to end, outputs, data order, refusals."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from metatt_deploy.adapters.base_model import load_classifier
from metatt_deploy.adapters.config import WEIGHTS_NAME
from metatt_deploy.adapters.model import get_adapter, load_adapter
from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.training.config import DEFAULT_MAX_GRAD_NORM, MultiTaskConfig, TrainConfig, changed_settings
from metatt_deploy.training.loop import collapse_note
from metatt_deploy.training.sampling import epoch_order
from metatt_deploy.training.single import train
from metatt_deploy.tt.cores import init_cores


def _cfg(tiny_base, out, **kw) -> TrainConfig:
    base = dict(output=str(out), model=str(tiny_base), rank=4, lr=1e-2, epochs=2, batch_size=8, max_length=16, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["metatt-4d", "metatt-5d", "lora", "vera"])
def test_each_method_trains_evaluates_and_writes_its_reports(tiny_base, tiny_task, tmp_path, method):
    result = train(_cfg(tiny_base, tmp_path / "run", method=method), tiny_task)
    run = tmp_path / "run"
    for name in ("metrics.json", "metrics.md", "curves.png", "train_config.json", "checkpoint/state.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    assert saved["steps"] == 2 * 4
    assert 0.0 <= saved["test"]["accuracy"] <= 1.0
    assert saved["best"]["accuracy"] == max(h["accuracy"] for h in saved["history"])
    counts = result["trainable_parameters"]
    assert counts["head"] == 32 * 2 + 2  # the classifier of a width-32, 2-label BERT
    if method == "lora":  # PEFT: 2 layers x 4 matrices x (32 + 32) x r
        assert counts["adapter"] == 2 * 4 * 64 * 4
        assert (run / "best" / "adapter_model.safetensors").is_file()
    elif method == "vera":  # VeRA: per matrix a vector of d_out and one of r, the projections frozen
        assert counts["adapter"] == 2 * 4 * (32 + 4)
        assert json.loads((run / "best" / "metatt_lora.json").read_text())["method"] == "vera"
    else:
        weights = load_file(str(run / "best" / WEIGHTS_NAME))
        assert counts["adapter"] == sum(v.numel() for k, v in weights.items() if k.startswith("core."))


def test_training_moves_the_adapter_and_head_but_not_the_base(tiny_base, tiny_task, tmp_path):
    train(_cfg(tiny_base, tmp_path / "run", epochs=1), tiny_task)
    model, config, _ = load_adapter(tmp_path / "run" / "best", base_model=str(tiny_base))  # fingerprint: base unchanged
    cores = [c.detach() for c in get_adapter(model).cores]
    initial = init_cores(config.init, [tuple(c.shape) for c in cores])
    assert cores[0].abs().max() > 0  # the ze core has left zero
    assert any(not torch.equal(a, b) for a, b in zip(cores[1:], initial[1:]))
    fresh = load_classifier(str(tiny_base), ["negative", "positive"])
    assert not torch.equal(model.classifier.weight, fresh.classifier.weight)


def test_finished_run_is_not_overwritten_without_force(tiny_base, tiny_task, tmp_path):
    cfg = _cfg(tiny_base, tmp_path / "run", epochs=1)
    train(cfg, tiny_task)
    (tmp_path / "run" / "checkpoint" / "state.json").unlink()  # finished, nothing to resume
    with pytest.raises(MetaTTError, match="--force"):
        train(cfg, tiny_task)
    train(cfg, tiny_task, force=True)


def test_a_checkpoint_of_other_settings_is_not_resumed(tiny_base, tiny_task, tmp_path):
    train(_cfg(tiny_base, tmp_path / "run", epochs=1), tiny_task)
    with pytest.raises(MetaTTError, match=r"other settings: rank \(saved 4, now 2\)"):
        train(_cfg(tiny_base, tmp_path / "run", epochs=1, rank=2), tiny_task)


def test_a_collapsed_run_is_named_with_the_fix():
    """MCC exactly 0 on the best epoch (one class predicted for every example) is reported per task."""
    assert collapse_note({"accuracy": 0.8, "mcc": 0.61}, ["movie"], 3e-3) is None
    assert collapse_note(None, ["movie"], 3e-3) is None
    note = collapse_note({"accuracy": 0.503, "f1": 0.0, "mcc": 0.0}, ["movie"], 3e-3)
    assert note is not None and "single class on movie" in note and "lower --lr than 0.003 (e.g. 0.001)" in note
    joint = {"tasks": {"snli": {"mcc": 0.0}, "movie": {"mcc": 0.55}, "tweet": {"mcc": 0.0}}, "mean_accuracy": 0.5}
    assert "single class on snli, tweet (" in (collapse_note(joint, ["snli", "movie", "tweet"], 3e-3) or "")
    assert collapse_note({"tasks": {"a": {"exact_match": 0.0}}}, ["a"], 3e-3) is None  # text tasks have no MCC


def test_settings_added_later_compare_as_the_value_old_runs_trained_with(tmp_path):
    """A train_config.json written before clipping (no max_grad_norm) is an unclipped run: the same
    run as the default (no clipping), another run than --max-grad-norm 1."""
    saved = {k: v for k, v in asdict(TrainConfig(output="a")).items() if k != "max_grad_norm"}
    assert DEFAULT_MAX_GRAD_NORM == 0.0 and changed_settings(saved, TrainConfig(output="b")) == ""
    assert changed_settings(saved, TrainConfig(output="b", max_grad_norm=1.0)) == "max_grad_norm (saved 0.0, now 1.0)"


@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_gradients_are_clipped_to_max_grad_norm_before_each_step(tiny_base, tiny_task, tmp_path, monkeypatch, max_norm):
    """At every optimizer step the global norm of the trainable gradients is at most --max-grad-norm
    (and the tiny task's raw gradients exceed 0.05, so the clipped run did clip); 0 leaves them
    as they are. The epoch records the mean raw norm and the share of steps clipped."""
    norms: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    result = train(_cfg(tiny_base, tmp_path / "run", epochs=1, max_grad_norm=max_norm), tiny_task)
    entry = result["history"][0]
    if max_norm:
        assert max(norms) <= max_norm * (1 + 1e-4)
        assert entry["clipped_share"] == 1.0 and entry["grad_norm_mean"] > max_norm
    else:
        assert max(norms) > 0.05
        assert "clipped_share" not in entry


def test_vera_reloads_and_merges_to_the_trained_function(tiny_base, tiny_task, tmp_path):
    """The saved VeRA folder (projections included) reloads on a fresh base to the trained logits,
    and PEFT's merge folds it into the weights exactly; targets of two shapes (q and up) share one
    pair of projections."""
    from metatt_deploy.adapters.lora import load_lora, merge_lora

    train(_cfg(tiny_base, tmp_path / "run", method="vera", targets=["q", "up"], epochs=1), tiny_task)
    model, record, tok = load_lora(tmp_path / "run" / "best")
    assert record["method"] == "vera" and record["targets"] == ["q", "up"]
    batch = tok(["this was great and fine today", "this was bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        adapted = model(**batch).logits
        again = load_lora(tmp_path / "run" / "best")[0](**batch).logits
        merged = merge_lora(model)(**batch).logits
        plain = load_classifier(str(tiny_base), ["negative", "positive"])(**batch).logits
    assert torch.equal(adapted, again)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert (adapted - plain).abs().max() > 1e-3  # head and adapter trained


def test_vera_is_refused_where_it_is_not_measured(tiny_base):
    with pytest.raises(MetaTTError, match="MetaTT methods only"):
        TrainConfig(output="x", method="vera", rank_schedule="4,1:2").check()
    from metatt_deploy.training.causal import train_causal

    with pytest.raises(MetaTTError, match="baseline for classifiers"):
        train_causal(TrainConfig(output="x", method="vera"), None)  # type: ignore[arg-type]


def test_learning_rate_defaults_per_method():
    def rates(**kw):
        cfg = TrainConfig(output="x", **kw)
        return cfg.lr, cfg.head_lr

    assert rates() == (3e-3, 5e-3)  # docs/nli-gap.md: 3e-3 beat 1e-3 on snli and movie-sentiment
    assert rates(method="metatt-5d") == (1e-3, 5e-3)  # not swept; more cores, a larger effective step
    assert rates(method="metatt-4d", lr=2e-3) == (2e-3, 5e-3)  # the head keeps its own default
    assert rates(method="lora") == (1e-3, None)  # LoRA's head trains at --lr, as in PEFT
    assert rates(method="lora", lr=3e-4, head_lr=1e-2) == (3e-4, 1e-2)


def test_wide_metatt_4d_adapters_default_to_a_lower_lr():
    """FFN targets at rank >= 8 collapsed at 3e-3 on MPNet and trained at 1e-3 (docs/nli-gap.md)."""
    ffn = ["q", "k", "v", "o", "up", "down"]

    def lr(**kw):
        return TrainConfig(output="x", **kw).lr

    assert lr(targets=ffn, rank=8) == lr(targets=ffn, rank=16) == 1e-3
    assert lr(targets=["q", "v", "gate"], rank=8) == 1e-3  # a LLaMA FFN matrix counts too
    assert lr(targets=["q", "up=intermediate.dense"], rank=8) == 1e-3  # a named suffix pair, by its name
    assert lr(targets=ffn, rank=4) == 3e-3  # below rank 8, 3e-3 stayed ahead
    assert lr(rank=16) == 3e-3  # q,k,v,o never collapsed at 3e-3
    assert lr(targets=ffn, rank=4, rank_schedule="10,1:4") == 1e-3  # the schedule's start decides
    assert lr(targets=ffn, rank=8, rank_schedule="6/4/4,1:4") == 3e-3  # its largest bond
    assert lr(targets=ffn, rank=16, lr=3e-3) == 3e-3  # an explicit --lr always wins
    assert lr(targets=ffn, rank=8, method="metatt-5d") == 5e-4  # 5D: half its default
    assert lr(targets=ffn, rank=4, method="metatt-5d") == lr(method="metatt-5d", rank=16) == 1e-3
    assert lr(targets=ffn, rank=8, method="lora") == 1e-3  # the PEFT baselines keep theirs
    joint = MultiTaskConfig(output="x", tasks=["a=snli", "b=snli"], targets=ffn, rank=8)
    assert joint.lr == 1e-3  # the joint adapter follows MetaTT-4D


def test_epoch_order_is_a_seeded_length_grouped_permutation():
    lengths = [i % 37 for i in range(1000)]
    a = epoch_order(lengths, 8, seed=1, epoch=0)
    assert sorted(a) == list(range(1000))
    assert a == epoch_order(lengths, 8, seed=1, epoch=0)
    assert a != epoch_order(lengths, 8, seed=1, epoch=1)
    # batches are near-uniform in length: far less padding than a plain shuffle
    spread = [max(lengths[i] for i in a[s : s + 8]) - min(lengths[i] for i in a[s : s + 8]) for s in range(0, 1000, 8)]
    assert sum(spread) / len(spread) < 3


def test_cli_train_reports_bad_input_in_one_line(tiny_base, tmp_path):
    result = CliRunner().invoke(
        app, ["train", "--train", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "r"), "--model", str(tiny_base)]
    )
    assert result.exit_code == 2
    assert "missing.jsonl" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["train", "--dataset", "movie-sentiment", "--method", "adalora", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown method" in result.output
    result = CliRunner().invoke(app, ["train", "--dataset", "movie-sentiment", "--max-grad-norm", "-1", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--max-grad-norm must be a finite number >= 0" in result.output


def test_cli_train_end_to_end(tiny_base, tiny_task_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--train",
        str(tiny_task_dir / "train.jsonl"),
        "--validation",
        str(tiny_task_dir / "validation.jsonl"),
        "--model",
        str(tiny_base),
        "--rank",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "best validation accuracy" in result.output
    assert (out / "best" / WEIGHTS_NAME).is_file()
