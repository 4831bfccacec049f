"""tools/experiments/multitask_vs_single_lm.py end to end on a tiny Llama and three builtin tasks: the same rows
and steps for the joint and the single-task runs, reuse of finished runs, the report, and the
factored bundle's parity with each task's merged export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tiny_decoders import save_tiny_decoder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "experiments"))
import multitask_vs_single_lm as tool  # noqa: E402

from metatt_deploy.training.lm_data import load_text_task  # noqa: E402

TASKS = ["movie=movie-sentiment", "snli=snli", "amazon=amazon-sentiment"]


def test_joint_vs_single_report_and_parity(tmp_path: Path) -> None:
    base = save_tiny_decoder(tmp_path, "llama")
    out, report = tmp_path / "runs", tmp_path / "report"
    argv = ["--model", str(base), "--tasks", *TASKS, "--seeds", "0,1", "--train-samples", "8", "--val-samples", "2"]
    argv += ["--eval-samples", "3", "--batch-size", "4", "--max-length", "384", "--rank", "2", "--parity-prompts", "3"]
    argv += ["--new-tokens", "4", "--out", str(out), "--report", str(report)]
    assert tool.main(argv) == 0

    # the joint run trains each task on the rows its single-task runs get (per seed), for as many steps in all
    args = tool.argparse.Namespace(train_samples=8, val_samples=2, eval_samples=3)
    specs = [tool.parse_task_spec(t) for t in TASKS]
    for seed in (0, 1):
        joint = tool.joint_tasks(args, specs, seed)
        for spec, task in zip(specs, joint):
            single = load_text_task(dataset=spec.dataset, max_samples=tool.sizes(args), seed=seed)
            assert {s: task.splits[s]["messages"] for s in single.splits} == {s: d["messages"] for s, d in single.splits.items()}
        metrics = json.loads((out / f"joint-movie+snli+amazon-s{seed}" / "metrics.json").read_text())
        singles = [json.loads((out / f"{s.dataset}-metatt-4d-s{seed}" / "metrics.json").read_text()) for s in specs]
        assert metrics["steps"] == sum(s["steps"] for s in singles) == 3 * 2
        assert sum(metrics["history"][-1]["batches_per_task"].values()) == metrics["steps"]
        assert [t["train_examples"] for t in metrics["tasks"]] == [8, 8, 8]

    result = json.loads(report.with_suffix(".json").read_text())
    assert set(result["exact_match"]) == {"movie", "snli", "amazon"}
    assert list(result["exact_match"]["snli"]) == ["zero-shot", "joint", "metatt-4d", "lora"]
    assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for t in result["exact_match"].values() for v in t.values())
    md = report.with_suffix(".md").read_text()
    assert "| mean over tasks |" in md and " +- " in md and "`python tools/experiments/multitask_vs_single_lm.py --model" in md
    assert report.with_suffix(".png").stat().st_size > 1000

    # parity: both forms of the bundle answer every prompt of every task as that task's merged export does
    rows = result["parity"]["rows"]
    assert sorted((r["task"], r["form"]) for r in rows) == sorted((t, f) for t in ("movie", "snli", "amazon") for f in ("adapter", "tasks"))
    assert all(r["prompts"] == 3 and r["token-identical"] == 3 and r["max abs logit diff"] < r["fp32 tolerance"] for r in rows)

    # a second call reuses every finished run and the parity check (nothing retrains or re-exports)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert tool.main(argv) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
