"""tools/experiments/frontier.py end to end on a tiny BERT: grid, resumable runs, table, plot, --plan."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "experiments"))
import frontier  # noqa: E402


def argv(tiny_base, tiny_task_dir, tmp_path: Path, *extra: str) -> list[str]:
    files = ",".join(str(tiny_task_dir / f"{s}.jsonl") for s in ("train", "validation", "test"))
    return [
        "--model", str(tiny_base), "--tasks", f"tiny={files}", "--methods", "metatt-4d", "lora", "vera", "--ranks", "2",
        "--lora-extra-ranks", "--target-sets", "q,k,v,o", "--seeds", "0", "--epochs", "1", "--max-length", "16",
        "--batch-size", "8", "--save-steps", "2", "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "frontier"),
        *extra,
    ]  # fmt: skip


def test_grid_runs_reports_and_resumes(tiny_base, tiny_task_dir, tmp_path, capsys) -> None:
    args = argv(tiny_base, tiny_task_dir, tmp_path)
    assert frontier.main(args) == 0
    md = (tmp_path / "frontier.md").read_text()
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    rows = [line for line in md.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[3].strip() for r in rows] == ["MetaTT-4D", "LoRA", "VeRA"]
    # parameter counts of a 2-layer, width-32 BERT, q,k,v,o at rank 2: LoRA 8 x 64 x 2, VeRA 8 x (32 + 2)
    params = {r.split("|")[3].strip(): int(r.split("|")[6].strip()) for r in rows}
    rates = {r.split("|")[3].strip(): r.split("|")[5].strip() for r in rows}  # read from each run, not today's defaults
    assert rates == {"MetaTT-4D": "0.003 / 0.005", "LoRA": "0.001 / 0.001", "VeRA": "0.005 / 0.005"}
    assert params["LoRA"] == 8 * 64 * 2 and params["VeRA"] == 8 * (32 + 2) and params["MetaTT-4D"] == 64 * 2 + (2 + 4) * 4
    assert "Reproduce: `python tools/experiments/frontier.py --model" in md

    runs = sorted((tmp_path / "runs").rglob("metrics.json"))
    assert len(runs) == 3
    kept = {p: p.stat().st_mtime_ns for p in runs}
    lora = next(p for p in runs if "lora-r2" in str(p))
    lora.unlink()  # half-finished: a checkpoint but no metrics
    capsys.readouterr()
    assert frontier.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("== ") == 1 and "(resume)" in out  # only the unfinished run trains again, from its checkpoint
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items() if p != lora) and lora.is_file()


def test_plan_prints_the_grid_and_an_estimate(tiny_base, tiny_task_dir, tmp_path, capsys) -> None:
    assert frontier.main(argv(tiny_base, tiny_task_dir, tmp_path, "--plan", "--seeds", "0", "1")) == 0
    out = capsys.readouterr().out
    assert "grid: 6 runs = 2 seeds x 1 tasks x 1 target sets x 3 (method, rank) points" in out
    assert "min per run" in out and "h for the 6 runs left" in out
    assert not (tmp_path / "runs").exists()


def test_bad_lr_is_one_line(tiny_base, tiny_task_dir, tmp_path) -> None:
    with pytest.raises(SystemExit, match="bad --lr 'adam=1'"):
        frontier.main(argv(tiny_base, tiny_task_dir, tmp_path, "--lr", "adam=1"))
