"""Single-task runs: a MetaTT adapter or a PEFT baseline (LoRA, VeRA) on one task, through the one loop.

All methods share data, targets, head, loop and evaluation, so comparisons are like for like;
what differs (how the model is wrapped, which parameters train at which rate, how the adapter
is saved and loaded back) is this module's recipe for training/loop.py.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftConfig, PeftModel, VeraConfig, get_peft_model
from torch import nn
from transformers import DataCollatorWithPadding, PreTrainedModel

from metatt_deploy.adapters import model as mt
from metatt_deploy.adapters.base_model import load_classifier, load_tokenizer
from metatt_deploy.adapters.config import TEXT_COLUMNS
from metatt_deploy.adapters.layer import MetaTT
from metatt_deploy.adapters.lora import load_lora, lora_record, write_lora_record
from metatt_deploy.adapters.model_kinds import head_modules, model_kind
from metatt_deploy.adapters.targets import find_targets
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_dir, atomic_write_json
from metatt_deploy.common.report import write_training_report
from metatt_deploy.training.checkpoint import trainable_parameters
from metatt_deploy.training.config import PEFT_METHODS, TrainConfig
from metatt_deploy.training.data import TaskData, recorded_text_columns, tokenize_task
from metatt_deploy.training.guards import exclusive_run
from metatt_deploy.training.lm_data import TextTask
from metatt_deploy.training.loop import (
    MODEL_INPUTS,
    Recipe,
    by_length,
    evaluate,
    make_accelerator,
    make_loader,
    prepare_run,
    rank_schedule,
    run_loop,
    start_ranks,
)
from metatt_deploy.training.metrics import PRIMARY_METRIC
from metatt_deploy.tt.cores import tt_ranks

N_BONDS = {"metatt-4d": 3, "metatt-5d": 4}  # single-task adapters: modes - 1


def wrap_model(
    cfg: TrainConfig, model: nn.Module, task_name: str, label_names: list[str], text_columns: dict[str, list[str]] | None = None
) -> tuple[nn.Module, MetaTT | None]:
    """Attach the adapter (MetaTT, PEFT LoRA or VeRA); returns (model to train, MetaTT adapter or None).

    Causal LMs have no head (``label_names`` empty); their PEFT model is PEFT's kind for the base (adapters/model_kinds.py).
    ``text_columns`` (`recorded_text_columns`) go into a MetaTT adapter's config.
    """
    if cfg.method in PEFT_METHODS:
        return get_peft_model(cast(PreTrainedModel, model), peft_config(cfg, model)), None
    config = mt.build_config(
        model,
        method=cfg.method,
        rank=start_ranks(cfg, N_BONDS[cfg.method]),
        alpha=cfg.alpha,
        init=cfg.init,
        targets=cfg.targets,
        tasks=[task_name],
        label_names={task_name: label_names},
        base_model=cfg.model,
        extra={TEXT_COLUMNS: text_columns} if text_columns else None,
    )
    return model, mt.attach(model, config, seed=cfg.seed)


def peft_config(cfg: TrainConfig, model: nn.Module) -> PeftConfig:
    """The PEFT config of a baseline run on ``cfg.targets``, the head trained and saved with it.

    VeRA (peft >= 0.14) shares one pair of frozen random projections sized for the largest target
    and slices it for smaller ones, so non-square targets (up, down) work; the projections are
    seeded by ``cfg.seed`` and saved with the adapter (``save_projection``), so a load never
    depends on a PRNG.
    """
    _, _, modules = find_targets(model, cfg.targets)
    common: dict[str, Any] = dict(
        task_type=model_kind(model).peft_task_type,
        r=cfg.rank,
        target_modules=[m.name for m in modules],
        modules_to_save=head_modules(model),
        fan_in_fan_out=any(m.transposed for m in modules),
    )
    if cfg.method == "vera":
        return VeraConfig(**common, vera_dropout=0.0, projection_prng_key=cfg.seed, save_projection=True)
    return LoraConfig(**common, lora_alpha=int(cfg.lora_alpha or cfg.rank), lora_dropout=0.0)


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict[str, Any]]:
    """Adapter and head parameters; the head may get its own learning rate."""
    heads = tuple(f"{h}." for h in head_modules(mt.unwrap_peft(model)))
    adapter: list[nn.Parameter] = []
    head: list[nn.Parameter] = []
    for name, p in trainable_parameters(model).items():
        (head if mt.is_head_parameter(name, heads) else adapter).append(p)
    groups: list[dict[str, Any]] = [{"params": adapter, "lr": cfg.adapter_lr}]
    if head:
        groups.append({"params": head, "lr": cfg.resolved_head_lr})
    return groups


def save_trained(cfg: TrainConfig, model: nn.Module, tokenizer, directory: Path, task: TaskData | TextTask) -> None:
    if cfg.method in PEFT_METHODS:
        record = lora_record(
            method=cfg.method,
            task=task.name,
            label_names=task.label_names,
            base_model=cfg.model,
            base_fingerprint=mt.base_fingerprint(cast(PeftModel, model).get_base_model()),
            rank=cfg.rank,
            lora_alpha=cfg.lora_alpha or cfg.rank,
            targets=cfg.targets,
            text_columns=recorded_text_columns([task]).get(task.name),
        )
        with atomic_dir(directory, force=True) as tmp:
            cast(PeftModel, model).save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_lora_record(tmp, record)
    else:
        mt.save_adapter(model, directory, tokenizer=tokenizer, force=True)


def load_trained(directory: Path, cfg: TrainConfig) -> nn.Module:
    """The saved best adapter on a fresh base model, for testing after training."""
    if cfg.method not in PEFT_METHODS:
        return mt.load_adapter(directory, base_model=cfg.model, tokenizer=False)[0]
    return load_lora(directory, base_model=cfg.model, tokenizer=False)[0]


def single_task_recipe(
    cfg: TrainConfig,
    model: nn.Module,
    adapter: MetaTT | None,
    schedule: dict[int, list[int]],
    rows: list[dict[str, Any]],
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    evaluate_epoch: Callable[[nn.Module], tuple[dict[str, Any], float, str]],
    tokenizer: Any,
    task: TaskData | TextTask,
) -> Recipe:
    """The loop's recipe for one task (a classifier or a causal LM): what differs is the rows, the
    collator and the evaluation; saving, parameter groups and the schedule are shared."""
    return Recipe(
        model=model,
        rows=[rows],
        probs=[1.0],
        collate=lambda _, batch: collator(batch),
        evaluate=evaluate_epoch,
        save_best=lambda m, directory: save_trained(cfg, m, tokenizer, directory, task),
        param_groups=lambda m: param_groups(cfg, m),
        task_names=[task.name],
        adapter=adapter,
        description=f"train {cfg.method}",
        schedule=schedule,
    )


@exclusive_run
def train(cfg: TrainConfig, task: TaskData, force: bool = False) -> dict:
    """Run (or resume) a single-task training run into ``cfg.output``; returns the final metrics."""
    accelerator = make_accelerator()
    run, resuming = prepare_run(cfg, force, accelerator)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model, adapter = wrap_model(
        cfg, load_classifier(cfg.model, task.label_names), task.name, task.label_names, recorded_text_columns([task])
    )
    schedule = rank_schedule(cfg, adapter)

    splits = tokenize_task(task, tokenizer, cfg.max_length)
    if "train" not in splits or "validation" not in splits:
        raise MetaTTError("training needs a train and a validation split; pass --validation FILE")
    collator = DataCollatorWithPadding(tokenizer)
    columns = [c for c in MODEL_INPUTS if c in splits["train"].column_names]
    val_loader = accelerator.prepare(make_loader(splits["validation"], collator, cfg.eval_batch_size, by_length(splits["validation"])))
    num_labels = len(task.label_names)
    counts = mt.count_trainable(model)
    accelerator.print(f"{cfg.method}: {counts['adapter']:,} trainable adapter parameters (+{counts['head']:,} head)", flush=True)

    def evaluate_epoch(m: nn.Module) -> tuple[dict[str, Any], float, str]:
        metrics = evaluate(m, val_loader, accelerator, num_labels)
        trainable = mt.count_trainable(accelerator.unwrap_model(m))["adapter"]
        return {**metrics, "trainable": trainable}, metrics[PRIMARY_METRIC], ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    recipe = single_task_recipe(
        cfg, model, adapter, schedule, splits["train"].select_columns(columns).to_list(), collator, evaluate_epoch, tokenizer, task
    )
    state = run_loop(cfg, run, resuming, recipe, accelerator)
    result = finish(cfg, run, task, splits, collator, accelerator, state, mt.count_trainable(model))
    accelerator.end_training()
    return result


def finish(cfg, run: Path, task: TaskData, splits, collator, accelerator: Accelerator, state: dict, counts: dict) -> dict:
    """Test the best adapter, write metrics.json, the markdown report and the curve plot."""
    result = {
        "method": cfg.method,
        "task": task.name,
        "model": cfg.model,
        "trainable_parameters": counts,
        "history": state["history"],
        "best": state["best"],
        "step_time_median_s": statistics.median(state["step_times"]) if state["step_times"] else None,
        "steps": state["global_step"],
    }
    if "test" in splits and accelerator.is_main_process:
        best = load_trained(run / "best", cfg)
        if cfg.method not in PEFT_METHODS:
            result["best_ranks"] = tt_ranks(mt.get_adapter(best).cores)
        loader = make_loader(splits["test"], collator, cfg.eval_batch_size, by_length(splits["test"]))
        result["test"] = evaluate(best.to(accelerator.device), loader, None, len(task.label_names))
        accelerator.print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in result["test"].items()), flush=True)
    if accelerator.is_main_process:
        atomic_write_json(run / "metrics.json", result)
        write_training_report(run, result)
    return result
