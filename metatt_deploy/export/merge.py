"""Merging: fold a MetaTT adapter into its base weights and write a plain Hugging Face model.

The merged folder loads with ``AutoModelForSequenceClassification`` and no metatt code; a
``metatt_merge.json`` beside the weights records where it came from (for export manifests).
"""

from __future__ import annotations

from pathlib import Path

from metatt_deploy.adapters.config import WEIGHTS_NAME, MetaTTConfig
from metatt_deploy.adapters.model import get_adapter, load_adapter, merge_and_unload
from metatt_deploy.common.files import atomic_dir, atomic_write_json, check_separate, check_writable, sha256_file
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.tt.rounding import round_tt

MERGE_RECORD = "metatt_merge.json"


def merge_adapter(
    adapter_dir: str | Path,
    output: str | Path,
    *,
    task: str | None = None,
    base_model: str | None = None,
    max_rank: int | None = None,
    force: bool = False,
) -> dict:
    """Write the dense model of ``task`` into ``output``; returns the merge record.

    ``max_rank`` first rounds the tensor train to that bond rank (TT-SVD sweep) and records
    the relative Frobenius error this introduced.
    """
    check_writable(output, force, marker=MERGE_RECORD)
    check_separate(output, [adapter_dir, base_model or MetaTTConfig.load(adapter_dir).base_model])
    model, config, tokenizer = load_adapter(adapter_dir, base_model=base_model)
    task_index = config.task_index(task)
    record = {
        "adapter": str(Path(adapter_dir).resolve()),
        "adapter_weights_sha256": sha256_file(Path(adapter_dir) / WEIGHTS_NAME),
        "base_model": config.base_model,
        "base_fingerprint": config.base_fingerprint,
        "method": config.method,
        "task": config.tasks[task_index],
        "ranks": list(config.ranks),
        "alpha": config.alpha,
    }
    if max_rank is not None:
        adapter = get_adapter(model)
        cores, rel_error = round_tt([c.detach() for c in adapter.cores], max_rank)
        adapter.set_cores(cores)
        # "ranks" stays the trained adapter's; the merged update has the rounded bond ranks
        record.update(rounded_to=max_rank, rounded_ranks=[int(c.shape[-1]) for c in cores[:-1]], rounding_relative_error=float(rel_error))
    merge_and_unload(model, config.tasks[task_index] if config.multitask else None)
    with atomic_dir(output, force=force, marker=MERGE_RECORD) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MERGE_RECORD, record)
    return record


def merge_factored(
    adapter_dir: str | Path,
    output: str | Path,
    *,
    tasks: list[str] | None = None,
    onnx: bool = True,
    base_model: str | None = None,
    force: bool = False,
) -> dict:
    """The factored bundle of a multi-task adapter: base model once, shared cores once, one small file per task.

    With ``tasks`` and an existing bundle of the same shared cores as ``output``, only those tasks are
    added to it. Layout and checks: factored.py and docs/multitask.md.
    """
    return write_bundle(adapter_dir, output, tasks=tasks, onnx=onnx, base_model=base_model, force=force)
