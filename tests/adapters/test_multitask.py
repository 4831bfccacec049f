"""Multi-task MetaTT-(4+1)D: task specs, sampling, per-row routing, merging per task, joint training,
checkpoint/resume, and adding a task against a frozen adapter. Tiny random models only.

`build_tiny_multitask` (tests/multitask_fixtures.py) builds the tiny adapter other stages' tests share.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from multitask_fixtures import LABELS, build_tiny_multitask, randomise
from tiny_models import inputs, tiny_model
from transformers import AutoModelForSequenceClassification

from metatt_deploy.adapters import model as mt
from metatt_deploy.adapters.heads import PAD_LOGIT, routers
from metatt_deploy.adapters.multitask import build_multitask, load_multitask, parameter_counts
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.merge import merge_adapter

# ---------------------------------------------------------------- routing, heads, merging


@pytest.mark.parametrize("arch", ["bert", "distilbert", "llama"])
def test_logits_layout_mixed_rows_and_merge_per_task(arch: str) -> None:
    mtm = build_multitask(tiny_model(arch), list(LABELS), LABELS, rank=4)
    cfg = mtm.adapter_config
    assert cfg.mode_names == ["in", "layer", "matrix", "task", "out"] and cfg.mode_size("task") == 3
    randomise(mtm)
    batch = inputs(batch=5)
    ids = torch.tensor([2, 0, 1, 2, 1])
    with torch.no_grad():
        mixed = mtm(**batch, task_ids=ids).logits
        alone = torch.cat([mtm(**{k: v[i : i + 1] for k, v in batch.items()}, task_ids=int(t)).logits for i, t in enumerate(ids)])
    assert mixed.shape == (5, 4)
    assert (mixed - alone).abs().max() <= 1e-5  # a row of a mixed batch gets what it gets alone (to fp32 rounding)
    for row, t in zip(mixed, ids.tolist()):
        n = len(LABELS[cfg.tasks[t]])
        assert torch.all(row[n:] == PAD_LOGIT) and torch.all(row[:n] > PAD_LOGIT / 2)
    # names and per-row lists work like ids
    with torch.no_grad():
        assert torch.equal(mtm(**batch, task_ids=["four", "movie", "nli", "four", "nli"]).logits, mixed)
    for t, task in enumerate(cfg.tasks):
        merged = mt.merge_and_unload(copy.deepcopy(mtm.model), task)
        assert merged.config.num_labels == len(LABELS[task]) and merged.config.id2label[0] == LABELS[task][0]
        with torch.no_grad():
            dense = merged(**batch).logits
            ref = mtm(**batch, task_ids=t).logits[:, : len(LABELS[task])]
        assert (dense - ref).abs().max() <= 1e-5


def test_unknown_tasks_are_errors_and_grads_stay_in_the_rows_task() -> None:
    mtm = build_multitask(tiny_model("bert"), list(LABELS), LABELS, rank=4)
    randomise(mtm)
    batch = inputs(batch=2)
    for bad, match in (
        (5, "unknown task id 5"),
        (-1, "unknown task id -1"),
        ("nope", "unknown task 'nope'"),
        (torch.tensor([0, 3]), "unknown task id 3"),
        (torch.tensor([0]), "one task id per row"),
    ):
        with pytest.raises(MetaTTError, match=match):
            mtm(**batch, task_ids=bad)
    with pytest.raises(MetaTTError, match="pass task_ids"):
        mtm(**batch)
    mtm.train()
    out = mtm(**batch, task_ids=torch.tensor([1, 1]), labels=torch.tensor([2, 0]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    task_core = mtm.metatt.cores[3].grad
    assert task_core[:, 1].abs().sum() > 0 and task_core[:, [0, 2]].abs().sum() == 0
    heads = routers(mtm.model)[0].heads
    assert heads[1].weight.grad.abs().sum() > 0
    assert all(h.weight.grad is None or h.weight.grad.abs().sum() == 0 for h in (heads[0], heads[2]))


def test_parameter_counts_follow_the_paper() -> None:
    mtm = build_multitask(tiny_model("bert"), list(LABELS), LABELS, rank=4)
    counts = parameter_counts(mtm)
    d, L, M, T, r = 32, 2, 4, 3, 4  # (D_in + D_out) r + (L + M) r^2, plus T r^2 for the task core
    assert counts["shared_cores"] == 2 * d * r + (L + M) * r * r
    assert counts["adapter_total"] == counts["shared_cores"] + T * r * r
    assert counts["per_task"]["nli"] == {"task_slice": r * r, "head": 3 * d + 3, "total": r * r + 3 * d + 3}


def test_saved_adapter_merges_per_task_into_a_plain_hf_model(tmp_path: Path) -> None:
    base, adapter, mtm, tokenizer = build_tiny_multitask(tmp_path)
    loaded, config, _ = load_multitask(adapter)
    enc = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**enc, task_ids=[2, 1]).logits, mtm(**enc, task_ids=[2, 1]).logits)
    with pytest.raises(MetaTTError, match="several tasks"):
        merge_adapter(adapter, tmp_path / "m")
    merge_adapter(adapter, tmp_path / "nli", task="nli")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "nli").eval()  # no metatt code involved
    assert plain.config.id2label == dict(enumerate(LABELS["nli"]))
    with torch.no_grad():
        assert (plain(**enc).logits - mtm(**enc, task_ids="nli").logits[:, :3]).abs().max() <= 1e-5
