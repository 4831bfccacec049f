"""Training several tasks at once: task specs, the multi-task recipe for the loop, adding a task.

`train_multitask` draws one task per batch (training/sampling.py), evaluates every task every
epoch, logs per-task metrics and the normalised gradient norm of every core, and runs through
the one loop (training/loop.py). With ``add_task_from`` it trains only a new task's slice
(appended to the task core) and head against a frozen adapter. The models it trains are
adapters/multitask.py's.

The same recipe trains classifiers (`TaskData`: one head per task, accuracy) and causal language
models (`TextTask`, training/lm_data.py: no head, response-only loss, exact match of greedy
answers with the perplexity of the references, as a single-task causal run scores them); what
differs is the run's `TaskKind` (training/kinds.py), picked once from the type of its tasks.
Parsing the train verb's options into a config and tasks is the CLI's (cli/train.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from matplotlib.ticker import MaxNLocator
from torch import nn

from metatt_deploy.adapters.base_model import load_tokenizer
from metatt_deploy.adapters.config import TEXT_COLUMNS, MetaTTConfig
from metatt_deploy.adapters.heads import routers
from metatt_deploy.adapters.model import get_adapter
from metatt_deploy.adapters.multitask import (
    MultiTaskModel,
    build_multitask,
    extend_tasks,
    load_multitask,
    parameter_counts,
    save_multitask,
)
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_json, atomic_write_text
from metatt_deploy.common.report import markdown_table, save_figure
from metatt_deploy.training.config import MultiTaskConfig
from metatt_deploy.training.data import SPLITS, TaskData, recorded_text_columns
from metatt_deploy.training.guards import exclusive_run
from metatt_deploy.training.kinds import CLASSIFIER_KIND, Scoring, TaskKind, TaskSpec, kind_of_task, with_task
from metatt_deploy.training.lm_data import TextTask
from metatt_deploy.training.loop import MODEL_INPUTS, Recipe, make_accelerator, prepare_run, rank_schedule, run_loop, start_ranks
from metatt_deploy.training.metrics import PRIMARY_METRIC
from metatt_deploy.training.sampling import task_loss_weights, task_probabilities

N_BONDS_4PLUS1 = {"metatt-4d": 4, "metatt-5d": 5}  # multi-task adapters: modes - 1 (the task mode added)
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
METRIC_SHORT = {"accuracy": "acc", "exact_match": "exact match"}  # the metric that picks the best epoch, in reports


# ---------------------------------------------------------------- task specs


def parse_task_spec(text: str) -> TaskSpec:
    """``NAME=DATASET``, ``NAME=train.jsonl[,validation.jsonl[,test.jsonl]]`` or a bare builtin ``DATASET``."""
    text = text.strip()
    name, sep, source = text.partition("=")
    name, source = name.strip(), source.strip()
    if not sep:
        name, source = text, text
    if not name or not source or any(c in name for c in ",/= "):
        raise MetaTTError(
            f"bad --task '{text}'; write NAME=DATASET or NAME=train.jsonl,validation.jsonl,test.jsonl (NAME without , / = or spaces)"
        )
    items = [s.strip() for s in source.split(",")]
    if any(i.lower().endswith(DATA_SUFFIXES) for i in items):
        if not 1 <= len(items) <= 3 or not all(i.lower().endswith(DATA_SUFFIXES) for i in items):
            raise MetaTTError(f"bad --task '{text}': give 1 to 3 data files (train[,validation[,test]]), each {'/'.join(DATA_SUFFIXES)}")
        return TaskSpec(name, files=dict(zip(SPLITS, items)))
    if len(items) != 1:
        raise MetaTTError(f"bad --task '{text}': a data set name has no commas; files must end in {'/'.join(DATA_SUFFIXES)}")
    return TaskSpec(name, dataset=source)


def load_task_spec(
    spec: TaskSpec | str, kind: TaskKind = CLASSIFIER_KIND, *, max_samples: dict[str, int] | None = None, seed: int = 0, **options
) -> TaskData | TextTask:
    """The task of a ``--task`` value (named NAME), read as ``kind`` reads its data (column options: a classifier's)."""
    spec = parse_task_spec(spec) if isinstance(spec, str) else spec
    return kind.read(spec, max_samples, seed, options)


def _core_names(config: MetaTTConfig) -> list[str]:
    return [f"G{k + 1} ({n})" for k, n in enumerate(config.mode_names)]


def _freeze_for_new_task(mtm: MultiTaskModel, new: int):
    """Only the new task's slice and head train; returns a function that restores every other slice.

    The task core is one tensor, so it stays a parameter: a gradient hook zeroes the other
    slices' gradients and, after each optimizer step, the restore function copies them back
    (AdamW's decoupled weight decay would otherwise shrink them), keeping them bit-identical.
    """
    cfg = mtm.adapter_config
    t_core = cfg.mode_names.index("task")
    mtm.requires_grad_(False)
    core = mtm.metatt.cores[t_core]
    core.requires_grad_(True)
    keep = torch.ones(core.shape[1], dtype=torch.bool)
    keep[new] = False
    frozen = core.detach()[:, keep, :].clone()
    mask = (~keep).to(core.dtype).view(1, -1, 1)
    core.register_hook(lambda g: g * mask.to(g.device))
    for r in routers(mtm.model):
        r.heads[new].requires_grad_(True)

    def restore() -> None:
        with torch.no_grad():
            mtm.metatt.cores[t_core][:, keep, :] = frozen.to(core.device)

    return restore


def _param_groups(cfg: MultiTaskConfig, mtm: nn.Module) -> list[dict[str, Any]]:
    """Adapter cores at --lr, heads at --head-lr (default --lr)."""
    cores = [p for p in get_adapter(mtm).parameters() if p.requires_grad]
    heads = [p for r in routers(mtm) for p in r.parameters() if p.requires_grad]
    groups = ({"params": cores, "lr": cfg.adapter_lr}, {"params": heads, "lr": cfg.resolved_head_lr})
    return [g for g in groups if g["params"]]


def _save_best(model: nn.Module, directory: Path, tokenizer) -> None:
    save_multitask(cast(MultiTaskModel, model), directory, tokenizer, force=True)


def _start_model(cfg: MultiTaskConfig, kind: TaskKind, tasks: Sequence[TaskData | TextTask]):
    """(model, tokenizer, ids of the tasks this run trains, the add-task restore hook or None).

    Joint training builds a fresh (4+1)D adapter on the kind's base model; --add-task loads the
    frozen adapter, which must be of the tasks' kind, and appends one task slice (and head).
    """
    if not cfg.add_task_from:
        tokenizer = load_tokenizer(cfg.model)
        mtm = build_multitask(
            kind.load_base(cfg.model, tasks[0].label_names),
            [t.name for t in tasks],
            {t.name: t.label_names for t in tasks},
            method=cfg.method,
            rank=start_ranks(cfg, N_BONDS_4PLUS1[cfg.method]),
            alpha=cfg.alpha,
            init=cfg.init,
            targets=cfg.targets,
            base_model=cfg.model,
            seed=cfg.seed,
            extra={"max_length": cfg.max_length, TEXT_COLUMNS: recorded_text_columns(tasks)},
        )
        return mtm, tokenizer, list(range(len(tasks))), None
    mtm, _, tokenizer = load_multitask(cfg.add_task_from, base_model=cfg.model)
    if mtm.adapter_config.kind is not kind.model:
        raise MetaTTError(
            f"{cfg.add_task_from} is a {mtm.adapter_config.kind.name} adapter; add a task of the same kind "
            f"(text-to-text tasks for a causal LM, labelled ones for a classifier), not a {kind.name} task"
        )
    columns = recorded_text_columns(tasks).get(tasks[0].name, [])
    new = extend_tasks(mtm, tasks[0].name, tasks[0].label_names, seed=cfg.seed, text_columns=columns)
    return mtm, tokenizer, [new], _freeze_for_new_task(mtm, new)


def _announce(accelerator, mtm: MultiTaskModel, tasks: Sequence[TaskData | TextTask], probs, loss_weights) -> None:
    """The run's first line: adapter size, task sampling and loss weights."""
    counts, config = parameter_counts(mtm), mtm.adapter_config
    accelerator.print(
        f"{config.method} ({'+'.join(config.mode_names)}): {counts['adapter_total']:,} adapter parameters "
        f"({counts['shared_cores']:,} shared), {counts['total']:,} with the heads; "
        "task sampling "
        + ", ".join(f"{t.name} {p:.2f}" for t, p in zip(tasks, probs))
        + ("; loss weights " + ", ".join(f"{t.name} {w:g}" for t, w in zip(tasks, loss_weights)) if loss_weights else ""),
        flush=True,
    )


@exclusive_run
def train_multitask(cfg: MultiTaskConfig, tasks: Sequence[TaskData | TextTask], force: bool = False) -> dict:
    """Run (or resume) a multi-task run (or an --add-task run) into ``cfg.output``; returns the metrics.

    ``tasks`` are classification tasks (`TaskData`: a head per task, accuracy picks the best epoch)
    or text-to-text tasks (`TextTask`: a causal LM, mean exact match picks it, ties broken by the
    lower mean perplexity).
    """
    kind = kind_of_task(tasks[0])
    primary = kind.primary_metric
    loss_weights = task_loss_weights([t.name for t in tasks], cfg.task_weights)  # a misnamed task fails before any loading
    accelerator = make_accelerator(find_unused_parameters=True)
    run, resuming = prepare_run(cfg, force, accelerator)
    torch.manual_seed(cfg.seed)
    mtm, tokenizer, train_ids, restore = _start_model(cfg, kind, tasks)
    mtm.train()
    schedule = rank_schedule(cfg, mtm.metatt)
    splits = []
    for task in tasks:
        s = kind.tokenize(task, tokenizer, cfg.max_length, mtm.model)
        if "train" not in s or "validation" not in s:
            raise MetaTTError(f"task '{task.name}' needs a train and a validation split; give train.jsonl,validation.jsonl")
        splits.append(s)
    scoring = Scoring(accelerator, tokenizer, kind.collator(tokenizer), cfg.eval_batch_size)
    columns = [c for c in MODEL_INPUTS if c in splits[0]["train"].column_names]
    rows = [s["train"].select_columns(columns).to_list() for s in splits]
    probs = task_probabilities([len(r) for r in rows], cfg.task_sampling, cfg.temperature)
    validation = [kind.eval_input(splits[k]["validation"], i, scoring, True) for k, i in enumerate(train_ids)]
    _announce(accelerator, mtm, tasks, probs, loss_weights)
    core_names = _core_names(mtm.adapter_config)

    def gradient_fields(grad: dict[str, Any]) -> dict[str, Any]:
        return {
            "grad_norm_rms": dict(zip(core_names, [s / max(1, grad["count"]) for s in grad["sum"]])),
            "batches_per_task": {tasks[k].name: n for k, n in enumerate(grad["task_steps"])},
        }

    def evaluate_epoch(model: nn.Module) -> tuple[dict[str, Any], float, str]:
        metrics = {
            tasks[k].name: kind.score_task(model, i, validation[k], scoring, len(tasks[k].label_names), True)
            for k, i in enumerate(train_ids)
        }
        fields, score = kind.score(metrics)
        mean = fields[f"mean_{primary}"]
        line = ", ".join(f"{n} {METRIC_SHORT[primary]} {m[primary]:.4f}" for n, m in metrics.items()) + f"; mean {mean:.4f}"
        return fields, score, line

    recipe = Recipe(
        model=mtm,
        rows=rows,
        probs=probs.tolist(),
        collate=lambda t, batch_rows: with_task(scoring.collator, train_ids[t], batch_rows),
        evaluate=evaluate_epoch,
        save_best=lambda model, directory: _save_best(model, directory, tokenizer),
        param_groups=lambda model: _param_groups(cfg, model),
        task_names=[t.name for t in tasks],
        adapter=mtm.metatt,
        after_step=restore,
        gradient_fields=gradient_fields,
        description="train multi-task",
        schedule=schedule,
        loss_weights=loss_weights,
    )
    state = run_loop(cfg, run, resuming, recipe, accelerator)
    result = _result(cfg, kind, mtm, tasks, rows, probs, train_ids, state)
    if accelerator.is_main_process:
        result["test"] = _test(cfg, kind, tasks, splits, scoring, run)
        atomic_write_json(run / "metrics.json", result)
        write_multitask_report(run, result)
    accelerator.end_training()
    return result


def _result(cfg: MultiTaskConfig, kind: TaskKind, mtm: MultiTaskModel, tasks, rows, probs, train_ids: list[int], state: dict) -> dict:
    """metrics.json's fields of a finished loop (the test scores are added by the main process)."""
    return {
        "method": mtm.adapter_config.method,
        "mode": "add-task" if cfg.add_task_from else "joint",
        "task_type": kind.name,
        "primary_metric": kind.primary_metric,
        "model": cfg.model,
        "tasks": [
            {
                "name": t.name,
                "source": spec,
                "labels": t.label_names,
                "train_examples": len(r),
                "sampling_probability": float(p),
                "loss_weight": cfg.task_weights.get(t.name, 1.0),
            }
            for t, spec, r, p in zip(tasks, cfg.tasks, rows, probs)
        ],
        "task_sampling": {"kind": cfg.task_sampling, "temperature": cfg.temperature},
        "trainable_parameters": _trainable_summary(mtm, train_ids),
        "history": state["history"],
        "best": state["best"],
        "step_time_median_s": statistics.median(state["step_times"]) if state["step_times"] else None,
        "steps": state["global_step"],
    }


def _test(cfg: MultiTaskConfig, kind: TaskKind, tasks, splits: list[dict], scoring: Scoring, run: Path) -> dict[str, Any]:
    """Every task's test split scored in this process alone, with the best epoch's adapter reloaded from ``run/best``."""
    best, _, _ = load_multitask(run / "best", base_model=cfg.model, tokenizer=False)
    best = best.to(scoring.accelerator.device)
    scores = {}
    for k, task in enumerate(tasks):
        if "test" in splits[k]:
            i = best.tasks.index(task.name)
            source = kind.eval_input(splits[k]["test"], i, scoring, False)
            scores[task.name] = kind.score_task(best, i, source, scoring, len(task.label_names), False)
    return scores


def _trainable_summary(mtm: MultiTaskModel, trained: list[int]) -> dict:
    counts = parameter_counts(mtm)
    trained_names = [mtm.tasks[i] for i in trained]
    counts["trained_in_this_run"] = sum(p.numel() for p in mtm.parameters() if p.requires_grad)
    if len(trained) == 1 and len(mtm.tasks) > 1 and counts["trained_in_this_run"] != counts["adapter_total"]:
        # add-task: the task core is a parameter, but only the new slice moves
        core = mtm.metatt.cores[mtm.adapter_config.mode_names.index("task")]
        counts["trained_in_this_run"] = counts["per_task"][trained_names[0]]["total"]
        counts["note"] = f"only task '{trained_names[0]}''s slice ({core.shape[0]}x{core.shape[2]}) and head trained"
    return counts


def write_multitask_report(run: Path, result: dict) -> None:
    """metrics.md (tasks, parameters, per-epoch per-task metrics, gradient norms, test) and curves.png."""
    import matplotlib.pyplot as plt

    history = result["history"]
    primary = result.get("primary_metric", PRIMARY_METRIC)
    short = METRIC_SHORT[primary]
    names = [t["name"] for t in result["tasks"]]
    counts = result["trainable_parameters"]
    text = [f"# {result['method']} multi-task ({result['mode']}): {', '.join(names)}\n", f"model: `{result['model']}`\n"]
    text.append(
        "\n## Tasks\n\n"
        + markdown_table(
            [
                {
                    "task": t["name"],
                    "source": t["source"],
                    "labels": len(t["labels"]),
                    "train examples": t["train_examples"],
                    "sampling p": t["sampling_probability"],
                    "loss weight": t.get("loss_weight", 1.0),
                }
                for t in result["tasks"]
            ],
            floatfmt=".3f",
        )
    )
    text.append(
        "\n## Trainable parameters\n\n"
        + markdown_table(
            [{"part": "shared cores", "parameters": counts["shared_cores"]}]
            + [
                {"part": f"task {n}: slice + head", "parameters": f"{v['task_slice']} + {v['head']} = {v['total']}"}
                for n, v in counts["per_task"].items()
            ]
            + [
                {"part": "total (adapter + every head)", "parameters": counts["total"]},
                {"part": "trained in this run", "parameters": counts["trained_in_this_run"]},
            ]
        )
    )
    if result.get("step_time_median_s"):
        text.append(f"\nmedian step time: {result['step_time_median_s'] * 1000:.1f} ms over {result['steps']} steps\n")
    rows = []
    for h in history:
        row = {"epoch": h["epoch"], "step": h["step"]}
        row.update({f"{n} {short}": m[primary] for n, m in h["tasks"].items()})
        row[f"mean {short}"] = h[f"mean_{primary}"]
        if "mean_perplexity" in h:
            row.update({f"{n} perplexity": m["perplexity"] for n, m in h["tasks"].items()})
        row.update({f"{n} batches": b for n, b in h["batches_per_task"].items()})
        rows.append(row)
    text.append("\n## Validation per epoch\n\n" + markdown_table(rows))
    text.append(
        "\n## Gradient norm per core (RMS: ||grad G_k||_F / sqrt(size of G_k), mean over the epoch's steps)\n\n"
        + markdown_table([{"epoch": h["epoch"], **h["grad_norm_rms"]} for h in history], floatfmt=".3e")
    )
    if result.get("test"):
        text.append("\n## Test (best epoch's adapter)\n\n" + markdown_table([{"task": n, **m} for n, m in result["test"].items()]))
    atomic_write_text(run / "metrics.md", "\n".join(text))
    if not history:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = [h["epoch"] for h in history]
    for n in history[0]["tasks"]:
        ax1.plot(epochs, [h["tasks"][n][primary] for h in history], marker="o", label=n)
    if len(history[0]["tasks"]) > 1:
        ax1.plot(epochs, [h[f"mean_{primary}"] for h in history], "k--", label="mean")
    label = primary.replace("_", " ")
    ax1.set(xlabel="epoch", ylabel=f"validation {label}", title=f"per-task validation {label}")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for core in history[0]["grad_norm_rms"]:
        values = [h["grad_norm_rms"][core] for h in history]
        if any(v > 0 for v in values):
            ax2.plot(epochs, values, marker="o", label=core)
    ax2.set(xlabel="epoch", ylabel="RMS gradient", title="normalised gradient norm per core", yscale="log")
    ax2.legend()
    ax2.grid(alpha=0.3)
    save_figure(fig, run / "curves.png")
