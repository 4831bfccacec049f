"""Training-step time of MetaTT against PEFT LoRA, side by side in one process.

Both adapters sit on the same base model with the same targets and rank; the same real
batches go through forward, backward and an AdamW step, alternating A B A B so machine drift
hits both alike. Reports medians and the per-pair ratio MetaTT / LoRA, and writes a markdown
table.

- classifiers (default): all-MiniLM-L6-v2 on movie-review sentences, length-grouped as in
  training; writes docs/reports/train-step.md.
- decoders (``--task-type causal-lm``): SmolLM2-135M-Instruct on the movie-sentiment
  text-to-text rows (chat template, loss on the one-word answer: training/lm_data.py), batches
  of 8 in training's length-grouped order (training/sampling.py); writes docs/reports/train-step-decoders.md.

    python tools/bench_train_step.py --reps 20 --batch-size 32 --max-length 64
    python tools/bench_train_step.py --task-type causal-lm --reps 8 --batch-size 8 \\
        --max-length 192 --targets q,k,v,o,gate,up,down --methods metatt-4d,lora

Internals (what this measures lies below the public API, docs/api.md):

- metatt_deploy.adapters.base_model: the base model and tokenizer, which both adapters sit on.
- metatt_deploy.adapters.model: counts each adapter's trainable parameters for the table.
- metatt_deploy.training.lm_data: training's own tokenizing and collation of decoder rows, so the batches are the ones training sees.
- metatt_deploy.training.sampling: training's length-grouped batch order.
- metatt_deploy.training.single: training's model wrapping and optimizer groups: one step is timed in isolation, which `train` does not expose.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.optim

from metatt_deploy import DEFAULT_DECODER, DEFAULT_MODEL, TrainConfig, load_task, load_text_task
from metatt_deploy.adapters.base_model import load_causal_lm, load_classifier, load_tokenizer
from metatt_deploy.adapters.model import count_trainable
from metatt_deploy.common.files import atomic_write_text
from metatt_deploy.common.report import markdown_table
from metatt_deploy.training.lm_data import CausalCollator, tokenize_text_task
from metatt_deploy.training.sampling import epoch_order
from metatt_deploy.training.single import param_groups, wrap_model

DATASET = "movie-sentiment"


def build(method: str, rank: int, targets: list[str], load_base: Callable[[], torch.nn.Module], task_name: str, labels: list[str]):
    torch.manual_seed(0)
    cfg = TrainConfig(output="-", method=method, rank=rank, targets=targets)
    model, _ = wrap_model(cfg, load_base(), task_name, labels)
    model.train()
    return model, torch.optim.AdamW(param_groups(cfg, model), lr=cfg.adapter_lr), count_trainable(model)


def step(model, opt, batch) -> float:
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def classifier_setup(args) -> tuple[list[dict], Callable[[], torch.nn.Module], str, list[str], str]:
    """Real sentence batches for the encoder; (batches, base loader, task, labels, model name)."""
    task = load_task(dataset=DATASET, max_samples={"train": args.batch_size * args.reps})
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
    return batches, lambda: load_classifier(DEFAULT_MODEL, task.label_names), task.name, task.label_names, "all-MiniLM-L6-v2"


def decoder_setup(args) -> tuple[list[dict], Callable[[], torch.nn.Module], str, list[str], str]:
    """Real text-to-text batches for the decoder, in training's length-grouped order."""
    task = load_text_task(dataset=DATASET, max_samples={"train": args.batch_size * args.reps})
    task.splits = {"train": task.splits["train"]}
    tok = load_tokenizer(DEFAULT_DECODER)
    rows = tokenize_text_task(task, tok, args.max_length)["train"]
    rows = rows.select_columns(["input_ids", "labels"]).to_list()
    order = epoch_order([len(r["input_ids"]) for r in rows], args.batch_size, seed=0, epoch=0)
    collate = CausalCollator(tok.pad_token_id)
    batches = [collate([rows[i] for i in order[j : j + args.batch_size]]) for j in range(0, len(order), args.batch_size)]
    return batches, lambda: load_causal_lm(DEFAULT_DECODER), task.name, [], "SmolLM2-135M-Instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task-type", choices=["classification", "causal-lm"], default="classification")
    ap.add_argument("--reps", type=int, default=20, help="batches (each timed once per method)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--methods", default="metatt-4d,metatt-5d,lora", help="comma-separated; lora is the reference")
    ap.add_argument(
        "--output", default=None, help="default: docs/reports/train-step.md, or docs/reports/train-step-decoders.md for decoders"
    )
    args = ap.parse_args()
    decoder = args.task_type == "causal-lm"
    batches, load_base, task_name, labels, model_name = (decoder_setup if decoder else classifier_setup)(args)
    targets = args.targets.split(",")
    methods = args.methods.split(",")
    if "lora" not in methods:
        ap.error("--methods must include lora (the reference of the ratios)")
    runs = {m: build(m, args.rank, targets, load_base, task_name, labels) for m in methods}
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
    tokens = statistics.median(int(b["attention_mask"].sum()) for b in batches)
    kind = "decoders" if decoder else "classifiers"
    command = (
        f"python tools/bench_train_step.py{' --task-type causal-lm' if decoder else ''} --reps {args.reps} --batch-size {args.batch_size} "
        f"--max-length {args.max_length} --rank {args.rank} --targets {args.targets} --methods {args.methods}"
    )
    header = (
        f"# Training step ({kind}): MetaTT vs PEFT LoRA\n\n{model_name}, {DATASET}, targets {args.targets}, rank {args.rank}, "
        f"batch {args.batch_size}, max length {args.max_length}, {len(batches)} real batches (median {tokens} tokens each), "
        f"torch threads {torch.get_num_threads()}; forward + backward + AdamW step, alternated per batch.\n\n"
        f"Reproduce: `{command}`\n\n"
    )
    output = args.output or ("docs/reports/train-step-decoders.md" if decoder else "docs/reports/train-step.md")
    atomic_write_text(output, header + table)
    print(header + table)


if __name__ == "__main__":
    main()
