"""tools/experiments/grid_runs.py: a finished run is reused only for the settings it was trained with."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "experiments"))
from grid_runs import finished, reuse  # noqa: E402

from metatt_deploy.training.config import TrainConfig  # noqa: E402


def test_a_run_from_before_clipping_is_reused_only_as_an_unclipped_run(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    old = {k: v for k, v in asdict(TrainConfig(output=str(run))).items() if k != "max_grad_norm"}  # saved before clipping
    (run / "train_config.json").write_text(json.dumps(old))
    (run / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.5}}))
    unclipped, clipped = TrainConfig(output=str(run)), TrainConfig(output=str(run), max_grad_norm=1.0)
    assert reuse(unclipped) == finished(unclipped) == {"test": {"accuracy": 0.5}}
    assert finished(clipped) is None  # not this grid point: reports leave it out
    with pytest.raises(SystemExit, match=r"other settings: max_grad_norm \(saved 0.0, now 1.0\); pass those, or another --runs"):
        reuse(clipped)  # and a tool never trains over it
    assert reuse(TrainConfig(output=str(tmp_path / "new"))) is None
