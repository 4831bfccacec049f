"""A tiny saved multi-task (4+1)D adapter with random cores and heads, shared by the tests of every
stage that needs one (adapters, training, export, serving)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import save_tiny_bert

from metatt_deploy.adapters.base_model import load_classifier, load_tokenizer
from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.adapters.heads import routers
from metatt_deploy.adapters.multitask import build_multitask, save_multitask
from metatt_deploy.training.config import DEFAULT_BATCH_SIZE, MultiTaskConfig
from metatt_deploy.training.kinds import kind_for_adapter, kind_for_model
from metatt_deploy.training.multitask import load_task_spec, train_multitask
from metatt_deploy.tt import cores as tt

LABELS = {"movie": ["negative", "positive"], "nli": ["entailment", "neutral", "contradiction"], "four": ["a", "b", "c", "d"]}


def randomise(mtm, seed: int = 1) -> None:
    """Non-trivial cores (every core normal) and heads, so parity checks are real checks."""
    cfg = mtm.adapter_config
    mtm.metatt.set_cores(tt.init_cores("-".join(["no"] * len(cfg.mode_names)), cfg.core_shapes(), seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers(mtm.model):
            for p in r.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    mtm.eval()


def build_tiny_multitask(root: Path, seed: int = 0, labels: dict | None = None, core_seed: int = 1):
    """A tiny BERT base folder (embedded tokenizer) and a saved 3-task adapter with random cores and heads."""
    labels = labels or LABELS
    tokenizer = load_tokenizer(None)
    base = root / "base"
    if not base.exists():
        save_tiny_bert(base, seed, intermediate_size=64, max_position_embeddings=128)
    model = load_classifier(str(base), labels[next(iter(labels))])
    mtm = build_multitask(model, list(labels), labels, rank=4, base_model=str(base))
    randomise(mtm, core_seed)
    adapter = save_multitask(mtm, root / f"adapter-{core_seed}", tokenizer)
    return base, adapter, mtm, tokenizer


def assert_only_new_slice_moved(old, new, task_core: int, n_old: int = 3) -> None:
    """After --add-task: every shared core is bit-identical, the old task slices too, and the new
    slice has moved from its initial value (the mean of the old slices)."""
    for k, (a, b) in enumerate(zip(old.metatt.cores, new.metatt.cores)):
        if k == task_core:
            assert torch.equal(a, b[:, :n_old]) and not torch.equal(b[:, n_old], b[:, :n_old].mean(dim=1))
        else:
            assert torch.equal(a, b)


def train_specs(output: Path | str, specs: list[str], model: str | None = None, add_task_from: str | None = None, **knobs) -> dict:
    """A multi-task run (or --add-task) through the training API, as the train verb starts one: the kind
    from the model (or the extended adapter), the config, the tasks read as that kind reads them."""
    if add_task_from:
        adapter = MetaTTConfig.load(add_task_from)
        kind, model = kind_for_adapter(adapter), model or adapter.base_model
    else:
        kind = kind_for_model(model)
    eval_batch_size = kind.eval_batch_size(knobs.get("batch_size", DEFAULT_BATCH_SIZE))
    cfg = MultiTaskConfig(
        output=str(output), model=str(model), tasks=specs, add_task_from=add_task_from, eval_batch_size=eval_batch_size, **knobs
    )
    cfg.check()
    return train_multitask(cfg, [load_task_spec(s, kind, max_samples=cfg.sample_limits(), seed=cfg.seed) for s in specs])
