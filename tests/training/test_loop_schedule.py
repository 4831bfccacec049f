"""Rank-adaptive training end to end on a tiny random BERT: cuts, optimizer rebuild, errors, resume.

The base model is a 2-layer BERT of width 32 saved to a folder with the embedded model's
tokenizer; the data are a few dozen JSONL rows in tmp_path. Every run takes seconds on CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import sentiment_rows
from safetensors.torch import load_file

from metatt_deploy.adapters import model as mt
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.training import loop as train_mod
from metatt_deploy.training.config import TrainConfig
from metatt_deploy.training.data import load_task
from metatt_deploy.training.single import train
from metatt_deploy.tt import rounding
from metatt_deploy.tt.cores import parameter_count, tt_full, tt_ranks

MODES = [32, 2, 4, 32]  # 4D modes of the tiny BERT with targets q,k,v,o: in, layer, matrix, out
N_TRAIN, BATCH = 32, 8
STEPS_PER_EPOCH = N_TRAIN // BATCH


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-data")
    for name, n, offset in (("train", N_TRAIN, 0), ("validation", 16, 100)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n, offset)))
    return load_task(train=str(root / "train.jsonl"), validation=str(root / "validation.jsonl"))


def _config(tiny_base: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(
        output=str(output),
        model=str(tiny_base),
        rank=4,
        lr=1e-2,
        epochs=4,
        batch_size=BATCH,
        eval_batch_size=16,
        max_length=16,
        seed=3,
        save_steps=1000,
    )
    return TrainConfig(**{**settings, **overrides})


class _Recorder:
    """Patches train.py's Accelerator so every loss of a run is recorded (and a run can be stopped)."""

    def __init__(self, monkeypatch, stop_at: int | None = None):
        self.losses: list[float] = []
        recorder = self

        class RecordingAccelerator(Accelerator):
            def backward(self, loss, **kwargs):
                if stop_at is not None and len(recorder.losses) + 1 == stop_at:
                    raise _Interrupted
                recorder.losses.append(loss.item())
                return super().backward(loss, **kwargs)

        monkeypatch.setattr(train_mod, "Accelerator", RecordingAccelerator)


class _Interrupted(Exception):
    pass


def _spy_cuts(monkeypatch) -> list[dict]:
    """Record, for every rank cut, the optimizer it returned and the adapter's cores right after."""
    cuts: list[dict] = []
    original = train_mod.cut_ranks

    def spy(cfg, model, accelerator, optimizer, recipe, ranks, build_optimizer, log):
        model, new_opt, new_sched = original(cfg, model, accelerator, optimizer, recipe, ranks, build_optimizer, log)
        adapter = mt.get_adapter(accelerator.unwrap_model(model))
        inner = getattr(new_opt, "optimizer", new_opt)
        cuts.append(
            {
                "ranks": list(ranks),
                "old_optimizer": getattr(optimizer, "optimizer", optimizer),
                "optimizer": inner,
                "cores": list(adapter.cores),
                "after_cut": [c.detach().clone() for c in adapter.cores],
                "states": [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in inner.state[c].items()} for c in adapter.cores],
            }
        )
        return model, new_opt, new_sched

    monkeypatch.setattr(train_mod, "cut_ranks", spy)
    return cuts


def _step(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


@pytest.mark.parametrize("moments", ["project", "reset"])
def test_schedule_cuts_ranks_and_rebuilds_the_optimizer(tiny_base, task, tmp_path, monkeypatch, moments):
    recorder = _Recorder(monkeypatch)
    cuts = _spy_cuts(monkeypatch)
    out = tmp_path / "run"
    result = train(_config(tiny_base, out, rank_schedule="6,1:4,3:2", moments=moments), task)
    steps_per_epoch = STEPS_PER_EPOCH

    # the cuts ran at the start of epochs 1 and 3 (0-based) and the history shows the shrinking adapter
    expected = {1: [6] * 3, 2: [4] * 3, 3: [4] * 3, 4: [2] * 3}  # 1-based epoch -> ranks trained with
    assert [c["ranks"] for c in cuts] == [[4] * 3, [2] * 3]
    assert [h["trainable"] for h in result["history"]] == [parameter_count(MODES, expected[e]) for e in range(1, 5)]
    assert result["trainable_parameters"]["adapter"] == parameter_count(MODES, [2] * 3)

    # training went on through every epoch with finite losses
    assert len(recorder.losses) == result["steps"] == 4 * steps_per_epoch
    assert all(math.isfinite(x) for x in recorder.losses)

    # a new AdamW over exactly the new cores (plus the head), whose state follows the strategy
    for k, cut in enumerate(cuts):
        assert cut["optimizer"] is not cut["old_optimizer"]
        params = [p for g in cut["optimizer"].param_groups for p in g["params"]]
        assert all(any(p is c for p in params) for c in cut["cores"])
        old_params = [p for g in cut["old_optimizer"].param_groups for p in g["params"]]
        assert not any(any(p is c for p in params) for c in old_params[: len(cut["cores"])])
        steps_before = (1, 3)[k] * steps_per_epoch  # cuts before epochs 1 and 3 (0-based)
        for core, state in zip(cut["cores"], cut["states"]):
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == core.shape
            assert torch.isfinite(state["exp_avg"]).all() and (state["exp_avg_sq"] >= 0).all()
            if moments == "reset":
                assert _step(state["step"]) == 0
                assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
            else:
                assert _step(state["step"]) == steps_before
                assert state["exp_avg_sq"].any()

    # the cores trained on after the last cut, and the checkpoint holds them and their moments
    tensors = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    final = [tensors[f"param.{mt.ADAPTER_ATTR}.cores.{k}"] for k in range(4)]
    assert tt_ranks(final) == [2, 2, 2]
    assert all(torch.isfinite(c).all() for c in final)
    assert any(not torch.equal(a, b) for a, b in zip(final, cuts[-1]["after_cut"]))
    core_steps = {_step(tensors[f"step.{mt.ADAPTER_ATTR}.cores.{k}"]) for k in range(4)}
    assert core_steps == ({float(steps_per_epoch)} if moments == "reset" else {float(4 * steps_per_epoch)})

    # the saved best adapter has the ranks of its epoch
    best = result["best"]["epoch"]
    config = json.loads((out / "best" / "metatt_config.json").read_text())
    weights = load_file(str(out / "best" / "metatt_adapter.safetensors"))
    assert config["ranks"] == expected[best]
    assert tt_ranks([weights[f"core.{k}"] for k in range(4)]) == expected[best]


def test_cut_discards_exactly_what_the_sweep_reports(tiny_base, task, tmp_path, monkeypatch):
    """The tensor after the cut is the sweep of the tensor before it (an independent sweep agrees)."""
    _Recorder(monkeypatch)
    seen = []
    original = rounding.sweep

    def spy(cores, ranks=None, **kwargs):
        result = original(cores, ranks, **kwargs)
        seen.append(([c.clone() for c in cores], result))
        return result

    monkeypatch.setattr(train_mod, "sweep", spy)
    cuts = _spy_cuts(monkeypatch)
    train(_config(tiny_base, tmp_path / "run", rank_schedule="6,1:3", epochs=2), task)
    ((before, result),) = seen
    assert result.ranks_before == [6, 6, 6] and result.ranks_after == [3, 3, 3]
    assert 0 < result.relative_error_bound < 1
    want = tt_full(original([c.double() for c in before], [3, 3, 3]).cores)
    got = tt_full([c.double() for c in cuts[0]["after_cut"]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # and the change of the represented tensor is the reported error (Eckart-Young, exactly)
    change = torch.linalg.vector_norm(tt_full([c.double() for c in before]) - got)
    assert float(change) == pytest.approx(result.error_bound, rel=1e-3)


@pytest.mark.parametrize(
    "schedule,epochs,match",
    [
        ("4,1:6", 3, "raises bond 1 from 4 to 6"),
        ("4,1:2,5:1", 3, "names epoch 5, but the run has epochs 0 to 2"),
        ("40,1:4", 3, "rank 40 of bond 1 .* must be between 1 and 32"),
        ("8/8/8,1:8/40/8", 3, "rank schedule raises bond 2 from 8 to 40"),
        ("8/70/8", 3, "rank 70 of bond 2 .* between 1 and 64"),
        ("8,1:oops", 3, "'oops' is not a valid rank"),
    ],
)
def test_schedule_errors_come_before_any_training_step(tiny_base, task, tmp_path, monkeypatch, schedule, epochs, match):
    recorder = _Recorder(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(MetaTTError, match=match):
        train(_config(tiny_base, out, rank_schedule=schedule, epochs=epochs), task)
    assert recorder.losses == []
    assert not (out / "checkpoint").exists() and not (out / "best").exists()
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"train_config.json"}


def test_corrected_schedule_reuses_the_output_of_a_failed_run(tiny_base, task, tmp_path, monkeypatch):
    """A run that failed before its first checkpoint is not in the way: no --force needed."""
    recorder = _Recorder(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(MetaTTError, match="raises bond 1"):
        train(_config(tiny_base, out, rank_schedule="4,1:6", epochs=2), task)
    result = train(_config(tiny_base, out, rank_schedule="4,1:2", epochs=2), task)
    assert len(recorder.losses) == 2 * STEPS_PER_EPOCH and result["trainable_parameters"]["adapter"] == parameter_count(MODES, [2] * 3)
    assert json.loads((out / "train_config.json").read_text())["rank_schedule"] == "4,1:2"


def test_schedule_above_what_the_mode_allows_after_the_start(tiny_base, task, tmp_path, monkeypatch):
    """A schedule whose later entry exceeds the bond's bound fails in check_schedule, before training."""
    recorder = _Recorder(monkeypatch)
    with pytest.raises(MetaTTError, match="allows ranks 1 to 32"):
        train(_config(tiny_base, tmp_path / "run", rank_schedule="4,1:33"), task)
    assert recorder.losses == []


def test_rank_schedule_is_refused_for_lora_and_unknown_moments_up_front(tiny_base, tmp_path):
    with pytest.raises(MetaTTError, match="MetaTT methods only"):
        train(_config(tiny_base, tmp_path / "run", method="lora", rank_schedule="8,1:4"), None)
    with pytest.raises(MetaTTError, match="unknown --moments 'keep'"):
        train(_config(tiny_base, tmp_path / "run", rank_schedule="8,1:4", moments="keep"), None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("schedule", [None, "6,1:3"])
def test_interrupted_run_resumes_to_the_same_adapter(tiny_base, task, tmp_path, monkeypatch, schedule):
    """Stop mid-epoch after a checkpoint, re-run: the final adapter equals an uninterrupted run's."""
    cfg = dict(epochs=2, save_steps=3, rank_schedule=schedule)
    _Recorder(monkeypatch)
    full = train(_config(tiny_base, tmp_path / "full", **cfg), task)

    _Recorder(monkeypatch, stop_at=8)  # checkpoints at steps 3, 4 (epoch end) and 6; stop in step 8
    with pytest.raises(_Interrupted):
        train(_config(tiny_base, tmp_path / "cut", **cfg), task)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (6, 1, 2)
    assert not (tmp_path / "cut" / "metrics.json").exists()

    recorder = _Recorder(monkeypatch)
    resumed = train(_config(tiny_base, tmp_path / "cut", **cfg), task)
    assert len(recorder.losses) == 2  # steps 7 and 8 only
    assert resumed["history"] == full["history"]
    a = load_file(str(tmp_path / "full" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    wa = load_file(str(tmp_path / "full" / "best" / "metatt_adapter.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "best" / "metatt_adapter.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=1e-5, msg=key)


def test_resume_with_other_settings_is_refused(tiny_base, task, tmp_path, monkeypatch):
    _Recorder(monkeypatch, stop_at=3)
    with pytest.raises(_Interrupted):
        train(_config(tiny_base, tmp_path / "run", epochs=2, save_steps=2, rank_schedule="6,1:3"), task)
    _Recorder(monkeypatch)
    with pytest.raises(MetaTTError, match="other settings"):
        train(_config(tiny_base, tmp_path / "run", epochs=2, save_steps=2, rank_schedule="6,1:2"), task)


def test_cli_schedule_error_is_one_line(tiny_base, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from metatt_deploy.cli import app

    recorder = _Recorder(monkeypatch)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(20, 0)))
    args = ["train", "--train", str(data), "--model", str(tiny_base), "-o", str(tmp_path / "run"), "--epochs", "2", "--max-length", "16"]
    for schedule, message in (("4,1:6", "raises bond 1 from 4 to 6"), ("4,2:2", "names epoch 2")):
        result = CliRunner().invoke(app, args + ["--rank-schedule", schedule])
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]  # (datasets' progress bars aside)
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
        assert "Traceback" not in result.output
    assert recorder.losses == [] and not (tmp_path / "run" / "checkpoint").exists()
