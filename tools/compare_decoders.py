"""MetaTT-4D, MetaTT-5D and PEFT LoRA on a decoder, same data, steps, targets and seeds, against
the zero-shot floor: test exact match, perplexity, adapter parameters and median step time.

python tools/compare_decoders.py [--dataset movie-sentiment] [--train-samples 512] [--eval-samples 200]
    [--epochs 1] [--seeds 0] [--methods metatt-4d,metatt-5d,lora] [--out runs/compare-llm] [--report docs/decoders-results.md]

Each run is an ordinary `train` run under --out (finished runs are reused). LoRA trains at
--lora-lr (PEFT's usual 1e-3 range); MetaTT at --lr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, uninstalled

from metatt_deploy.adapters.base_model import DEFAULT_DECODER  # noqa: E402
from metatt_deploy.common.files import atomic_write_text  # noqa: E402
from metatt_deploy.common.report import markdown_table  # noqa: E402
from metatt_deploy.training.causal import train_causal  # noqa: E402
from metatt_deploy.training.config import TrainConfig  # noqa: E402
from metatt_deploy.training.lm_data import load_text_task  # noqa: E402

TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_DECODER)
    parser.add_argument("--dataset", default="movie-sentiment")
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default="metatt-4d,metatt-5d,lora")
    parser.add_argument("--zero-shot", help="a tools/lm_zero_shot.py JSON on the same rows, for the floor row")
    parser.add_argument("--out", default="runs/compare-llm")
    parser.add_argument("--report", default=None)
    args = parser.parse_args(argv)

    rows = []
    if args.zero_shot:
        z = json.loads(Path(args.zero_shot).read_text())
        rows.append(
            {
                "method": "zero-shot (untouched)",
                "seeds": "-",
                "exact_match": z["exact_match"],
                "perplexity": z["perplexity"],
                "adapter_params": 0,
            }
        )
    for method in args.methods.split(","):
        results = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = Path(args.out) / f"{args.dataset}-{method}-s{seed}"
            if (out / "metrics.json").is_file():
                results.append(json.loads((out / "metrics.json").read_text()))
                continue
            task = load_text_task(
                dataset=args.dataset,
                max_samples={"train": args.train_samples, "validation": args.eval_samples, "test": args.eval_samples},
                seed=seed,
            )
            cfg = TrainConfig(
                output=str(out),
                model=args.model,
                method=method,
                rank=args.rank,
                targets=TARGETS,
                lr=args.lora_lr if method == "lora" else args.lr,
                epochs=args.epochs,
                batch_size=args.batch_size,
                eval_batch_size=32,
                max_length=192,
                seed=seed,
            )
            results.append(train_causal(cfg, task, force=True))
        rows.append(
            {
                "method": method,
                "seeds": len(results),
                "exact_match": statistics.mean(r["test"]["exact_match"] for r in results),
                "perplexity": statistics.mean(r["test"]["perplexity"] for r in results),
                "adapter_params": results[0]["trainable_parameters"]["adapter"],
                "step_time_s": statistics.median(r["step_time_median_s"] for r in results),
                "steps": results[0]["steps"],
            }
        )
        print(rows[-1], flush=True)
    table = markdown_table(rows)
    print(table)
    if args.report:
        header = (
            f"# Decoder fine-tuning: MetaTT vs PEFT LoRA on {args.dataset}\n\n"
            f"model `{args.model}`, targets {','.join(TARGETS)}, rank {args.rank}, {args.train_samples} training examples, "
            f"{args.epochs} epoch(s), batch {args.batch_size}, MetaTT lr {args.lr}, LoRA lr {args.lora_lr}; test: {args.eval_samples} "
            f"examples (exact match after normalisation; perplexity of the reference responses).\n\n"
            f"`python tools/compare_decoders.py {' '.join(argv or sys.argv[1:])}`\n\n"
        )
        atomic_write_text(args.report, header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
