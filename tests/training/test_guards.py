"""metatt_deploy.training.guards and the training-side hardening of issue 10, through the CLI.

A diverged loss stops the run naming the step (single- and multi-task loops); one run per output
folder; NaN options, a single-class or non-UTF-8 training set and more classes than the base's
head are handled before any traceback.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import lock_path, output_lock
from metatt_deploy.training.guards import check_loss

QUICK = ["--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--rank", "2"]


def run(args: list[str]):
    result = CliRunner().invoke(app, args)
    err = [line for line in result.stderr.splitlines() if line.strip() and line.startswith("error:")]
    return result, err


def data_args(tiny_base: Path, tiny_task_dir: Path) -> list[str]:
    return [
        "--train",
        str(tiny_task_dir / "train.jsonl"),
        "--validation",
        str(tiny_task_dir / "validation.jsonl"),
        "--model",
        str(tiny_base),
    ]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_loss_names_the_step(value: float) -> None:
    check_loss(torch.tensor(0.7), 1)
    with pytest.raises(MetaTTError, match=f"loss is {value} at step 12; lower --lr or --alpha"):
        check_loss(torch.tensor(value), 12)


def test_nan_options_are_refused(tiny_base, tiny_task_dir, tmp_path) -> None:
    for option in (["--alpha", "nan"], ["--lr", "inf"], ["--weight-decay", "nan"]):
        result, err = run(["train", *data_args(tiny_base, tiny_task_dir), "-o", str(tmp_path / "out"), *QUICK, *option])
        assert result.exit_code == 2 and len(err) == 1 and "finite" in err[0], result.output
    assert not (tmp_path / "out").exists()


def test_a_diverging_single_task_run_stops_at_its_step(tiny_base, tiny_task_dir, tmp_path) -> None:
    out = tmp_path / "run"
    result, err = run(["train", *data_args(tiny_base, tiny_task_dir), "-o", str(out), *QUICK, "--alpha", "1e38", "--init", "no-no-no-no"])
    assert result.exit_code == 2, (result.exit_code, result.output[-2000:])
    assert err == [err[0]] and "training diverged" in err[0] and "at step 1" in err[0], result.output
    assert not (out / "best").exists()  # no all-NaN adapter saved


def test_a_diverging_multitask_run_stops_at_its_step(tiny_base, tiny_task_dir, tmp_path) -> None:
    files = f"{tiny_task_dir / 'train.jsonl'},{tiny_task_dir / 'validation.jsonl'}"
    args = ["train", "--task", f"a={files}", "--task", f"b={files}", "--model", str(tiny_base), "-o", str(tmp_path / "mt")]
    result, err = run([*args, *QUICK, "--alpha", "1e38", "--init", "no-no-no-no-no"])
    assert result.exit_code == 2 and "training diverged" in err[0] and "at step 1" in err[0], result.output


def test_a_second_run_into_the_same_output_is_refused(tiny_base, tiny_task_dir, tmp_path) -> None:
    out = tmp_path / "run"
    with output_lock(out):  # as a concurrent run holds it
        result, err = run(["train", *data_args(tiny_base, tiny_task_dir), "-o", str(out), *QUICK])
    assert result.exit_code == 2 and "is in use by process" in err[0], result.output
    assert not out.exists()


def test_a_stale_lock_is_reported_and_the_run_goes_on(tiny_base, tiny_task_dir, tmp_path) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "run"
    lock_path(out).write_text(f"{proc.pid} {socket.gethostname()}\n")
    result, _ = run(["train", *data_args(tiny_base, tiny_task_dir), "-o", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    assert "removed the stale lock" in result.stderr and not lock_path(out).exists()


def test_bad_training_data_is_one_line(tiny_base, tiny_task_dir, tmp_path) -> None:
    single = tmp_path / "single.jsonl"
    single.write_text("".join(json.dumps({"text": f"t{i}", "label": "pos"}) + "\n" for i in range(8)))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "café", "label": "pos"}\n{"text": "x", "label": "neg"}\n'.encode("latin-1"))
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('null\n{"text": "x", "label": "neg"}\n')  # crashed pyarrow (segmentation fault)
    for path, message in (
        (single, "at least two labels, got 1"),
        (latin, "not UTF-8 text"),
        (nulls, "line 1 of nulls.jsonl is not a JSON object"),
    ):
        result, err = run(["train", "--train", str(path), "--model", str(tiny_base), "-o", str(tmp_path / "out"), *QUICK])
        assert result.exit_code == 2 and len(err) == 1 and message in err[0], result.output


def test_more_classes_than_the_base_checkpoints_head(tiny_base, tmp_path) -> None:
    rows = [{"text": f"word{i % 3} here", "label": f"c{i % 3}"} for i in range(12)]
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, _ = run(["train", "--train", str(data), "--model", str(tiny_base), "-o", str(tmp_path / "out"), *QUICK])
    assert result.exit_code == 0, result.output  # tiny_base's head has 2 labels


def test_train_output_must_not_hold_its_inputs_and_force_replaces_only_runs(tiny_base, tiny_task_dir, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes((tiny_task_dir / "train.jsonl").read_bytes())
    result, err = run(["train", "--train", str(data / "train.jsonl"), "--model", str(tiny_base), "-o", str(data), "--force", *QUICK])
    assert result.exit_code == 2 and "contains the input" in err[0] and (data / "train.jsonl").is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result, err = run(["train", *data_args(tiny_base, tiny_task_dir), "-o", str(other), "--force", *QUICK])
    assert result.exit_code == 2 and "did not write" in err[0] and (other / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result, err = run(["train", *data_args(tiny_base, tiny_task_dir), "-o", str(a_file / "run"), *QUICK])
    assert result.exit_code == 2 and "which is a file" in err[0]


@pytest.mark.parametrize(
    ("weights", "single", "message"),
    [
        (["a=2"], True, "--task-weight balances the tasks of a multi-task run"),
        (["a=0"], False, "bad --task-weight 'a=0'"),
        (["c=2"], False, "--task-weight names unknown task(s) c; the run's tasks are a, b"),
    ],
)
def test_task_weight_misuse_is_one_line(tiny_base, tiny_task_dir, tmp_path, weights, single, message) -> None:
    files = f"{tiny_task_dir / 'train.jsonl'},{tiny_task_dir / 'validation.jsonl'}"
    tasks = data_args(tiny_base, tiny_task_dir) if single else ["--task", f"a={files}", "--task", f"b={files}", "--model", str(tiny_base)]
    args = ["train", *tasks, "-o", str(tmp_path / "run"), *QUICK]
    for w in weights:
        args += ["--task-weight", w]
    result, err = run(args)
    assert result.exit_code == 2 and len(err) == 1 and message in err[0], result.output
