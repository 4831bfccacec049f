"""`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) trains like one process with the
same global batch: single-task with a rank schedule, and multi-task.

Both processes take half of every batch and weight their loss by their share of the rows
(training/loop.py), so the averaged gradient is the whole batch's. The base has no dropout,
so the only difference left is float summation order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sentiment_rows
from safetensors.torch import load_file
from tiny_models import save_tiny_bert

from metatt_deploy.adapters.config import WEIGHTS_NAME

pytestmark = pytest.mark.slow

COMMON = ["--epochs", "2", "--batch-size", "8", "--max-length", "16", "--rank", "4", "--lr", "1e-2", "--save-steps", "1000"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    save_tiny_bert(root / "base", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for task, offset in (("a", 0), ("b", 500)):
        for split, n, extra in (("train", 40, 0), ("validation", 16, 100), ("test", 16, 200)):
            rows = sentiment_rows(n, offset + extra)
            (root / f"{task}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _run(args: list[str], processes: int) -> None:
    if processes == 1:
        cmd = [sys.executable, "-m", "metatt_deploy", *args]
    else:
        launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        cmd = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "-m", "metatt_deploy", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _compare(one: Path, two: Path, metric) -> None:
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (one, two))
    assert [metric(h) for h in a["history"]] == [metric(h) for h in b["history"]]
    assert [h.get("ranks") for h in a["history"]] == [h.get("ranks") for h in b["history"]]
    wa, wb = load_file(str(one / "best" / WEIGHTS_NAME)), load_file(str(two / "best" / WEIGHTS_NAME))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def test_single_task_with_rank_schedule_two_processes_equal_one(setup: Path) -> None:
    args = [
        "train",
        "--model",
        str(setup / "base"),
        "--train",
        str(setup / "a.train.jsonl"),
        "--validation",
        str(setup / "a.validation.jsonl"),
    ]
    args += [*COMMON, "--rank-schedule", "4,1:2"]
    for n in (1, 2):
        _run([*args, "-o", str(setup / f"single-{n}")], n)
    _compare(setup / "single-1", setup / "single-2", lambda h: h["accuracy"])


def test_multi_task_two_processes_equal_one(setup: Path) -> None:
    specs = []
    for task in ("a", "b"):
        specs += ["--task", f"{task}={setup / f'{task}.train.jsonl'},{setup / f'{task}.validation.jsonl'}"]
    args = ["train", "--model", str(setup / "base"), *specs, *COMMON]
    for n in (1, 2):
        _run([*args, "-o", str(setup / f"multi-{n}")], n)
    _compare(setup / "multi-1", setup / "multi-2", lambda h: {t: m["accuracy"] for t, m in h["tasks"].items()})
