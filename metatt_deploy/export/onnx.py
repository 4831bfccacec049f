"""Export a model, merged model or adapter to an ONNX bundle with a manifest: the kind-independent frame.

An export bundle is a folder that optimum's ``ORTModelForSequenceClassification`` (classifiers) or
``ORTModelForCausalLM`` (decoders) loads as it is: ``model.onnx`` (plus ``model.onnx_data`` for
models over 2 GB), the model's ``config.json``, the tokenizer files, and ``manifest.json``, which
records what was exported (source folder, adapter and base model), how (opset, variant, library
versions), every file's sha256, and the parity of the ONNX graph against the PyTorch merged model.
The variants and manifest fields are documented in docs/export.md.

This module owns what every kind shares: the paths and their checks, merging an adapter on the
fly, the provenance (the adapter's weights sha256 against the merge record), the lock and the
temporary folder renamed into place at the end (nothing half-written), and the manifest. The
pipeline itself is the model's kind's (export/kinds.py): onnx_classifier.py or onnx_lm.py.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from metatt_deploy.adapters.base_model import friendly_load
from metatt_deploy.adapters.config import WEIGHTS_NAME, MetaTTConfig
from metatt_deploy.adapters.lora import PEFT_WEIGHTS_NAME, is_lora_adapter, read_lora_record
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import (
    TMP_TAG,
    atomic_dir,
    atomic_write_json,
    check_separate,
    check_writable,
    output_lock,
    read_json,
    sha256_file,
)
from metatt_deploy.common.threads import resolve_threads
from metatt_deploy.export.kinds import ExportKind, source_kind
from metatt_deploy.export.merge import MERGE_RECORD, merge_adapter
from metatt_deploy.export.onnx_files import library_versions
from metatt_deploy.export.options import ExportOptions
from metatt_deploy.export.quantize import default_reduce_range
from metatt_deploy.inference.formats import MANIFEST_NAME, MANIFEST_VERSION, plain_name

ADAPTER_CONFIG = "metatt_config.json"
DEFAULT_ROOT = Path("exported")


# ---------------------------------------------------------------- export


def export_onnx(
    model_dir: str | Path,
    output: str | Path | None = None,
    options: ExportOptions | None = None,
    *,
    name: str | None = None,
    force: bool = False,
    adapter_dir: str | Path | None = None,
    task: str | None = None,
    **changes: Any,
) -> Path:
    """Export ``model_dir`` to an ONNX bundle; returns the bundle folder.

    ``model_dir`` is a merged model folder (``metatt-deploy merge``), any Hugging Face sequence
    classifier or causal LM folder, or an adapter folder (MetaTT, or a LoRA run's best/), which is
    then merged on the fly (``task`` picks the task of a multi-task adapter). ``output`` defaults to
    ``exported/<name>`` with ``name`` the folder's name plus the variant (``-opt``, ``-int8``, ``-fp16``).
    ``adapter_dir`` names the adapter for the manifest when the merged folder does not record it.

    ``options`` (export/options.py) holds every other choice: variant, int8 calibration
    (``Calibration``: int8-static's data, rows, method, fp32 down-projections; docs/int8.md),
    ``layout="transformers.js"`` (``onnx/model.onnx`` and ``onnx/model_quantized.onnx``),
    ``formats`` with ``"ort"`` (``.ort`` copies and a reduced build's operator config), the parity
    sessions' ``threads``, ``int4`` settings (export/int4.py) and the quality ``gate`` of quantized
    exports (export/quality.py; a failed gate raises before anything is written at ``output``).
    ``changes`` are ExportOptions fields set on top of ``options``, for callers that set a few
    (``export_onnx(folder, quantize="int8")``). Every export writes ``web/`` (export/web.py).
    """
    options = dataclasses.replace(options or ExportOptions(), **changes)
    options.check()
    model_dir = Path(model_dir)
    _check_sources(model_dir, adapter_dir)
    if name is not None and not plain_name(name):
        raise MetaTTError(f"--name '{name}' must be a folder name under {DEFAULT_ROOT}/ (no '/' or '..'); use --output for another place")
    if output is None:
        output = DEFAULT_ROOT / f"{name or model_dir.resolve().name}{options.variant}"
    output = check_writable(output, force, marker=MANIFEST_NAME)
    check_separate(output, [model_dir, adapter_dir])
    kind = source_kind(model_dir)
    kind.check_export(options, model_dir)
    if task is not None and not is_adapter_dir(model_dir):  # a merged model is one task already: --task would be ignored
        raise MetaTTError(f"--task picks a task of an adapter; {model_dir} is a merged model of one task: drop --task")
    resolve_threads(options.threads)
    calibration = options.calibration.loaded() if options.quantize == "int8-static" else options.calibration
    reduce_range = default_reduce_range() if options.reduce_range is None else options.reduce_range
    options = dataclasses.replace(options, calibration=calibration, reduce_range=reduce_range)

    started = time.time()
    output.parent.mkdir(parents=True, exist_ok=True)
    # one export per output at a time (as one training run per run folder); the temporaries sit beside the
    # output, named like atomic_dir's, so a killed run's leftover is cleaned
    with (
        output_lock(output, what="export folder"),
        tempfile.TemporaryDirectory(prefix=f".{output.name}{TMP_TAG}{os.getpid()}-merge-", dir=output.parent) as merge_tmp,
    ):
        origin = "merged" if (model_dir / MERGE_RECORD).is_file() else "model"
        source = model_dir
        if is_adapter_dir(model_dir):
            adapter_dir = adapter_dir or model_dir
            source = Path(merge_tmp) / "merged"
            merge_adapter(model_dir, source, task=task)
            origin = "adapter (merged on the fly)"
        provenance = _provenance(source, adapter_dir)
        # the gate calibrates on --calibration, else on the run's task's validation split
        gate = dataclasses.replace(options.gate, data=calibration.data, task=provenance["task"])
        with atomic_dir(output, force=force, marker=MANIFEST_NAME) as tmp:
            fields = _export_into(kind, tmp, source, dataclasses.replace(options, gate=gate))
            manifest = {
                "format_version": MANIFEST_VERSION,
                "name": output.name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "export_seconds": round(time.time() - started, 1),
                "source": {"model_dir": str(model_dir.resolve()), "kind": origin},
                **provenance,
                **fields,
                "versions": library_versions(),
                "files": {
                    p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                    for p in sorted(tmp.rglob("*"))
                    if p.is_file()
                },
            }
            atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return output


def _check_sources(model_dir: Path, adapter_dir: str | Path | None) -> None:
    """One-line errors for a model folder that holds no model and an ``adapter_dir`` that is no adapter."""
    if not model_dir.is_dir():
        raise MetaTTError(f"model directory not found: {model_dir}; pass a merged model folder (metatt-deploy merge) or an adapter folder")
    if not is_adapter_dir(model_dir) and not (model_dir / "config.json").is_file():
        raise MetaTTError(
            f"{model_dir} holds neither a model (config.json) nor an adapter ({ADAPTER_CONFIG} or a PEFT "
            "adapter_config.json); pass a merged model folder"
        )
    if adapter_dir is not None and not is_adapter_dir(adapter_dir):
        raise MetaTTError(
            f"{adapter_dir} is not an adapter (no {ADAPTER_CONFIG}, no PEFT adapter_config.json); pass the adapter directory or omit --adapter"
        )


def is_adapter_dir(directory: str | Path) -> bool:
    """A MetaTT adapter folder or a PEFT LoRA folder (both merge on the fly)."""
    return (Path(directory) / ADAPTER_CONFIG).is_file() or is_lora_adapter(directory)


def _provenance(source: Path, adapter_dir: str | Path | None) -> dict:
    """Adapter and base model of the export, from the merge record and/or the adapter config."""
    record = read_json(source / MERGE_RECORD, "merge record") if (source / MERGE_RECORD).is_file() else {}
    if not isinstance(record, dict) or not isinstance(record.get("adapter", ""), str):
        raise MetaTTError(f"{source / MERGE_RECORD} is not a merge record; re-merge the adapter")
    recorded = record.get("adapter")
    if adapter_dir is None and recorded and is_adapter_dir(recorded):
        adapter_dir = recorded
    elif adapter_dir is not None and recorded and Path(recorded).resolve() != Path(adapter_dir).resolve():
        raise MetaTTError(f"the merged model records adapter {recorded}, not {adapter_dir}; pass the matching --adapter or omit it")
    adapter = None
    if adapter_dir is not None and is_lora_adapter(adapter_dir):
        lora = read_lora_record(adapter_dir)
        weights = Path(adapter_dir) / PEFT_WEIGHTS_NAME
        adapter = {
            "path": str(Path(adapter_dir).resolve()),
            "method": "lora",
            "ranks": [lora["rank"]],
            "alpha": lora["lora_alpha"],
            "targets": lora["targets"],
            "tasks": [lora["task"]],
            "weights_sha256": sha256_file(weights) if weights.is_file() else None,
        }
        record = {"base_model": lora["base_model"], "base_fingerprint": None, "method": "lora", "task": lora["task"], **record}
    elif adapter_dir is not None:
        config = MetaTTConfig.load(adapter_dir)
        weights = Path(adapter_dir) / WEIGHTS_NAME
        adapter = {
            "path": str(Path(adapter_dir).resolve()),
            "method": config.method,
            "mode_names": config.mode_names,
            "mode_sizes": config.mode_sizes,
            "ranks": config.ranks,
            "alpha": config.alpha,
            "targets": config.targets,
            "tasks": config.tasks,
            "weights_sha256": sha256_file(weights) if weights.is_file() else None,
        }
        merged_from = record.get("adapter_weights_sha256")
        if merged_from and merged_from != adapter["weights_sha256"]:
            raise MetaTTError(
                f"the merged model was made from other weights than {adapter_dir} holds now (retrained since?); merge the adapter again"
            )
        record = {"base_model": config.base_model, "base_fingerprint": config.base_fingerprint, "method": config.method, **record}
    elif recorded:
        adapter = {
            "path": recorded,
            "method": record.get("method"),
            "ranks": record.get("ranks"),
            "weights_sha256": record.get("adapter_weights_sha256"),
            "note": "adapter folder not found; fields from the merge record",
        }
    return {
        "adapter": adapter,
        "merge": record or None,
        "base_model": record.get("base_model"),
        "base_fingerprint": record.get("base_fingerprint"),
        "task": record.get("task"),
        "text_columns": record.get("text_columns"),
    }


def _export_into(kind: ExportKind, tmp: Path, source: Path, options: ExportOptions) -> dict:
    """Run the kind's pipeline (onnx_classifier.py or onnx_lm.py) into ``tmp``; returns the manifest's export-specific fields."""
    from transformers import AutoConfig

    hf_config = friendly_load(lambda: AutoConfig.from_pretrained(source), str(source), "model config")
    return kind.export_into(tmp, source, hf_config, options)
