#!/usr/bin/env python
"""Accuracy against trainable parameters: MetaTT-4D, MetaTT-5D, PEFT LoRA and PEFT VeRA (issue 15).

The MetaTT paper's frontier plot: for each method a line through its ranks, test accuracy
against adapter parameters (log scale), one panel per task. Every run of the grid sees the same
rows (subsets drawn with ``--data-seed``), epochs, batch size, max length and targets; seeds
vary only the training. Methods train at their shipped defaults (``--lr METHOD=LR`` overrides).

Grid: methods x ranks (LoRA also rank 1) x target sets x tasks x seeds, run seed-major (every
point of seed 0 before seed 1), each into ``RUNS/<model>/<task>/<targets>/<method>-r<rank>/seed<k>``:
a finished run is reused, an interrupted one resumes from its checkpoint (``--save-steps``), so
the tool can be stopped and restarted at will; the table and plot are rewritten after every run.

    python tools/experiments/frontier.py --plan                          # the grid and its estimated time
    python tools/experiments/frontier.py                                 # run (MPNet-base, the CPU-sized defaults)
    python tools/experiments/frontier.py --report-only                   # tables/plot of what exists

Outputs: ``--output``.md (mean ± standard error over seeds per method x rank x targets x task,
adapter and head parameters, the exact command) and ``--output``.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from grid_runs import (
    add_clipping_option,
    finished,
    fmt,
    guarded,
    load_subset,
    mean_se,
    measure_step,
    run_resumable,
    run_seconds,
    setup_threads,
)

from metatt_deploy import TrainConfig
from metatt_deploy.common.files import atomic_write_text
from metatt_deploy.common.report import markdown_table, plt, save_figure

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("metatt-4d", "metatt-5d", "lora", "vera")
LABEL = {"metatt-4d": "MetaTT-4D", "metatt-5d": "MetaTT-5D", "lora": "LoRA", "vera": "VeRA"}
COLOR = {"metatt-4d": "tab:red", "metatt-5d": "tab:orange", "lora": "tab:blue", "vera": "tab:green"}
MPNET = "sentence-transformers/all-mpnet-base-v2"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MPNET, help="base model (default: the builtin all-mpnet-base-v2)")
    p.add_argument("--tasks", nargs="+", default=["movie-sentiment", "snli"], help="builtin tasks or NAME=train,validation,test files")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8, 16])
    p.add_argument("--lora-extra-ranks", nargs="*", type=int, default=[1], help="ranks only LoRA also runs (the paper's r=1 point)")
    p.add_argument("--target-sets", nargs="+", default=["q,k,v,o", "q,k,v,o,up,down"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train-samples", type=int, default=1000)
    p.add_argument("--max-eval-samples", type=int, default=500, help="validation and test subset size each")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="adapter lr per method (default: the method's default)")
    p.add_argument("--data-seed", type=int, default=0)
    add_clipping_option(p)
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (resume granularity)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "frontier")
    p.add_argument("--output", default=str(ROOT / "docs" / "reports" / "frontier"), help="writes OUTPUT.md and OUTPUT.png")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--plan", action="store_true", help="print the grid and its estimated time (measures one step), run nothing")
    p.add_argument("--report-only", action="store_true", help="only aggregate the runs that exist")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def model_tag(model: str) -> str:
    return Path(model.rstrip("/")).name


def grid(args) -> list[tuple[str, str, str, int, int]]:
    """(task, targets, method, rank, seed), seed-major so a partial grid covers every point once."""
    points = []
    for seed in args.seeds:
        for task in args.tasks:
            for targets in args.target_sets:
                for method in args.methods:
                    ranks = sorted(set(args.ranks) | (set(args.lora_extra_ranks) if method == "lora" else set()))
                    points += [(task, targets, method, r, seed) for r in ranks]
    return points


def task_name(spec: str) -> str:
    return spec.partition("=")[0]


def method_lrs(args) -> dict[str, float]:
    out = {}
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            raise SystemExit(f"error: bad --lr '{item}'; write METHOD=LR with METHOD one of {', '.join(METHODS)}")
        out[method] = float(value)
    return out


def config(args, task: str, targets: str, method: str, rank: int, seed: int) -> TrainConfig:
    out = args.runs / model_tag(args.model) / task_name(task) / targets.replace(",", "") / f"{method}-r{rank}" / f"seed{seed}"
    return TrainConfig(
        output=str(out),
        model=args.model,
        method=method,
        rank=rank,
        targets=targets.split(","),
        lr=method_lrs(args).get(method),
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=seed,
        save_steps=args.save_steps,
        max_grad_norm=args.max_grad_norm,
    )


def command(args) -> str:
    """The command line that reproduces this grid (the script's own arguments)."""
    argv = [a for a in args.argv if a not in ("--report-only", "--plan")]
    return "python tools/experiments/frontier.py " + " ".join(shlex.quote(a) for a in argv)


def collect(args) -> list[dict]:
    """One row per (task, targets, method, rank) with at least one finished seed."""
    rows = []
    seen = set()
    for task, targets, method, rank, _ in grid(args):
        if (task, targets, method, rank) in seen:
            continue
        seen.add((task, targets, method, rank))
        runs = {Path(cfg.output): r for s in args.seeds if (r := finished(cfg := config(args, task, targets, method, rank, s)))}
        if not runs:
            continue
        results = list(runs.values())
        test = mean_se([r["test"]["accuracy"] for r in results if "test" in r])
        trained = json.loads((next(iter(runs)) / "train_config.json").read_text())  # the rates it ran at, not today's defaults
        rows.append(
            {
                "task": task_name(task),
                "targets": targets,
                "method": LABEL[method],
                "rank": rank,
                "lr (adapter / head)": f"{trained['lr']:g} / {trained['head_lr'] or trained['lr']:g}",
                "adapter params": results[0]["trainable_parameters"]["adapter"],
                "head params": results[0]["trainable_parameters"]["head"],
                "seeds": len(results),
                "test acc % (mean ± s.e.)": fmt(*test),
                "best val acc %": fmt(*mean_se([r["best"]["accuracy"] for r in results])),
                "_method": method,
                "_test": test,
            }
        )
    return rows


def plot(args, rows: list[dict], path: Path) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    styles = dict(zip(args.target_sets, ["-", "--", ":", "-."]))
    for ax, task in zip(axes[0], tasks):
        for targets in args.target_sets:
            for method in args.methods:
                pts = sorted(
                    (r["adapter params"], r["_test"]) for r in rows if (r["task"], r["targets"], r["_method"]) == (task, targets, method)
                )
                if not pts:
                    continue
                xs = [p for p, _ in pts]
                ys = [m * 100 for _, (m, _) in pts]
                es = [0.0 if se != se else se * 100 for _, (_, se) in pts]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=es,
                    marker="o",
                    ms=4,
                    capsize=2,
                    linestyle=styles[targets],
                    color=COLOR[method],
                    label=f"{LABEL[method]} ({targets})",
                )
        ax.set_xscale("log")
        ax.set_xlabel("trainable adapter parameters (log; head excluded)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"{model_tag(args.model)}: accuracy vs adapter size (mean ± s.e. over seeds {args.seeds})", fontsize=9)
    save_figure(fig, path)


def report(args) -> str:
    rows = collect(args)
    out = Path(args.output)
    plot(args, rows, out.with_suffix(".png"))
    columns = [k for k in (rows[0] if rows else {}) if not k.startswith("_")]
    lora_extra = f" (LoRA also {args.lora_extra_ranks})" if "lora" in args.methods and args.lora_extra_ranks else ""
    text = (
        f"# Accuracy against trainable parameters on {model_tag(args.model)}\n\n"
        f"Methods {', '.join(LABEL[m] for m in args.methods)} at ranks {args.ranks}{lora_extra}, "
        f"targets {' and '.join(args.target_sets)}; {args.epochs} epochs, batch {args.batch_size}, max length {args.max_length}, "
        f"train subset {args.max_train_samples or 'all'}, validation/test subsets {args.max_eval_samples or 'all'} "
        f"(data seed {args.data_seed}), seeds {args.seeds}; each method at its default learning rates"
        + (f" except {', '.join(args.lr)}" if args.lr else "")
        + ". Test accuracy is that of the best validation epoch's adapter; mean ± standard error over seeds. "
        "Head parameters (the classifier, identical for every method) are not counted on the plot's axis.\n\n"
        f"Reproduce: `{command(args)}`\n\n"
        + (markdown_table(rows, columns=columns) if rows else "(no finished runs yet)\n")
        + f"\n![frontier]({out.name}.png)\n"
    )
    atomic_write_text(out.with_suffix(".md"), text)
    return text


def plan(args) -> None:
    points = grid(args)
    first = points[0]
    task = load_subset(first[0], args.max_train_samples, args.max_eval_samples, args.data_seed)
    n_train, n_val, n_test = (len(task.splits[s]) if s in task.splits else 0 for s in ("train", "validation", "test"))
    # the largest run's step: the widest targets at the largest rank (MetaTT-4D; LoRA's is within ~10%)
    cfg = config(args, first[0], args.target_sets[-1], "metatt-4d", max(args.ranks), first[4])
    step = measure_step(cfg, task)
    per_run = run_seconds(step, n_train, n_val, n_test, args.epochs, args.batch_size)
    print(f"grid: {len(points)} runs = {len(args.seeds)} seeds x {len(args.tasks)} tasks x {len(args.target_sets)} target sets x ", end="")
    print(f"{len(points) // (len(args.seeds) * len(args.tasks) * len(args.target_sets))} (method, rank) points")
    done = sum(finished(config(args, *p)) is not None for p in points)
    print(f"finished already: {done}")
    print(
        f"measured on {first[0]} ({n_train} train rows): load {step['load_s']:.1f} s, step {step['step_s']:.2f} s "
        f"(batch {args.batch_size}, max length {args.max_length}), eval {step['eval_example_s'] * 1000:.1f} ms/example"
    )
    hours = per_run * (len(points) - done) / 3600
    print(f"estimate: {per_run / 60:.1f} min per run, {hours:.1f} h for the {len(points) - done} runs left (at this machine's load now)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan:
        setup_threads(args.threads)
        plan(args)
        return 0
    if not args.report_only:
        setup_threads(args.threads)
        data = {t: load_subset(t, args.max_train_samples, args.max_eval_samples, args.data_seed) for t in args.tasks}
        for point in grid(args):
            guarded(run_resumable, config(args, *point), data[point[0]])
            report(args)
    print(report(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
