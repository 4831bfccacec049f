"""Joint MetaTT-(4+1)D against single-task MetaTT-4D and single-task PEFT LoRA, task by task.

Every run sees the same rows: each task's training/validation/test subsets are drawn with
seed 0, the joint run draws each task's batches from exactly those rows, and the single-task
runs train on each task alone for the same epochs, so each task contributes the same number
of optimizer steps in all three set-ups. Seeds vary only the training (initialisation,
batch order, dropout). Finished runs are reused, interrupted ones resume.

Writes a markdown table (test accuracy mean ± s.e. per task and method, trainable
parameters per task and for all tasks together) and a bar chart to docs/reports/multitask-comparison.md and .png.

    python tools/experiments/multitask_vs_single.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from compare_lora import run_single
from grid_runs import add_clipping_option, reuse

from metatt_deploy import MultiTaskConfig, train_multitask
from metatt_deploy.common.files import atomic_write_text
from metatt_deploy.common.report import markdown_table, save_figure
from metatt_deploy.training.multitask import load_task_spec, parse_task_spec
from metatt_deploy.training.sampling import parse_task_weights

JOINT = "joint MetaTT-(4+1)D"
# single-task set-ups: key (run folder prefix) -> (label, method, lr, head lr); None = the method's default
SINGLE = {
    "metatt-4d": ("single MetaTT-4D, lr 5e-3 (old default)", "metatt-4d", 5e-3, 5e-3),
    "metatt-4d-lr1e-3": ("single MetaTT-4D, lr 1e-3, head 5e-3 (default until issue 15)", "metatt-4d", 1e-3, 5e-3),
    "metatt-4d-lr3e-3": ("single MetaTT-4D, lr 3e-3, head 5e-3 (default)", "metatt-4d", 3e-3, 5e-3),
    "lora": ("single PEFT LoRA, lr 1e-3 (default)", "lora", 1e-3, None),
}


def cell(values: list[float]) -> str:
    """mean ± standard error, then every seed's value."""
    se = f" ± {statistics.stdev(values) / len(values) ** 0.5:.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{se} ({', '.join(f'{v:.3f}' for v in values)})"


def joint_folder(args, seed: int) -> Path:
    """joint-s<seed>, with per-bond ranks (e.g. 8/8/16/16: a wider task core) and loss weights
    (e.g. snli=2) in the name, so every joint set-up keeps its own runs."""
    parts = ["joint"]
    if args.joint_ranks:
        parts.append(args.joint_ranks.replace("/", "_"))
    parts += [f"w{name}{weight:g}" for name, weight in args.joint_task_weights.items()]
    return Path(args.runs) / "-".join([*parts, f"s{seed}"])


def run_joint(args, seed: int) -> dict:
    cfg = MultiTaskConfig(
        output=str(joint_folder(args, seed)),
        tasks=list(args.tasks),
        rank=args.rank,
        targets=args.targets.split(","),
        lr=args.joint_lr,
        head_lr=args.joint_head_lr,
        rank_schedule=args.joint_ranks,
        task_weights=args.joint_task_weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=seed,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        max_grad_norm=args.max_grad_norm,
    )
    if (done := reuse(cfg)) is not None:
        return done
    tasks = [load_task_spec(parse_task_spec(s), max_samples=cfg.sample_limits(), seed=0) for s in args.tasks]
    return train_multitask(cfg, tasks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["movie=movie-sentiment", "snli=snli", "tweet=tweet-sentiment"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--joint-lr", type=float, help="the joint adapter's core lr (default: the shipped multi-task default)")
    ap.add_argument("--joint-head-lr", type=float, default=5e-3)
    ap.add_argument("--joint-ranks", help="the joint adapter's per-bond ranks in->layer->matrix->task->out, e.g. 8/8/16/16")
    ap.add_argument("--joint-task-weights", nargs="*", default=[], metavar="NAME=W", help="the joint run's loss weights (--task-weight)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-train-samples", type=int, default=2000)
    ap.add_argument("--max-eval-samples", type=int, default=500)
    ap.add_argument("--single", nargs="+", choices=list(SINGLE), default=list(SINGLE), help="single-task set-ups to run")
    add_clipping_option(ap)
    ap.add_argument("--runs", default="runs/multitask-vs-single")
    ap.add_argument("--output", default="docs/reports/multitask-comparison")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.joint_task_weights = parse_task_weights(args.joint_task_weights)

    specs = [parse_task_spec(s) for s in args.tasks]
    joint = [run_joint(args, s) for s in args.seeds]
    joint_lr = json.loads((joint_folder(args, args.seeds[0]) / "train_config.json").read_text())["lr"]
    single = {
        (spec.name, key): [
            run_single(
                Path(args.runs) / spec.name / f"{key}-s{s}",
                spec.dataset,
                SINGLE[key][1],
                s,
                lr=SINGLE[key][2],
                head_lr=SINGLE[key][3],
                rank=args.rank,
                targets=args.targets,
                epochs=args.epochs,
                batch_size=args.batch_size,
                max_length=args.max_length,
                max_train_samples=args.max_train_samples,
                max_eval_samples=args.max_eval_samples,
                max_grad_norm=args.max_grad_norm,
            )
            for s in args.seeds
        ]
        for spec in specs
        for key in args.single
    }

    acc = {(spec.name, JOINT): [r["test"][spec.name]["accuracy"] for r in joint] for spec in specs}
    acc.update({(t, SINGLE[key][0]): [r["test"]["accuracy"] for r in rs] for (t, key), rs in single.items()})
    methods = [JOINT, *(SINGLE[key][0] for key in args.single)]
    rows = [{"task": spec.name, **{m: cell(acc[spec.name, m]) for m in methods}} for spec in specs]
    rows.append(
        {
            "task": "mean over tasks",
            **{m: cell([statistics.mean(acc[s.name, m][i] for s in specs) for i in range(len(args.seeds))]) for m in methods},
        }
    )

    counts = joint[0]["trainable_parameters"]
    heads = {spec.name: counts["per_task"][spec.name]["head"] for spec in specs}
    single_adapter = {key: single[specs[0].name, key][0]["trainable_parameters"]["adapter"] for key in args.single}
    params = [
        {
            "method": JOINT,
            "adapter per task": f"{counts['shared_cores']:,} shared + {counts['per_task'][specs[0].name]['task_slice']:,} task slice",
            "heads": ", ".join(f"{heads[s.name]:,}" for s in specs),
            f"total for {len(specs)} tasks (adapters + heads)": f"{counts['total']:,}",
        }
    ]
    params += [
        {
            "method": SINGLE[key][0],
            "adapter per task": f"{single_adapter[key]:,}",
            "heads": ", ".join(f"{heads[s.name]:,}" for s in specs),
            f"total for {len(specs)} tasks (adapters + heads)": f"{len(specs) * single_adapter[key] + sum(heads.values()):,}",
        }
        for key in args.single
    ]

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    x = np.arange(len(specs))
    for k, m in enumerate(methods):
        means = [statistics.mean(acc[s.name, m]) for s in specs]
        errs = [statistics.stdev(acc[s.name, m]) / len(args.seeds) ** 0.5 if len(args.seeds) > 1 else 0 for s in specs]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=m)
    ax.set_xticks(x, [s.name for s in specs])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"all-MiniLM-L6-v2, rank {args.rank}, {args.epochs} epochs, {len(args.seeds)} seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, f"{args.output}.png")

    text = (
        f"# Joint MetaTT-(4+1)D against single-task MetaTT-4D and PEFT LoRA\n\n"
        f"all-MiniLM-L6-v2, targets {args.targets}, rank {args.rank}, {args.epochs} epochs, batch {args.batch_size}, "
        f"max length {args.max_length}; per task a fixed {args.max_train_samples}-example training subset and "
        f"{args.max_eval_samples}-example validation/test subsets (fewer where the split is smaller), the same rows for "
        f"every method; seeds {args.seeds}. Joint learning rate {joint_lr:g} (heads {args.joint_head_lr:g})"
        f"{f', bond ranks {args.joint_ranks}' if args.joint_ranks else ''}"
        f"{', loss weights ' + ', '.join(f'{n} {w:g}' for n, w in args.joint_task_weights.items()) if args.joint_task_weights else ''}"
        f"{f'; every run (joint and single) clips its gradients to global norm {args.max_grad_norm:g}' if args.max_grad_norm else ''}. Test "
        f"accuracy is that of the best validation epoch (joint: best mean validation accuracy over tasks).\n\n"
        f"Reproduce: `python tools/experiments/multitask_vs_single.py {shlex.join(args.argv)}`\n\n"
        "## Test accuracy (mean ± s.e. over seeds, then each seed)\n\n"
        + markdown_table(rows)
        + f"\n![test accuracy per task]({Path(args.output).name}.png)\n\n## Trainable parameters\n\n"
        + markdown_table(params)
    )
    atomic_write_text(f"{args.output}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
