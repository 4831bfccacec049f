"""Training-step time of MetaTT against PEFT LoRA, side by side in one process.

Both adapters sit on the same base model with the same targets and rank; the same real
batches (movie-review sentences, length-grouped as in training) go through forward, backward
and an AdamW step, alternating A B A B so machine drift hits both alike. Reports medians and
the per-pair ratio MetaTT / LoRA, and writes docs/train-step.md.

    python tools/bench_train_step.py --reps 20 --batch-size 32 --max-length 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.optim

from metatt_deploy.adapters.base_model import DEFAULT_MODEL, load_classifier, load_tokenizer
from metatt_deploy.adapters.model import count_trainable
from metatt_deploy.common.files import atomic_write_text
from metatt_deploy.common.report import markdown_table
from metatt_deploy.training.config import TrainConfig
from metatt_deploy.training.data import load_task
from metatt_deploy.training.single import param_groups, wrap_model


def build(method: str, rank: int, targets: list[str], task):
    torch.manual_seed(0)
    model = load_classifier(DEFAULT_MODEL, task.label_names)
    cfg = TrainConfig(output="-", method=method, rank=rank, targets=targets)
    model, _ = wrap_model(cfg, model, task)
    model.train()
    return model, torch.optim.AdamW(param_groups(cfg, model), lr=cfg.adapter_lr), count_trainable(model)


def step(model, opt, batch) -> float:
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--output", default="docs/train-step.md")
    args = ap.parse_args()
    task = load_task(dataset="movie-sentiment", max_samples={"train": args.batch_size * args.reps})
    tok = load_tokenizer(DEFAULT_MODEL)
    texts = task.splits["train"]["text"]
    labels = torch.tensor(task.splits["train"]["label"])
    batches = [
        {
            **tok(texts[i : i + args.batch_size], padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"),
            "labels": labels[i : i + args.batch_size],
        }
        for i in range(0, len(texts), args.batch_size)
    ]
    targets = args.targets.split(",")
    runs = {m: build(m, args.rank, targets, task) for m in ("metatt-4d", "metatt-5d", "lora")}
    times: dict[str, list[float]] = {m: [] for m in runs}
    for model, opt, _ in runs.values():  # warm-up
        step(model, opt, batches[0])
    for batch in batches:
        for m, (model, opt, _) in runs.items():
            times[m].append(step(model, opt, batch))
    rows = []
    for m, (_, _, counts) in runs.items():
        ratios = [a / b for a, b in zip(times[m], times["lora"])]
        rows.append(
            {
                "method": m,
                "trainable adapter params": f"{counts['adapter']:,}",
                "median step (ms)": statistics.median(times[m]) * 1000,
                "p95 step (ms)": sorted(times[m])[int(0.95 * (len(times[m]) - 1))] * 1000,
                "median ratio vs LoRA": statistics.median(ratios),
            }
        )
    table = markdown_table(rows, floatfmt=".2f")
    header = (
        f"# Training step: MetaTT vs PEFT LoRA\n\nall-MiniLM-L6-v2, targets {args.targets}, rank {args.rank}, "
        f"batch {args.batch_size}, max length {args.max_length}, {len(batches)} real batches, "
        f"torch threads {torch.get_num_threads()}; forward + backward + AdamW step, alternated per batch.\n\n"
        f"Reproduce: `python tools/bench_train_step.py --reps {args.reps} --batch-size {args.batch_size} --max-length {args.max_length}`\n\n"
    )
    atomic_write_text(args.output, header + table)
    print(header + table)


if __name__ == "__main__":
    main()
