"""tools/experiments/multitask_vs_single.py on the embedded MiniLM and two builtin tasks, a few rows each: the
joint adapter at chosen bond ranks and loss weights (its own run folder), the single-task runs on the same rows,
and a report whose reproduce line is the command that ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "experiments"))
import multitask_vs_single as tool  # noqa: E402


def test_joint_at_chosen_bond_ranks_against_single_task(tmp_path: Path) -> None:
    runs, output = tmp_path / "runs", tmp_path / "report"
    argv = ["--tasks", "movie=movie-sentiment", "tweet=tweet-sentiment", "--seeds", "0", "--epochs", "1", "--rank", "2"]
    argv += ["--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "8", "--max-length", "32"]
    argv += ["--single", "metatt-4d-lr3e-3", "--joint-ranks", "2/2/4/4", "--joint-task-weights", "tweet=2"]
    argv += ["--runs", str(runs), "--output", str(output)]
    assert tool.main(argv) == 0

    joint = json.loads((runs / "joint-2_2_4_4-wtweet2-s0" / "metrics.json").read_text())
    assert [t["loss_weight"] for t in joint["tasks"]] == [1.0, 2.0]
    assert joint["history"][-1]["ranks"] == [2, 2, 4, 4]  # in->layer->matrix->task->out bonds as asked
    assert joint["trainable_parameters"]["per_task"]["movie"]["task_slice"] == 4 * 4
    for task in ("movie", "tweet"):
        run = runs / task / "metatt-4d-lr3e-3-s0"
        trained = json.loads((run / "train_config.json").read_text())
        assert (trained["lr"], trained["head_lr"], trained["rank"]) == (3e-3, 5e-3, 2)
        assert json.loads((run / "metrics.json").read_text())["history"][-1]["ranks"] == [2, 2, 2]
    md = output.with_suffix(".md").read_text()
    assert "bond ranks 2/2/4/4, loss weights tweet 2" in md and "Joint learning rate 0.003" in md
    assert "`python tools/experiments/multitask_vs_single.py --tasks movie=movie-sentiment" in md and "--joint-ranks 2/2/4/4" in md
    rows = [line for line in md.splitlines() if line.startswith(("| movie |", "| tweet |"))]
    assert len(rows) == 2 and all(line.count("(") == 2 for line in rows)  # joint and single, each with its seed's value
