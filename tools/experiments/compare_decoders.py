"""MetaTT-4D, MetaTT-5D and PEFT LoRA on a decoder, same data, steps, targets and seeds, against
the zero-shot floor on the same test rows: test exact match and perplexity (mean +- standard
error over seeds), adapter parameters and median training-step time (ratio to LoRA).

python tools/experiments/compare_decoders.py [--dataset movie-sentiment] [--train-samples 256] [--eval-samples 100]
    [--val-samples 32] [--epochs 1] [--seeds 0,1] [--methods zero-shot,metatt-4d,metatt-5d,lora]
    [--out runs/compare-llm] [--report docs/reports/decoders-results-movie-sentiment.md] [--finished-only]

Each run is an ordinary `train` run under --out (finished runs are reused, so an interrupted
comparison resumes run by run). LoRA trains at --lora-lr (PEFT's usual 1e-3 range); MetaTT at
--lr. The validation split only picks the best epoch (--val-samples keeps it small for 1 epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the user tools it builds on (tools/)

from grid_runs import add_clipping_option, reuse  # noqa: E402
from lm_zero_shot import zero_shot  # noqa: E402

from metatt_deploy import DEFAULT_DECODER, TrainConfig, load_text_task, train_causal  # noqa: E402
from metatt_deploy.common.files import atomic_write_json, atomic_write_text  # noqa: E402
from metatt_deploy.common.report import markdown_table  # noqa: E402

TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def mean_se(values: list[float]) -> str:
    """``mean +- standard error`` (sample sd / sqrt(n)); the bare value for one seed."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def result_file(args: argparse.Namespace, method: str, seed: int) -> Path:
    """Where one seed of one method (or the zero-shot floor) writes its result under --out."""
    out = Path(args.out) / f"{args.dataset}-{method}-s{seed}"
    return out / ("zero-shot.json" if method == "zero-shot" else "metrics.json")


def train_config(args: argparse.Namespace, method: str, seed: int) -> TrainConfig:
    return TrainConfig(
        output=str(result_file(args, method, seed).parent),
        model=args.model,
        method=method,
        rank=args.rank,
        targets=TARGETS,
        lr=args.lora_lr if method == "lora" else args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=32,
        max_length=args.max_length,
        seed=seed,
        max_grad_norm=args.max_grad_norm,
    )


def finished(args: argparse.Namespace, method: str, seed: int) -> dict | None:
    """That result if the run has finished (a finished run of other settings stops the tool)."""
    if method != "zero-shot":
        return reuse(train_config(args, method, seed))
    done = result_file(args, method, seed)
    return json.loads(done.read_text()) if done.is_file() else None


def run_one(args: argparse.Namespace, method: str, seed: int) -> dict:
    """One seed of one method (or the zero-shot floor), reusing a finished run under --out."""
    if (result := finished(args, method, seed)) is not None:
        return result
    if method == "zero-shot":
        z = zero_shot(args.model, args.dataset, "test", args.eval_samples, seed=seed, max_length=args.max_length)
        result = {"test": {"exact_match": z["exact_match"], "perplexity": z["perplexity"]}, "trainable_parameters": {"adapter": 0}}
        atomic_write_json(result_file(args, method, seed), result)
        return result
    sizes = {"train": args.train_samples, "validation": args.val_samples, "test": args.eval_samples}
    task = load_text_task(dataset=args.dataset, max_samples=sizes, seed=seed)
    return train_causal(train_config(args, method, seed), task, force=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_DECODER)
    parser.add_argument("--dataset", default="movie-sentiment")
    parser.add_argument("--train-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=100, help="test examples per seed")
    parser.add_argument("--val-samples", type=int, default=32, help="validation examples (best-epoch choice only)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    add_clipping_option(parser)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--methods", default="zero-shot,metatt-4d,metatt-5d,lora")
    parser.add_argument("--out", default="runs/compare-llm")
    parser.add_argument("--report", default=None)
    parser.add_argument("--finished-only", action="store_true", help="report the finished runs only; train nothing")
    args = parser.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",")]
    if args.finished_only:
        runs = {m: [r for seed in seeds if (r := finished(args, m, seed))] for m in args.methods.split(",")}
        runs = {m: rs for m, rs in runs.items() if rs}
    else:
        runs = {m: [run_one(args, m, seed) for seed in seeds] for m in args.methods.split(",")}
    lora_step = statistics.median(r["step_time_median_s"] for r in runs["lora"]) if "lora" in runs else None
    rows = []
    for method, results in runs.items():
        em = [r["test"]["exact_match"] for r in results]
        step = statistics.median(r["step_time_median_s"] for r in results) if method != "zero-shot" else None
        rows.append(
            {
                "method": method,
                "exact match": mean_se(em),
                "per seed": " / ".join(f"{v:.2f}" for v in em),
                "perplexity": mean_se([r["test"]["perplexity"] for r in results]),
                "adapter params": f"{results[0]['trainable_parameters']['adapter']:,}",
                "step time (s)": f"{step:.2f}" if step else "-",
                "step / LoRA step": f"{step / lora_step:.2f}" if step and lora_step else "-",
            }
        )
        print(rows[-1], flush=True)
    table = markdown_table(rows)
    print(table)
    if args.report:
        header = (
            f"# Decoder fine-tuning: MetaTT vs PEFT LoRA on {args.dataset}\n\n"
            f"model `{args.model}`, targets {','.join(TARGETS)}, rank {args.rank}, {args.train_samples} training examples, "
            f"{args.epochs} epoch(s), batch {args.batch_size}, MetaTT lr {args.lr}, LoRA lr {args.lora_lr}; seeds {args.seeds} "
            f"(each seed draws its own rows); test: {args.eval_samples} examples per seed (exact match after normalisation; "
            f"perplexity of the reference responses); mean +- standard error over seeds. Step times are medians over the "
            f"run's steps, runs one after another on the same machine.\n\n"
            f"`python tools/experiments/compare_decoders.py {' '.join(a for a in (argv or sys.argv[1:]) if a != '--finished-only')}`\n\n"
        )
        atomic_write_text(args.report, header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
