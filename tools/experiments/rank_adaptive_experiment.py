#!/usr/bin/env python
"""Rank-adaptive training vs a fixed rank: the MetaTT paper's Figure 2 experiment, on CPU scale.

Arms (MetaTT-4D by default, ``--method metatt-5d`` as in the paper's figure; targets q,k,v,o unless
``--targets``; AdamW; the same data subset and seeds for every arm):

- ``fixed``         rank 4 from start to end;
- ``sweep-project`` rank 10, cut by SVD sweeps to 8, 6, 4 at the start of epochs 1, 2, 3
                    (0-based; schedule ``10,1:8,2:6,3:4``), AdamW moments projected;
- ``sweep-reset``   the same schedule with AdamW moments reset (only on ``--moments-task``).

Every run lives in ``ROOT/[<model>-][<method>-]lr<lr>/<task>/<arm>/seed<k>/`` (model and method named
when not the defaults) (the normal run folder of
``metatt-deploy train``); a run with a ``metrics.json`` is skipped and an interrupted one is
resumed from its checkpoint, so the script can be stopped and re-run at will. The data subset
is drawn once per task with ``--data-seed`` (the CLI would tie it to the training seed), so the
arms of one seed are paired: same data, same order, same head initialisation.

Outputs (rewritten after every run, and by ``--report-only``): ``ROOT/lr<lr>/results.json``,
``results.md`` (mean and standard error over seeds of the best validation accuracy, the paired
difference per seed) and a PNG of validation accuracy per epoch with the cut epochs marked.

    python tools/experiments/rank_adaptive_experiment.py                       # paper's setting, lr 5e-4
    python tools/experiments/rank_adaptive_experiment.py --lr 5e-3             # the tuned lr
    python tools/experiments/rank_adaptive_experiment.py --report-only         # tables/plot of what exists
    # issue 15 item 4, the paper's own setting: MetaTT-5D on MPNet-base, lr 5e-4, wd 0, 10 -> 4
    python tools/experiments/rank_adaptive_experiment.py --model sentence-transformers/all-mpnet-base-v2 --method metatt-5d \
        --lr 5e-4 --head-lr 5e-4 --schedule 10,1:8,2:6,3:4 --fixed-rank 4 --epochs 5 --moments-task ""
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

from grid_runs import add_clipping_option, finished, guarded, log_path, run_resumable

from metatt_deploy import TrainConfig, load_task
from metatt_deploy.common.files import atomic_write_json, atomic_write_text
from metatt_deploy.common.report import markdown_table, plt, save_figure
from metatt_deploy.training.schedule import parse_rank_schedule

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ARMS = ("fixed", "sweep-project", "sweep-reset")
ARM_LABEL = {"fixed": "AdamW, fixed rank", "sweep-project": "AdamW + sweeps (project)", "sweep-reset": "AdamW + sweeps (reset)"}
DEFAULT_SAMPLES = {"movie-sentiment": (1600, 400), "snli": (2000, 500)}  # what docs/rank-adaptive.md reports
CUT_RE = re.compile(r"rank cut \[([\d, ]+)\] -> \[([\d, ]+)\] \(relative error ([0-9.e+-]+)\)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="movie-sentiment,snli", help="builtin tasks, comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    p.add_argument("--method", default="metatt-4d", choices=["metatt-4d", "metatt-5d"], help="the paper's Figure 2 uses metatt-5d")
    p.add_argument("--targets", default="q,k,v,o")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW lr of the adapter (paper's Figure 2: 5e-4)")
    p.add_argument("--head-lr", type=float, default=None, help="lr of the head (default: the method's default head lr, 5e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    add_clipping_option(p)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--schedule", default="10,1:8,2:6,3:4", help="rank schedule of the sweep arms")
    p.add_argument("--fixed-rank", type=int, default=4)
    p.add_argument("--moments-task", default="movie-sentiment", help="task that also gets the sweep-reset arm ('' for none)")
    p.add_argument(
        "--samples", default="", help="per task TRAIN/VAL, e.g. snli=3000/600 (defaults: movie-sentiment=1600/400,snli=2000/500)"
    )
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--alpha", type=float, default=None, help="MetaTT alpha (default: the package default)")
    p.add_argument("--model", default=None, help="base model (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data subsets (fixed across training seeds)")
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "rank-adaptive")
    p.add_argument("--figure", type=Path, default=None, help="also copy the PNG here (e.g. docs/reports/rank-adaptive.png)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a shared, oversubscribed CPU two threads were 2x slower per step)",
    )
    p.add_argument("--report-only", action="store_true", help="only aggregate the runs that exist")
    return p.parse_args(argv)


def samples(args) -> dict[str, tuple[int, int]]:
    out = dict(DEFAULT_SAMPLES)
    for item in filter(None, (s.strip() for s in args.samples.split(","))):
        task, _, sizes = item.partition("=")
        n_train, _, n_val = sizes.partition("/")
        out[task] = (int(n_train), int(n_val or 400))
    return out


def lr_dir(args) -> Path:
    tag = f"lr{args.lr:g}"
    if args.method != "metatt-4d":
        tag = f"{args.method}-{tag}"
    if args.model:
        tag = f"{Path(args.model.rstrip('/')).name}-{tag}"
    return args.root / tag


def arms_for(task: str, args) -> list[str]:
    return ["fixed", "sweep-project"] + (["sweep-reset"] if task == args.moments_task else [])


def run_dir(args, task: str, arm: str, seed: int) -> Path:
    return lr_dir(args) / task / arm / f"seed{seed}"


def make_config(args, task: str, arm: str, seed: int):
    extra = {}
    if args.alpha is not None:
        extra["alpha"] = args.alpha
    if args.model:
        extra["model"] = args.model
    sweep = arm != "fixed"
    return TrainConfig(
        output=str(run_dir(args, task, arm, seed)),
        method=args.method,
        targets=args.targets.split(","),
        head_lr=args.head_lr,
        rank=args.fixed_rank,
        rank_schedule=args.schedule if sweep else None,
        moments="reset" if arm == "sweep-reset" else "project",
        lr=args.lr,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=seed,
        save_steps=10**6,  # checkpoints at epoch ends only (cheap resumes, little I/O)
        max_grad_norm=args.max_grad_norm,
        **extra,
    )


def run_one(args, task_data, task: str, arm: str, seed: int) -> None:
    run_resumable(make_config(args, task, arm, seed), task_data)


# ------------------------------------------------------------------ aggregation


def _mean_se(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def _fmt(mean: float, se: float, scale: float = 100.0) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.2f}" + ("" if math.isnan(se) else f" ± {se * scale:.2f}")


def _cuts(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    cuts = {}  # a run resumed from before a cut logs it again: keep the last one per cut
    for m in CUT_RE.finditer(log.read_text()):
        before, after = [int(x) for x in m.group(1).split(",")], [int(x) for x in m.group(2).split(",")]
        cuts[(tuple(before), tuple(after))] = {"from": before, "to": after, "relative_error": float(m.group(3))}
    return list(cuts.values())


def collect(args) -> dict:
    """Per task and arm: the finished runs' histories, bests, tests, step times, cut errors."""
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = {}
    for task in tasks:
        out[task] = {}
        for arm in arms_for(task, args):
            runs = {}
            for seed in seeds:
                path = run_dir(args, task, arm, seed) / "metrics.json"
                if (m := finished(make_config(args, task, arm, seed))) is not None:
                    runs[seed] = {
                        "history": [{"epoch": h["epoch"], "accuracy": h["accuracy"], "trainable": h["trainable"]} for h in m["history"]],
                        "best_accuracy": m["best"]["accuracy"],
                        "best_epoch": m["best"]["epoch"],
                        "final_accuracy": m["history"][-1]["accuracy"],
                        "test_accuracy": m.get("test", {}).get("accuracy"),
                        "step_time_median_s": m["step_time_median_s"],
                        "cuts": _cuts(log_path(path.parent)),
                    }
            out[task][arm] = runs
    return out


def summarise(args, data: dict) -> tuple[list[dict], list[dict]]:
    rows, diffs = [], []
    for task, arms in data.items():
        for arm, runs in arms.items():
            if not runs:
                continue
            vals = list(runs.values())
            best = _mean_se([r["best_accuracy"] for r in vals])
            final = _mean_se([r["final_accuracy"] for r in vals])
            tests = [r["test_accuracy"] for r in vals if r["test_accuracy"] is not None]
            test = _mean_se(tests)
            per_cut: dict[str, list[float]] = {}
            for r in vals:
                for c in r["cuts"]:
                    per_cut.setdefault(f"{c['from'][0]}→{c['to'][0]}", []).append(c["relative_error"])
            rows.append(
                {
                    "task": task,
                    "arm": ARM_LABEL[arm],
                    "ranks": f"{args.fixed_rank}" if arm == "fixed" else args.schedule.split(",")[0] + "→" + args.schedule.split(":")[-1],
                    "seeds": len(vals),
                    "best val acc %": _fmt(*best),
                    "final-epoch val acc %": _fmt(*final),
                    "test acc % (best ckpt)": _fmt(*test),
                    "final adapter params": vals[0]["history"][-1]["trainable"],
                    "median step s (shared CPU)": f"{statistics.median(r['step_time_median_s'] for r in vals):.2f}",
                    "sweep rel. error per cut (mean)": ", ".join(f"{k}: {statistics.fmean(v):.3f}" for k, v in per_cut.items()),
                }
            )
        fixed = arms.get("fixed", {})
        for arm in ("sweep-project", "sweep-reset"):
            paired = sorted(set(fixed) & set(arms.get(arm, {})))
            if not paired:
                continue
            d = [arms[arm][s]["best_accuracy"] - fixed[s]["best_accuracy"] for s in paired]
            m, se = _mean_se(d)
            diffs.append(
                {
                    "task": task,
                    "comparison": f"{ARM_LABEL[arm]} − fixed",
                    "seeds": len(d),
                    "Δ best val acc (points)": _fmt(m, se),
                    "seeds where sweep is better": f"{sum(x > 0 for x in d)}/{len(d)}",
                }
            )
        if arms.get("sweep-project") and arms.get("sweep-reset"):
            paired = sorted(set(arms["sweep-project"]) & set(arms["sweep-reset"]))
            if paired:
                d = [arms["sweep-project"][s]["best_accuracy"] - arms["sweep-reset"][s]["best_accuracy"] for s in paired]
                diffs.append(
                    {
                        "task": task,
                        "comparison": "project − reset",
                        "seeds": len(d),
                        "Δ best val acc (points)": _fmt(*_mean_se(d)),
                        "seeds where sweep is better": f"{sum(x > 0 for x in d)}/{len(d)} (project better)",
                    }
                )
    return rows, diffs


def plot(args, data: dict, path: Path) -> None:
    schedule = parse_rank_schedule(args.schedule, 4 if args.method == "metatt-5d" else 3)
    tasks = [t for t in data if any(data[t].values())]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    colors = {"fixed": "tab:blue", "sweep-project": "tab:red", "sweep-reset": "tab:orange"}
    for ax, task in zip(axes[0], tasks):
        for arm, runs in data[task].items():
            if not runs:
                continue
            n_epochs = min(len(r["history"]) for r in runs.values())
            xs = list(range(1, n_epochs + 1))
            per_epoch = [[r["history"][e]["accuracy"] * 100 for r in runs.values()] for e in range(n_epochs)]
            means = [statistics.fmean(v) for v in per_epoch]
            ses = [statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in per_epoch]
            ax.plot(xs, means, marker="o", color=colors[arm], label=f"{ARM_LABEL[arm]} (n={len(runs)})")
            ax.fill_between(xs, [m - s for m, s in zip(means, ses)], [m + s for m, s in zip(means, ses)], color=colors[arm], alpha=0.15)
            for r in runs.values():  # every seed, thin: a mean can hide one diverged run
                ax.plot(xs, [h["accuracy"] * 100 for h in r["history"][:n_epochs]], color=colors[arm], alpha=0.35, linewidth=0.7)
        for epoch, ranks in schedule.items():
            if epoch == 0:
                continue
            # the cut runs after epoch `epoch`'s evaluation (1-based), before the next epoch trains
            ax.axvline(epoch + 0.5, color="grey", linestyle=":", linewidth=1)
            ax.text(
                epoch + 0.5, 1.0, f"r→{ranks[0]}", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8, color="grey"
            )
        ax.set_xticks(range(1, args.epochs + 1))
        ax.set_title(task, pad=14)
        ax.set_xlabel("epoch (validation after each)")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"{args.method} on {Path(args.model.rstrip('/')).name if args.model else 'all-MiniLM-L6-v2'}: fixed rank {args.fixed_rank} vs sweeps {args.schedule} (lr {args.lr:g}; mean ± s.e., thin: seeds)",
        fontsize=9,
        y=1.04,
    )
    save_figure(fig, path)


def report(args) -> dict:
    data = collect(args)
    rows, diffs = summarise(args, data)
    out = lr_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    sizes = samples(args)
    settings = {
        "model": args.model or "sentence-transformers/all-MiniLM-L6-v2 (embedded)",
        "method": f"{args.method}, targets {args.targets}",
        "head_lr": args.head_lr if args.head_lr is not None else "method default",
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "schedule": args.schedule,
        "fixed_rank": args.fixed_rank,
        "samples (train/validation/test)": {t: f"{sizes[t][0]}/{sizes[t][1]}/{sizes[t][1]}" for t in data},
        "data_seed": args.data_seed,
        "seeds": args.seeds,
    }
    atomic_write_json(out / "results.json", {"settings": settings, "runs": data, "summary": rows, "paired": diffs})
    text = [
        "# Rank-adaptive MetaTT vs fixed rank\n",
        "```\n" + json.dumps(settings, indent=1) + "\n```\n",
        "Best validation accuracy per run, then mean ± standard error over seeds.\n",
        markdown_table(rows),
    ]
    if diffs:
        text += ["\nPaired by seed (same data, data order, head initialisation and dropout masks):\n", markdown_table(diffs)]
    atomic_write_text(out / "results.md", "\n".join(text))
    plot(args, data, out / "rank-adaptive.png")
    if args.figure and (out / "rank-adaptive.png").is_file():
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        args.figure.write_bytes((out / "rank-adaptive.png").read_bytes())
    return {"rows": rows, "paired": diffs}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.report_only:
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        import transformers

        torch.set_num_threads(args.threads)

        transformers.logging.set_verbosity_error()
        sizes = samples(args)
        seeds = [int(s) for s in args.seeds.split(",") if s]
        for task in [t for t in args.tasks.split(",") if t]:
            n_train, n_val = sizes[task]
            data = load_task(dataset=task, max_samples={"train": n_train, "validation": n_val, "test": n_val}, seed=args.data_seed)
            for seed in seeds:
                for arm in ("fixed", "sweep-project"):
                    guarded(run_one, args, data, task, arm, seed)
                report(args)
        for task in [t for t in args.tasks.split(",") if t]:  # the moments comparison last: optional
            if task != args.moments_task:
                continue
            n_train, n_val = sizes[task]
            data = load_task(dataset=task, max_samples={"train": n_train, "validation": n_val, "test": n_val}, seed=args.data_seed)
            for seed in seeds:
                guarded(run_one, args, data, task, "sweep-reset", seed)
                report(args)
    result = report(args)

    print(markdown_table(result["rows"]))
    if result["paired"]:
        print(markdown_table(result["paired"]))
    print(f"written: {lr_dir(args) / 'results.md'}, {lr_dir(args) / 'rank-adaptive.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
