"""tools/experiments/rank_adaptive_experiment.py in the paper's own setting (issue 15 item 4): the configs it builds."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "experiments"))
import rank_adaptive_experiment as ra  # noqa: E402


def test_paper_setting_metatt_5d_on_mpnet(tmp_path: Path) -> None:
    args = ra.parse_args(
        ["--model", "sentence-transformers/all-mpnet-base-v2", "--method", "metatt-5d", "--lr", "5e-4", "--head-lr", "5e-4",
         "--schedule", "10,1:8,2:6,3:4", "--fixed-rank", "4", "--root", str(tmp_path)]
    )  # fmt: skip
    fixed, sweep = ra.make_config(args, "snli", "fixed", 0), ra.make_config(args, "snli", "sweep-project", 0)
    assert (fixed.method, fixed.rank, fixed.rank_schedule, fixed.lr, fixed.head_lr, fixed.weight_decay) == (
        "metatt-5d",
        4,
        None,
        5e-4,
        5e-4,
        0.0,
    )
    assert sweep.rank_schedule == "10,1:8,2:6,3:4" and sweep.model == "sentence-transformers/all-mpnet-base-v2"
    assert ra.run_dir(args, "snli", "fixed", 0) == tmp_path / "all-mpnet-base-v2-metatt-5d-lr0.0005" / "snli" / "fixed" / "seed0"


def test_defaults_keep_the_existing_run_folders(tmp_path: Path) -> None:
    """Runs made before --method existed resume under the same folder and settings."""
    args = ra.parse_args(["--root", str(tmp_path)])
    cfg = ra.make_config(args, "snli", "fixed", 1)
    assert (cfg.method, cfg.targets, cfg.head_lr) == ("metatt-4d", ["q", "k", "v", "o"], 5e-3)
    assert ra.run_dir(args, "snli", "fixed", 1) == tmp_path / "lr0.0005" / "snli" / "fixed" / "seed1"
