"""The unmerged PyTorch reference an export is validated against, and the check that the export was made from it.

An export is checked against the adapter exactly as trained (base + adapter, not merged), so one
check covers merging and exporting together: `load_reference` for classifiers (single-task
MetaTT, one task of a multi-task MetaTT through its `TaskView`, or PEFT LoRA),
`load_decoder_reference` for causal LMs. `check_provenance` refuses, before any work, an export
whose manifest does not record this adapter's weights sha256: parity alone cannot tell an export
without the adapter's update from one with it. `adapter_disabled` gives the base model for the
"closer to the base than to the adapter" check. Decoder runs themselves are in decoder_runs.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from metatt_deploy.adapters.config import WEIGHTS_NAME, MetaTTConfig
from metatt_deploy.adapters.layer import MetaTT
from metatt_deploy.adapters.lora import PEFT_WEIGHTS_NAME, is_lora_adapter, load_lora, merge_lora
from metatt_deploy.adapters.model import load_adapter, merge_and_unload
from metatt_deploy.adapters.multitask import TaskView, load_multitask
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import sha256_file


class Reference:
    """The unmerged PyTorch model an export is checked against, with its task and labels."""

    def __init__(self, model, tokenizer, task: str, labels: list[str], method: str, description: str, model_type: str | None):
        self.model, self.tokenizer, self.task, self.labels = model, tokenizer, task, labels
        self.method, self.description, self.model_type = method, description, model_type


def load_reference(adapter_dir: str | Path, task: str | None, base_model: str | None = None) -> Reference:
    """The adapter as trained: single-task MetaTT, one task of a multi-task MetaTT, or PEFT LoRA."""
    if is_lora_adapter(adapter_dir):
        model, record, tokenizer = load_lora(adapter_dir, base_model=base_model)
        if task and task != record["task"]:
            raise MetaTTError(f"unknown task '{task}'; this LoRA adapter has task: {record['task']}")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return Reference(
            model, tokenizer, record["task"], list(record["label_names"]), "lora", "base model + unmerged PEFT LoRA adapter", model_type
        )
    config = MetaTTConfig.load(adapter_dir)
    if config.multitask:
        name = config.tasks[config.task_index(task)]  # no task: "serves several tasks; pass --task NAME"
        mtm, config, tokenizer = load_multitask(adapter_dir, base_model=base_model)
        view = TaskView(mtm, name).eval()
        return Reference(
            view,
            tokenizer,
            name,
            list(config.label_names[name]),
            config.method,
            f"base model + unmerged MetaTT adapter, task '{name}'",
            config.model_type,
        )
    if task and task not in config.tasks:
        raise MetaTTError(f"unknown task '{task}'; this adapter has tasks: {', '.join(config.tasks)}")
    model, config, tokenizer = load_adapter(adapter_dir, base_model=base_model)
    name = config.tasks[0]
    return Reference(
        model, tokenizer, name, list(config.label_names[name]), config.method, "base model + unmerged MetaTT adapter", config.model_type
    )


def _weights_file(adapter_dir: str | Path) -> Path | None:
    """The adapter's weights: MetaTT's safetensors, or a PEFT LoRA folder's."""
    return next((Path(adapter_dir) / n for n in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME) if (Path(adapter_dir) / n).is_file()), None)


def check_provenance(manifest: dict, adapter_dir: str | Path, onnx_dir: Path, task: str | None) -> None:
    """The export must say it was made from this adapter (weights sha256), of its architecture and task.

    Parity alone cannot tell: an export without the adapter's update differs from the adapter by
    the update's effect only, which can be below any absolute tolerance.
    """
    recorded = manifest.get("adapter") if isinstance(manifest, dict) else None
    sha = recorded.get("weights_sha256") if isinstance(recorded, dict) else None
    if not isinstance(sha, str):
        raise MetaTTError(
            f"export {onnx_dir} does not record which adapter it was made from (manifest.json: adapter.weights_sha256); "
            "export it with metatt-deploy export from the adapter or its merge"
        )
    weights = _weights_file(adapter_dir)
    actual = sha256_file(weights) if weights is not None else None
    if sha != actual:
        raise MetaTTError(
            f"export {onnx_dir} was made from another adapter (weights sha256 {sha[:12]}, {adapter_dir} has {str(actual)[:12]}); "
            "validate it against its own adapter, or re-export this one"
        )
    if task and manifest.get("task") and task != manifest.get("task"):
        raise MetaTTError(f"export {onnx_dir} holds task '{manifest.get('task')}', not '{task}'; validate the export of that task")


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model + head: the adapter's update off for the duration (MetaTT: scaled to zero)."""
    if hasattr(model, "disable_adapter"):  # PEFT LoRA
        with model.disable_adapter():
            yield
        return
    adapter = next(m for m in model.modules() if isinstance(m, MetaTT))
    alpha = adapter.alpha
    adapter.alpha = 0.0
    try:
        yield
    finally:
        adapter.alpha = alpha


def load_decoder_reference(adapter_dir: str | Path, base_model: str | None) -> tuple[Any, Any, str, Callable[[Any], Any]]:
    """(unmerged decoder + adapter, tokenizer, method, the function that merges it): a MetaTT adapter or a PEFT LoRA."""
    merge: Callable[[Any], Any]
    if is_lora_adapter(adapter_dir):  # its kind was matched with the bundle's by the export kind (export/kinds.py)
        model, _, tokenizer = load_lora(adapter_dir, base_model=base_model)
        method, merge = "lora", merge_lora
    else:
        model, config, tokenizer = load_adapter(adapter_dir, base_model=base_model)
        method, merge = config.method, merge_and_unload
    return model, tokenizer, method, merge


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``threads`` for the duration (None: unchanged), restored after."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)
