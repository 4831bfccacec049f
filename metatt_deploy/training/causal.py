"""Causal-LM runs: a MetaTT adapter or the PEFT LoRA baseline on a decoder, through the one loop.

What differs from a classifier run is this module's recipe for training/loop.py: text-to-text
data (training/lm_data.py: chat template, response-only labels), the causal collator, and
evaluation by greedy generation (exact match, the score that picks the best epoch, ties broken by
the lower perplexity of the reference responses; training/lm_eval.py). Wrapping, parameter
groups, counting and saving are the single-task run's (training/single.py): a decoder simply
has no head, so every trainable parameter is the adapter's.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from metatt_deploy.adapters import model as mt
from metatt_deploy.adapters.base_model import load_causal_lm, load_tokenizer
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_json
from metatt_deploy.common.report import write_training_report
from metatt_deploy.inference.formats import context_length
from metatt_deploy.training.config import PEFT_METHODS, TrainConfig
from metatt_deploy.training.guards import exclusive_run
from metatt_deploy.training.lm_data import CausalCollator, TextTask, tokenize_text_task
from metatt_deploy.training.lm_eval import evaluate_generation
from metatt_deploy.training.loop import make_accelerator, prepare_run, rank_schedule, run_loop
from metatt_deploy.training.single import load_trained, single_task_recipe, wrap_model
from metatt_deploy.tt.cores import tt_ranks

# perplexity breaks exact-match ties: score = exact match - TIE_BREAK * perplexity
TIE_BREAK = 1e-6


@exclusive_run
def train_causal(cfg: TrainConfig, task: TextTask, force: bool = False) -> dict:
    """Run (or resume) a causal-LM training run into ``cfg.output``; returns the final metrics.

    The data are tokenized and checked before the run folder is made, so bad data leave nothing behind.
    """
    if cfg.method == "vera":  # not measured on decoders; the LoRA baseline is
        raise MetaTTError("--method vera is a baseline for classifiers; for a decoder use lora, metatt-4d or metatt-5d")
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    base = load_causal_lm(cfg.model)
    context = context_length(base.config.to_dict())  # type: ignore[union-attr,operator]
    splits = tokenize_text_task(task, tokenizer, cfg.max_length, context)
    if "train" not in splits or "validation" not in splits:
        raise MetaTTError("training needs a train and a validation split; pass --validation FILE")
    accelerator = make_accelerator()
    run, resuming = prepare_run(cfg, force, accelerator)
    model, adapter = wrap_model(cfg, base, task.name, [])
    schedule = rank_schedule(cfg, adapter)
    collator = CausalCollator(tokenizer.pad_token_id)
    counts = mt.count_trainable(model)
    accelerator.print(f"{cfg.method}: {counts['adapter']:,} trainable adapter parameters")

    def evaluate_epoch(m: nn.Module) -> tuple[dict[str, Any], float, str]:
        metrics = evaluate_generation(accelerator.unwrap_model(m), tokenizer, splits["validation"], cfg.eval_batch_size)
        m.train()
        fields = {"exact_match": metrics["exact_match"], "perplexity": metrics["perplexity"], "trainable": mt.count_trainable(m)["adapter"]}
        score = metrics["exact_match"] - TIE_BREAK * metrics["perplexity"]
        return fields, score, f"exact match {metrics['exact_match']:.4f}, perplexity {metrics['perplexity']:.4f}"

    rows = splits["train"].select_columns(["input_ids", "labels"]).to_list()
    recipe = single_task_recipe(cfg, model, adapter, schedule, rows, collator, evaluate_epoch, tokenizer, task)
    state = run_loop(cfg, run, resuming, recipe, accelerator)
    result = {
        "method": cfg.method,
        "task": task.name,
        "task_type": "causal-lm",
        "model": cfg.model,
        "trainable_parameters": mt.count_trainable(model),
        "history": state["history"],
        "best": state["best"],
        "step_time_median_s": statistics.median(state["step_times"]) if state["step_times"] else None,
        "steps": state["global_step"],
        "train_examples": len(splits["train"]),
    }
    if "test" in splits and accelerator.is_main_process:
        best = load_trained(run / "best", cfg)
        if cfg.method not in PEFT_METHODS:
            result["best_ranks"] = tt_ranks(list(mt.get_adapter(best).cores))
        test = evaluate_generation(best, tokenizer, splits["test"], cfg.eval_batch_size)
        result["test"] = {"exact_match": test["exact_match"], "perplexity": test["perplexity"], "examples": test["examples"]}
        accelerator.print(f"test: exact match {test['exact_match']:.4f}, perplexity {test['perplexity']:.4f}")
    if accelerator.is_main_process:
        atomic_write_json(run / "metrics.json", result)
        write_training_report(run, result)
    accelerator.end_training()
    return result
