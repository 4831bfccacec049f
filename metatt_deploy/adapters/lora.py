"""PEFT LoRA adapter folders as this project writes them: recognise, describe, load.

A PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) holds the LoRA pairs and
the classification head, but not the task: its name and label names (the head's classes) are
needed to rebuild the base classifier before PEFT can load onto it. So every LoRA folder written
here (``train --method lora``'s best/, ``merge --to peft``) gets a small ``metatt_lora.json``
beside it (task, labels, base model, rank, alpha), which lets the LoRA baseline go through merge,
export and validate exactly like a MetaTT adapter.

A decoder's LoRA (PEFT ``task_type: CAUSAL_LM``) has no head and no labels: it loads onto the base
causal LM as it is (`lora_task_type` reads the kind from PEFT's own config, adapters/model_kinds.py).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from metatt_deploy.adapters.base_model import load_tokenizer
from metatt_deploy.adapters.model import base_fingerprint
from metatt_deploy.adapters.model_kinds import model_kind_named, peft_kind
from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.common.files import atomic_write_json, read_json

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_RECORD = "metatt_lora.json"


def is_lora_adapter(directory: str | Path) -> bool:
    """A folder holding a PEFT adapter config (whether or not this project wrote it)."""
    return (Path(directory) / PEFT_CONFIG_NAME).is_file()


def lora_record(
    *,
    method: str = "lora",
    task: str,
    label_names: list[str],
    base_model: str,
    base_fingerprint: str,
    rank: int,
    lora_alpha: float,
    targets: list[str],
    text_columns: list[str] | None = None,
) -> dict:
    """The ``metatt_lora.json`` of a PEFT baseline folder (LoRA or VeRA): what PEFT's config does
    not say, including the fingerprint of the base weights (``base_fingerprint``, MetaTT's format-2
    definition), so a load onto another base of the same shapes is refused instead of answering wrongly,
    and a classifier task's training ``text_columns`` (merge carries them to the export's manifest)."""
    extra = {"text_columns": list(text_columns)} if text_columns else {}
    return {
        **extra,
        "method": method,
        "task": task,
        "label_names": list(label_names),
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "rank": rank,
        "lora_alpha": lora_alpha,
        "targets": list(targets),
    }


def write_lora_record(directory: str | Path, record: dict) -> None:
    atomic_write_json(Path(directory) / LORA_RECORD, record)


def lora_task_type(directory: str | Path) -> str:
    """The kind's name of a LoRA folder: 'causal-lm' for a decoder's (PEFT task_type CAUSAL_LM), else 'classification'."""
    config = read_json(Path(directory) / PEFT_CONFIG_NAME, "PEFT adapter config")
    return peft_kind(config.get("task_type") if isinstance(config, dict) else None).name


def read_lora_record(directory: str | Path) -> dict:
    """The record of a LoRA folder (with its ``task_type``); a PEFT folder without one is a clear error."""
    path = Path(directory) / LORA_RECORD
    if not path.is_file():
        raise MetaTTError(
            f"{directory} is a PEFT adapter without {LORA_RECORD} (task and label names), so its classifier head "
            "cannot be rebuilt; use a folder written by metatt-deploy train --method lora or merge --to peft"
        )
    record = read_json(path, "LoRA record")
    task_type = lora_task_type(directory)
    if not isinstance(record, dict) or not record.get("task") or (model_kind_named(task_type).has_head and not record.get("label_names")):
        raise MetaTTError(f"{path} lacks 'task' or 'label_names'; re-create the adapter")
    return {**record, "task_type": task_type}


def load_lora(directory: str | Path, base_model: str | None = None, tokenizer: bool = True):
    """The unmerged LoRA model (peft.PeftModel, eval mode), its record and its tokenizer (or None).

    The base is a classifier with a head for the record's labels, or, for a decoder's LoRA, the causal LM.
    """
    from peft import PeftModel

    record = read_lora_record(directory)
    base = base_model or record["base_model"]
    model = model_kind_named(record["task_type"]).load_base(base, list(record.get("label_names") or []))
    expected = record.get("base_fingerprint")  # absent in folders written before it was recorded
    if expected and (actual := base_fingerprint(model)) != expected:
        raise MetaTTError(
            f"the LoRA adapter {directory} was trained on base model '{record['base_model']}' (fingerprint {expected[:12]}), "
            f"but this base has fingerprint {actual[:12]}; pass the adapter's own base model"
        )
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory)).eval()
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names of another base model
        raise MetaTTError(
            f"the LoRA adapter {directory} does not fit base model '{base}' ({first_line(e)}); pass the base it was trained on"
        ) from None
    tok = None
    if tokenizer:
        tok = load_tokenizer(str(directory) if (Path(directory) / "tokenizer_config.json").is_file() else base)
    return peft_model, record, tok


def merge_lora(peft_model) -> PreTrainedModel:
    """Fold the LoRA pairs into the base weights (PEFT's merge_and_unload); the head stays trained."""
    model = peft_model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
