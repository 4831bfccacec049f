"""Joint MetaTT-(4+1)D against single-task MetaTT-4D and PEFT LoRA on a causal LM, task by task,
and the trained joint adapter's factored bundle against each task's merged export.

    python tools/experiments/multitask_vs_single_lm.py [--tasks movie=movie-sentiment snli=snli amazon=amazon-sentiment]
        [--seeds 0,1] [--out runs/compare-llm] [--report docs/reports/multitask-decoders-comparison] [--parity-prompts 30]

Every method sees the same data, steps and settings (tools/experiments/compare_decoders.py's defaults: per
task and seed 256 training, 32 validation and 100 test rows, batch 8, rank 8,
q,k,v,o,gate,up,down, 1 epoch, MetaTT lr 2e-3, LoRA lr 1e-3, max length 192):

- the single-task runs are compare_decoders' ``run_one`` under --out (``DATASET-METHOD-sSEED``),
  so the runs it finished there are reused (and the zero-shot floor on the same test rows);
- the joint run (``joint-NAME+NAME+...-sSEED``) loads every task with the sizes and seed that
  ``load_text_task`` gets for the single-task runs (the same rows), at the MetaTT lr; one epoch
  of proportional sampling over equal-sized tasks is sum_t ceil(n_t / batch) steps, so each task
  gets its single-task number of batches in expectation (the counts drawn are reported);
- parity, on the first seed's joint adapter: ``merge --factored``, per task ``merge --task`` +
  ``export``, then greedy generation (fp32) of --parity-prompts of the task's test prompts from the
  bundle's two graphs (adapter and tasks form) against the task's merged export, plus the max
  |logit diff| teacher-forced over prompt and answer (bench_multitask_decoders.task_parity).

Finished runs and a finished parity check are reused. Writes REPORT.md, REPORT.json, REPORT.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the user tools it builds on (tools/)

from bench_multitask_decoders import bundle_and_exports, task_parity  # noqa: E402
from compare_decoders import TARGETS, mean_se, run_one  # noqa: E402
from grid_runs import add_clipping_option, reuse  # noqa: E402

from metatt_deploy import DEFAULT_DECODER, MultiTaskConfig, train_multitask  # noqa: E402
from metatt_deploy.adapters.base_model import load_tokenizer  # noqa: E402
from metatt_deploy.common.files import atomic_write_json, atomic_write_text  # noqa: E402
from metatt_deploy.common.report import markdown_table, save_figure  # noqa: E402
from metatt_deploy.training.kinds import CAUSAL_LM_KIND  # noqa: E402
from metatt_deploy.training.lm_data import TextTask, prompt_ids  # noqa: E402
from metatt_deploy.training.multitask import TaskSpec, load_task_spec, parse_task_spec  # noqa: E402

JOINT = "joint"
LABELS = {
    "zero-shot": "zero-shot",
    JOINT: "joint MetaTT-(4+1)D",
    "metatt-4d": "single MetaTT-4D",
    "metatt-5d": "single MetaTT-5D",
    "lora": "single LoRA",
}


def sizes(args: argparse.Namespace) -> dict[str, int]:
    """Rows per split, as compare_decoders.run_one draws them."""
    return {"train": args.train_samples, "validation": args.val_samples, "test": args.eval_samples}


def joint_tasks(args: argparse.Namespace, specs: list[TaskSpec], seed: int) -> list[TextTask]:
    """Every task's rows for the joint run: ``load_text_task(dataset, sizes, seed)``, as for its single-task runs."""
    return [cast(TextTask, load_task_spec(spec, CAUSAL_LM_KIND, max_samples=sizes(args), seed=seed)) for spec in specs]


def joint_dir(args: argparse.Namespace, specs: list[TaskSpec], seed: int) -> Path:
    return Path(args.out) / f"joint-{'+'.join(s.name for s in specs)}-s{seed}"


def run_joint(args: argparse.Namespace, specs: list[TaskSpec], seed: int) -> dict:
    """One seed of the joint (4+1)D run (reused when finished, resumed when interrupted)."""
    cfg = MultiTaskConfig(
        output=str(joint_dir(args, specs, seed)),
        model=args.model,
        tasks=[f"{s.name}={s.dataset}" for s in specs],
        method="metatt-4d",
        rank=args.rank,
        targets=TARGETS,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=32,
        max_length=args.max_length,
        seed=seed,
        max_grad_norm=args.max_grad_norm,
    )
    if (done := reuse(cfg)) is not None:
        return done
    return train_multitask(cfg, joint_tasks(args, specs, seed))


def run_parity(args: argparse.Namespace, specs: list[TaskSpec], seed: int) -> dict:
    """The factored bundle of seed ``seed``'s joint adapter against each task's merged export (reused when done)."""
    work = Path(f"{joint_dir(args, specs, seed)}-parity")
    done = work / "parity.json"
    if done.is_file():
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    bundle, merged = bundle_and_exports(joint_dir(args, specs, seed) / "best", work, timings)
    tokenizer = load_tokenizer(args.model)
    tasks = joint_tasks(args, specs, seed)
    prompts = {t.name: [prompt_ids(m, tokenizer) for m in t.splits["test"]["messages"][: args.parity_prompts]] for t in tasks}
    t0 = time.perf_counter()
    rows = task_parity(bundle, merged, prompts, args.new_tokens)
    timings["parity_s"] = time.perf_counter() - t0
    result = {"seed": seed, "new_tokens": args.new_tokens, "rows": rows, "timings": timings}
    atomic_write_json(done, result)
    return result


def plot(args: argparse.Namespace, specs: list[TaskSpec], em: dict[str, dict[str, list[float]]], path: str) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(next(iter(em.values())))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(methods)
    x = np.arange(len(specs))
    for k, m in enumerate(methods):
        values = [em[s.name][m] for s in specs]
        means = [statistics.mean(v) for v in values]
        errs = [statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0 for v in values]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=LABELS[m])
    ax.set_xticks(x, [s.name for s in specs])
    ax.set(ylabel="test exact match", ylim=(0, 1), title=f"{Path(args.model).name}, rank {args.rank}, seeds {args.seeds}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_DECODER)
    parser.add_argument("--tasks", nargs="+", default=["movie=movie-sentiment", "snli=snli", "amazon=amazon-sentiment"])
    parser.add_argument("--single", default="zero-shot,metatt-4d,lora", help="single-task methods (compare_decoders' names)")
    parser.add_argument("--train-samples", type=int, default=256)
    parser.add_argument("--val-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=100, help="test rows per task and seed")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="MetaTT lr (joint and single)")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    add_clipping_option(parser)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--parity-prompts", type=int, default=30, help="test prompts per task (0: no parity check)")
    parser.add_argument("--new-tokens", type=int, default=12, help="greedy tokens per parity prompt")
    parser.add_argument("--out", default="runs/compare-llm")
    parser.add_argument("--report", default="docs/reports/multitask-decoders-comparison")
    args = parser.parse_args(argv)

    specs = [parse_task_spec(t) for t in args.tasks]
    if any(s.dataset is None for s in specs) or len(specs) < 2:
        parser.error("--tasks takes two or more NAME=BUILTIN (the single-task runs are compare_decoders' builtin data sets)")
    seeds = [int(s) for s in args.seeds.split(",")]
    single = args.single.split(",")
    runs: dict[str, dict[str, list[dict]]] = {s.name: {} for s in specs}
    joint = [run_joint(args, specs, seed) for seed in seeds]
    for spec in specs:
        for method in single:
            task_args = argparse.Namespace(**{**vars(args), "dataset": spec.dataset})
            runs[spec.name][method] = [run_one(task_args, method, seed) for seed in seeds]
    order = [m for m in ("zero-shot", JOINT, "metatt-4d", "metatt-5d", "lora") if m == JOINT or m in single]
    em: dict[str, dict[str, list[float]]] = {}
    ppl: dict[str, dict[str, list[float]]] = {}
    for spec in specs:
        tests = {JOINT: [r["test"][spec.name] for r in joint], **{m: [r["test"] for r in runs[spec.name][m]] for m in single}}
        em[spec.name] = {m: [t["exact_match"] for t in tests[m]] for m in order}
        ppl[spec.name] = {m: [t["perplexity"] for t in tests[m]] for m in order}

    def row(name: str, values: dict[str, list[float]]) -> dict[str, str]:
        return {"task": name, **{LABELS[m]: f"{mean_se(v)} ({' / '.join(f'{x:.2f}' for x in v)})" for m, v in values.items()}}

    mean_row = {m: [statistics.mean(em[s.name][m][i] for s in specs) for i in range(len(seeds))] for m in order}
    em_rows = [row(s.name, em[s.name]) for s in specs] + [row("mean over tasks", mean_row)]
    ppl_rows = [row(s.name, ppl[s.name]) for s in specs]

    counts = joint[0]["trainable_parameters"]
    per_slice = counts["per_task"][specs[0].name]["task_slice"]
    first = specs[0].name
    cost = [
        {
            "method": LABELS[JOINT],
            "adapter parameters": f"{counts['shared_cores']:,} shared + {per_slice:,} per task",
            f"for {len(specs)} tasks": f"{counts['total']:,}",
            "optimizer steps (per seed)": " / ".join(str(r["steps"]) for r in joint),
            "batches per task (per seed)": " / ".join(
                ", ".join(f"{t} {n}" for t, n in r["history"][-1]["batches_per_task"].items()) for r in joint
            ),
            "median step s": f"{statistics.median(r['step_time_median_s'] for r in joint):.2f}",
        }
    ]
    for m in single:
        if m == "zero-shot":
            continue
        adapter = runs[first][m][0]["trainable_parameters"]["adapter"]
        cost.append(
            {
                "method": LABELS[m],
                "adapter parameters": f"{adapter:,} per task",
                f"for {len(specs)} tasks": f"{len(specs) * adapter:,}",
                "optimizer steps (per seed)": " + ".join(str(runs[s.name][m][0]["steps"]) for s in specs) + " (one run per task)",
                "batches per task (per seed)": "all of the task's",
                "median step s": f"{statistics.median(r['step_time_median_s'] for s in specs for r in runs[s.name][m]):.2f}",
            }
        )

    parity = run_parity(args, specs, seeds[0]) if args.parity_prompts else None
    plot(args, specs, em, f"{args.report}.png")
    command = "python tools/experiments/multitask_vs_single_lm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        "# Joint MetaTT-(4+1)D against single-task MetaTT-4D and PEFT LoRA on a decoder\n\n"
        f"model `{args.model}`, targets {','.join(TARGETS)}, rank {args.rank}, per task and seed {args.train_samples} training, "
        f"{args.val_samples} validation and {args.eval_samples} test rows (the same rows for every method; each seed draws "
        f"its own), {args.epochs} epoch(s), batch {args.batch_size}, max length {args.max_length}, MetaTT lr {args.lr:g} "
        f"(joint and single), LoRA lr {args.lora_lr:g}; seeds {args.seeds}. Test exact match (greedy answer after "
        "normalisation) of the best validation epoch; mean +- standard error over seeds, then each seed.\n\n"
        f"`{command}`\n\n## Test exact match\n\n" + markdown_table(em_rows) + f"\n![test exact match]({Path(args.report).name}.png)\n\n"
        "## Test perplexity of the reference answers\n\n"
        + markdown_table(ppl_rows)
        + "\n## Parameters and steps\n\n"
        + markdown_table(cost)
    )
    if parity:
        text += (
            f"\n## Parity of the factored bundle (joint adapter, seed {parity['seed']})\n\n"
            f"Greedy generation ({parity['new_tokens']} new tokens, fp32, ONNX Runtime CPU) from the bundle's graph in each form "
            "against the task's merged export (`merge --task` + `export`); max |logit diff| teacher-forced over prompt + answer.\n\n"
            + markdown_table(parity["rows"], floatfmt=".2e")
        )
    atomic_write_text(f"{args.report}.md", text)
    atomic_write_json(
        f"{args.report}.json",
        {
            "settings": {k: v for k, v in vars(args).items()},
            "exact_match": em,
            "perplexity": ppl,
            "parameters_and_steps": cost,
            "parity": parity,
        },
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
