"""MetaTT against PEFT LoRA on a real task: same data, epochs, targets, rank and loop.

Runs every (method, seed) into runs/compare/<task>/<method>-s<seed> (finished runs are
reused, interrupted ones resume), then writes a markdown table (mean and standard error of
test accuracy over seeds, trainable parameters, median step time) and a PNG of the
validation curves to docs/reports/results.md and docs/reports/results.png.

    python tools/experiments/compare_lora.py --task movie-sentiment --seeds 0 1 --epochs 3 --max-train-samples 4000
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
from grid_runs import add_clipping_option, reuse

from metatt_deploy import TrainConfig, load_task, train
from metatt_deploy.common.files import atomic_write_text
from metatt_deploy.common.report import markdown_table, save_figure
from metatt_deploy.training.config import DEFAULT_MAX_GRAD_NORM


def run_single(
    out: Path,
    dataset: str,
    method: str,
    seed: int,
    *,
    lr: float | None = None,
    head_lr: float | None = None,
    rank: int = 8,
    targets: str = "q,k,v,o",
    epochs: int = 3,
    batch_size: int = 32,
    max_length: int = 64,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM,
) -> dict:
    """One single-task run into ``out``; a finished run is reused, an interrupted one resumes.

    The data subset is drawn with seed 0 whatever the training seed, so seeds vary only the
    training (initialisation, batch order, dropout), never the rows.
    """
    cfg = TrainConfig(
        output=str(out),
        method=method,
        rank=rank,
        targets=targets.split(","),
        lr=lr,
        head_lr=head_lr,
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        max_grad_norm=max_grad_norm,
    )
    if (done := reuse(cfg)) is not None:
        return done
    limits = {"train": max_train_samples, "validation": max_eval_samples, "test": max_eval_samples}
    task = load_task(dataset=dataset, max_samples={k: v for k, v in limits.items() if v}, seed=0)
    return train(cfg, task)


def method_lr(args, method: str) -> float | None:
    """--lr for every method, else --metatt-lr for MetaTT methods, else None (the method's default)."""
    if args.lr is not None:
        return args.lr
    return args.metatt_lr if method.startswith("metatt") else None


def run_one(args, method: str, seed: int) -> dict:
    return run_single(
        Path(args.runs) / args.task / f"{method}-s{seed}",
        args.task,
        method,
        seed,
        lr=method_lr(args, method),
        rank=args.rank,
        targets=args.targets,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        max_grad_norm=args.max_grad_norm,
    )


def mean_se(values: list[float]) -> str:
    m = statistics.mean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{m:.4f} ± {se:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="movie-sentiment")
    ap.add_argument("--methods", nargs="+", default=["metatt-4d", "lora"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--lr", type=float, default=None, help="one lr for all methods (default: each method's default)")
    ap.add_argument("--metatt-lr", type=float, default=None, help="lr of the MetaTT methods only")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-train-samples", type=int, default=None)
    ap.add_argument("--max-eval-samples", type=int, default=None)
    add_clipping_option(ap)
    ap.add_argument("--runs", default="runs/compare")
    ap.add_argument("--output", default="docs/reports/results")
    args = ap.parse_args()
    results = {m: [run_one(args, m, s) for s in args.seeds] for m in args.methods}
    rows = []
    for m, rs in results.items():
        run_cfg = json.loads((Path(args.runs) / args.task / f"{m}-s{args.seeds[0]}" / "train_config.json").read_text())
        rows.append(
            {
                "method": m,
                "lr (adapter / head)": f"{run_cfg['lr']:g} / {run_cfg['head_lr'] or run_cfg['lr']:g}",
                "test accuracy (mean ± s.e.)": mean_se([r["test"]["accuracy"] for r in rs]),
                "best val accuracy": mean_se([r["best"]["accuracy"] for r in rs]),
                "test accuracy per seed": ", ".join(f"{r['test']['accuracy']:.4f}" for r in rs),
                "trainable adapter params": f"{rs[0]['trainable_parameters']['adapter']:,}",
                "head params": f"{rs[0]['trainable_parameters']['head']:,}",
                "median step (ms)": statistics.median(r["step_time_median_s"] for r in rs) * 1000,
            }
        )
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, rs in results.items():
        for s, r in zip(args.seeds, rs):
            ax.plot([h["epoch"] for h in r["history"]], [h["accuracy"] for h in r["history"]], marker="o", label=f"{m} seed {s}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{args.task}: MetaTT vs LoRA, rank {args.rank}, {args.targets}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, f"{args.output}.png")
    text = (
        f"# MetaTT vs PEFT LoRA on {args.task}\n\n"
        f"all-MiniLM-L6-v2, targets {args.targets}, rank {args.rank}, {args.epochs} epochs, batch {args.batch_size}, "
        f"max length {args.max_length}, train subset {args.max_train_samples or 'all'}, "
        f"validation/test subset {args.max_eval_samples or 'all'}, seeds {args.seeds}. Test accuracy is that of the "
        f"best validation epoch's adapter.\n\nReproduce: `python tools/experiments/compare_lora.py --task {args.task} --seeds "
        f"{' '.join(map(str, args.seeds))} --epochs {args.epochs}"
        + (f" --max-train-samples {args.max_train_samples}" if args.max_train_samples else "")
        + (f" --max-eval-samples {args.max_eval_samples}" if args.max_eval_samples else "")
        + (f" --lr {args.lr:g}" if args.lr is not None else "")
        + (f" --metatt-lr {args.metatt_lr:g}" if args.metatt_lr is not None else "")
        + (f" --max-grad-norm {args.max_grad_norm:g}" if args.max_grad_norm != DEFAULT_MAX_GRAD_NORM else "")
        + "`\n\n"
        + markdown_table(rows, floatfmt=".1f")
        + f"\n![validation curves]({Path(args.output).name}.png)\n"
    )
    atomic_write_text(f"{args.output}.md", text)
    print(text)


if __name__ == "__main__":
    main()
