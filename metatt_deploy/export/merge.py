"""Merging: fold a MetaTT adapter (or a PEFT LoRA baseline) into its base weights: a plain Hugging Face model.

The merged folder loads with ``AutoModelForSequenceClassification`` and no metatt code; a
``metatt_merge.json`` beside the weights records where it came from (for export manifests).
A LoRA run's best/ (PEFT folder + ``metatt_lora.json``) merges through PEFT's
``merge_and_unload``, so the baseline goes through merge, export and validate like MetaTT.
"""

from __future__ import annotations

from pathlib import Path

from metatt_deploy.adapters.config import WEIGHTS_NAME, MetaTTConfig
from metatt_deploy.adapters.lora import PEFT_WEIGHTS_NAME, is_lora_adapter, load_lora, merge_lora
from metatt_deploy.adapters.model import get_adapter, load_adapter, merge_and_unload
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_dir, atomic_write_json, check_separate, check_writable, sha256_file
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.tt.rounding import round_tt

MERGE_RECORD = "metatt_merge.json"  # beside the merged weights: the adapter they came from (export puts it in the manifest)


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
    the relative Frobenius error this introduced. ``adapter_dir`` may also be a PEFT LoRA
    folder written by this project (`merge_lora_adapter`).
    """
    check_writable(output, force, marker=MERGE_RECORD)
    if is_lora_adapter(adapter_dir):
        check_separate(output, [adapter_dir, base_model])
        if max_rank is not None:
            raise MetaTTError("--max-rank rounds a MetaTT tensor train; a LoRA adapter has none, drop --max-rank")
        return merge_lora_adapter(adapter_dir, output, task=task, base_model=base_model, force=force)
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
    columns = config.text_columns(config.tasks[task_index])
    if columns:  # the export's manifest carries it to predict/serve (inference/tasks.text_inputs)
        record["text_columns"] = columns
    if max_rank is not None:
        adapter = get_adapter(model)
        cores, rel_error = round_tt([c.detach() for c in adapter.cores], max_rank)
        adapter.set_cores(cores)
        # "ranks" stays the trained adapter's; the merged update has the rounded bond ranks
        record.update(rounded_to=max_rank, rounded_ranks=[int(c.shape[-1]) for c in cores[:-1]], rounding_relative_error=float(rel_error))
    merge_and_unload(model, config.tasks[task_index] if config.multitask else None)
    return write_merged(model, tokenizer, record, output, force)


def merge_lora_adapter(
    adapter_dir: str | Path, output: str | Path, *, task: str | None = None, base_model: str | None = None, force: bool = False
) -> dict:
    """The dense model of a LoRA adapter folder (PEFT merge_and_unload), with the same merge record."""
    peft_model, lora, tokenizer = load_lora(adapter_dir, base_model=base_model)
    if task is not None and task != lora["task"]:
        raise MetaTTError(f"unknown task '{task}'; this LoRA adapter has task: {lora['task']}")
    record = {
        "adapter": str(Path(adapter_dir).resolve()),
        "adapter_weights_sha256": sha256_file(Path(adapter_dir) / PEFT_WEIGHTS_NAME),
        "base_model": base_model or lora["base_model"],
        "base_fingerprint": None,
        "method": "lora",
        "task": lora["task"],
        "ranks": [lora["rank"]],
        "alpha": lora["lora_alpha"],
        "merged_with": "peft merge_and_unload",
    }
    if lora.get("text_columns"):
        record["text_columns"] = lora["text_columns"]
    return write_merged(merge_lora(peft_model), tokenizer, record, output, force)


def write_merged(model, tokenizer, record: dict, output: str | Path, force: bool) -> dict:
    """A merged model folder: weights, tokenizer and the merge record, written atomically; returns the record."""
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
    if is_lora_adapter(adapter_dir):
        raise MetaTTError(f"{adapter_dir} is a LoRA adapter; --factored needs a multi-task MetaTT adapter (merge it without --factored)")
    return write_bundle(adapter_dir, output, tasks=tasks, onnx=onnx, base_model=base_model, force=force)
