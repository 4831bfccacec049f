"""The files an export is made of, defined once: names, fields, and the checks every reader runs.

export/ writes these files through the constants below and serving/ reads them through the
functions below, so the format lives in one place and a deployment reads it without torch.

Two layouts (docs/export.md, docs/multitask.md):

- a single-task export (``metatt-deploy export``): ``model.onnx``, ``manifest.json`` (what was
  exported, how, every file's sha256, parity), ``config.json`` and the tokenizer files;
- a factored bundle (``merge --factored``): ``bundle.json``, ``base/`` (config + tokenizer),
  ``shared.safetensors``, ``tasks/NAME.json`` + ``.safetensors`` + ``.onnx_adapter`` per task,
  and two graphs, ``model_tasks.onnx`` (a task id per row) and ``model_adapter.onnx`` (a task's
  ``.onnx_adapter`` active through RunOptions).

Every field a reader relies on is type-checked on read: a damaged or hand-edited file is one
line naming it, never a KeyError deep in serving. Task files carry the bundle id and their
sha256, so a task copied in from another bundle is refused instead of answering wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import read_json, sha256_file
from metatt_deploy.inference.tasks import TASK_NAME

# ---------------------------------------------------------------- a single-task export
ONNX_NAME = "model.onnx"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
CONFIG_JSON = "config.json"
GENERATION_CONFIG = "generation_config.json"
DTYPES = ("fp32", "fp16")
QUANTIZE = ("int8", "int8-static", "int4")
# optimum's task of each graph kind, recorded as the manifest's "pipeline_task"
CLASSIFIER_PIPELINE = "text-classification"
DECODER_PIPELINE = "text-generation-with-past"

# ---------------------------------------------------------------- a factored bundle
BUNDLE_FORMAT = 1
BUNDLE_JSON = "bundle.json"
BASE_DIR = "base"
SHARED_FILE = "shared.safetensors"
TASKS_DIR = "tasks"
TASK_GRAPH = "model_tasks.onnx"
ADAPTER_GRAPH = "model_adapter.onnx"
ADAPTER_SUFFIX = ".onnx_adapter"
TASK_IDS = "task_ids"  # model_tasks.onnx: int64, one task index per row
TASK_SLICE = "task_slice"  # a task's r x r slice of the task core (its one tensor for decoders)
LOGITS = "logits"
GENAI_CONFIG = "genai_config.json"  # export BUNDLE --genai: the bundle is also an ONNX Runtime GenAI model folder

# bundle.json "task_type" (and a decoder export manifest's): what the graphs answer
CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"


def adapter_model_version(bid: str) -> int:
    """The bundle id as the 31-bit model version stamped into every .onnx_adapter."""
    return int(bid[:8], 16) & 0x7FFFFFFF


def plain_name(value: object) -> bool:
    """A file or folder name inside a bundle: no separators, no '..' (a record cannot point outside)."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value


# ---------------------------------------------------------------- manifest.json


def read_manifest(onnx_dir: str | Path) -> dict:
    """The manifest of an export (``{}`` for an ONNX folder written without one); a clear error for other folders."""
    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / ONNX_NAME).is_file():
        raise MetaTTError(f"{onnx_dir} is not an ONNX export (no {ONNX_NAME}); pass a folder written by metatt-deploy export")
    if not (onnx_dir / MANIFEST_NAME).is_file():
        return {}
    manifest = read_json(onnx_dir / MANIFEST_NAME, "export manifest")
    check_manifest(manifest, onnx_dir / MANIFEST_NAME)
    return manifest


def check_manifest(manifest: Any, path: Path) -> None:
    """Types of the manifest fields readers rely on; a hand-edited or damaged manifest is one line."""
    variant = manifest.get("variant", {}) if isinstance(manifest, dict) else None
    adapter = manifest.get("adapter") if isinstance(manifest, dict) else None
    ok = (
        isinstance(manifest, dict)
        and isinstance(variant, dict)
        and variant.get("dtype", "fp32") in DTYPES
        and variant.get("quantize") in (None, *QUANTIZE)
        and isinstance(variant.get("optimize", False), bool)
        and all(isinstance(manifest.get(k), (str, type(None))) for k in ("task", "model_type", "base_model", "base_fingerprint"))
        and manifest.get("pipeline_task", CLASSIFIER_PIPELINE) in (CLASSIFIER_PIPELINE, DECODER_PIPELINE)
        and (adapter is None or (isinstance(adapter, dict) and isinstance(adapter.get("weights_sha256"), (str, type(None)))))
    )
    if not ok:
        raise MetaTTError(f"{path} is damaged or was edited (a field has the wrong type); export the model again")


def is_decoder_export(manifest: dict) -> bool:
    return manifest.get("pipeline_task") == DECODER_PIPELINE


def read_model_config(folder: str | Path) -> dict:
    """A model folder's ``config.json`` as a dict (one line when missing or not JSON)."""
    path = Path(folder) / CONFIG_JSON
    if not path.is_file():
        raise MetaTTError(f"{folder} has no {CONFIG_JSON}; export the model again")
    config = read_json(path, "model config")
    if not isinstance(config, dict):
        raise MetaTTError(f"{path} is not a JSON object; export the model again")
    return config


def context_length(config: dict) -> int | None:
    """The longest sequence the model's position table takes, from its config (None where it has no limit)."""
    text_config = config.get("text_config")
    sources = [config, text_config if isinstance(text_config, dict) else {}]
    for source in sources:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


# ---------------------------------------------------------------- bundle.json and task records


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / BUNDLE_JSON).is_file()


def read_bundle(path: str | Path) -> dict:
    """bundle.json of a factored bundle, its version and field types checked."""
    path = Path(path)
    if not is_bundle(path):
        raise MetaTTError(f"{path} is not a factored bundle (no {BUNDLE_JSON}); write one with metatt-deploy merge --factored")
    info = read_json(path / BUNDLE_JSON, "bundle description")
    if not isinstance(info, dict) or info.get("format_version") != BUNDLE_FORMAT:
        version = info.get("format_version") if isinstance(info, dict) else None
        raise MetaTTError(
            f"bundle format {version} is not supported (this build reads {BUNDLE_FORMAT}); use the metatt-deploy version that wrote it"
        )
    check_bundle_info(info, path)
    return info


def check_bundle_info(info: dict, path: Path) -> None:
    """Types of every bundle.json field that loading relies on; one line naming the first bad one."""
    onnx = info.get("onnx")
    graphs_ok = onnx is None or (
        isinstance(onnx, dict)
        and isinstance(onnx.get("task_graph"), dict)
        and isinstance(onnx["task_graph"].get("tasks"), list)
        and all(isinstance(t, str) for t in onnx["task_graph"]["tasks"])
        and isinstance(onnx.get("adapter_graph"), dict)
        and isinstance(onnx["adapter_graph"].get("adapter_inputs"), list)
        and all(isinstance(t, str) for t in onnx["adapter_graph"]["adapter_inputs"])
    )
    checks = {
        "bundle_id": isinstance(info.get("bundle_id"), str) and re.fullmatch(r"[0-9a-f]{32}", info["bundle_id"]) is not None,
        "tasks": isinstance(info.get("tasks"), list) and all(isinstance(t, str) for t in info["tasks"]),
        "base_dir": plain_name(info.get("base_dir", BASE_DIR)),
        "task_core": isinstance(info.get("task_core"), int) and not isinstance(info.get("task_core"), bool),
        "task_type": info.get("task_type", CLASSIFICATION) in (CLASSIFICATION, CAUSAL_LM),
        "adapter_config": isinstance(info.get("adapter_config"), dict),
        "max_length": isinstance(info.get("max_length", 128), int) and 2 <= info.get("max_length", 128) <= 1_000_000,
        "onnx": graphs_ok,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise MetaTTError(f"{path / BUNDLE_JSON} has a missing or malformed '{bad[0]}'; re-write the bundle with merge --factored")


def is_decoder_bundle(info: dict) -> bool:
    return info.get("task_type") == CAUSAL_LM


def is_decoder_model(path: str | Path) -> bool:
    """Whether ``path`` is a decoder export or a factored decoder bundle (served with the OpenAI API), else a classifier's."""
    if is_bundle(path):
        return is_decoder_bundle(read_bundle(path))
    return (Path(path) / MANIFEST_NAME).is_file() and is_decoder_export(read_manifest(path))


def model_task_type(path: str | Path) -> str:
    """The task type of an export or bundle, ``CAUSAL_LM`` or ``CLASSIFICATION``: the key servers dispatch on."""
    return CAUSAL_LM if is_decoder_model(path) else CLASSIFICATION


def base_dir(bundle: str | Path, info: dict) -> Path:
    """The bundle's base model folder (config + tokenizer)."""
    return Path(bundle) / info.get("base_dir", BASE_DIR)


def task_file(bundle: str | Path, rec: dict, kind: str) -> Path:
    """The path of a task's ``kind`` file (safetensors, onnx_adapter), checked against the sha256 its record holds.

    A task file swapped in from another bundle (same shapes, other values) would otherwise give
    other logits without any error.
    """
    entry = rec["files"].get(kind)
    if entry is None:
        raise MetaTTError(f"task '{rec['task']}' has no {kind} file; re-write it with merge --factored")
    path = Path(bundle) / TASKS_DIR / entry["file"]
    if not path.is_file():
        raise MetaTTError(f"task file {path} is missing; re-write the task with merge --factored")
    if sha256_file(path) != entry["sha256"]:
        raise MetaTTError(
            f"task file {path.name} is not the one its record {rec['task']}.json names (sha256 differs): it was changed or "
            "copied from another bundle; re-write the task with merge --factored"
        )
    return path


def task_records(bundle: str | Path, info: dict | None = None, skipped: dict[str, str] | None = None) -> list[dict]:
    """Every task file's record, checked against the bundle id: graph-baked tasks first, then added ones by name.

    A bad record is an error, unless ``skipped`` is given: then it maps the record's file name to
    the one-line reason and the other tasks are returned (a server keeps serving the good tasks
    of a bundle that one broken task file was dropped into, and says which one it left out).
    """
    bundle = Path(bundle)
    info = info or read_bundle(bundle)
    records = {}
    for path in sorted((bundle / TASKS_DIR).glob("*.json")):
        try:
            rec = read_json(path, "task record")
            check_task_record(rec, info, path)
        except MetaTTError as e:
            if skipped is None:
                raise
            skipped[path.name] = str(e)
            continue
        records[rec["task"]] = rec
    baked = [t for t in info["tasks"] if t in records]
    return [records[t] for t in baked] + [records[t] for t in sorted(records) if t not in baked]


def added_task_record(bundle: str | Path, info: dict, name: str, served: Sequence[str]) -> dict:
    """The checked record of ``tasks/NAME.json``, written into ``bundle`` after a server opened it (hot add of a task).

    The record must carry this bundle's id and its files their recorded sha256, so a foreign or
    broken task file fails here, in the admin call, and never in a request.
    """
    if not TASK_NAME.fullmatch(str(name)):
        raise MetaTTError(f"'{name}' is not a task name (letters, digits, '_', '.', '-'; at most 64)")
    if name in served:
        raise MetaTTError(f"task '{name}' is already served; remove it first to replace it")
    path = Path(bundle) / TASKS_DIR / f"{name}.json"
    if not path.is_file():
        raise MetaTTError(f"bundle {bundle} has no task file {TASKS_DIR}/{name}.json; add it with merge --factored --task {name}")
    rec = read_json(path, "task record")
    check_task_record(rec, info, path)
    for kind in rec["files"]:
        task_file(bundle, rec, kind)
    return rec


def check_task_record(rec: dict, info: dict, path: Path) -> None:
    """A task record must be well formed, name itself, and belong to this bundle (bundle id)."""
    files = rec.get("files") if isinstance(rec, dict) else None
    shapes = rec.get("shapes") if isinstance(rec, dict) else None
    well_formed = (
        isinstance(rec, dict)
        and plain_name(rec.get("task"))
        and rec.get("task") == path.stem
        and isinstance(rec.get("labels"), list)
        and all(isinstance(x, str) for x in rec["labels"])
        and isinstance(rec.get("num_labels"), int)
        and isinstance(shapes, dict)
        and all(isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v) for v in shapes.values())
        and isinstance(files, dict)
        and "safetensors" in files
        and all(isinstance(e, dict) and plain_name(e.get("file")) and isinstance(e.get("sha256"), str) for e in files.values())
    )
    if not well_formed:
        raise MetaTTError(f"task record {path.name} is malformed or names another task; re-write the task with merge --factored")
    if rec.get("bundle_id") != info["bundle_id"]:
        raise MetaTTError(
            f"task file {path.name} belongs to bundle {str(rec.get('bundle_id'))[:12]}, not to this bundle "
            f"({info['bundle_id'][:12]}); remove it, or add the task with merge --factored from this bundle's adapter"
        )
    shapes = rec.get("shapes", {})
    n = rec.get("num_labels")
    if is_decoder_bundle(info):  # a decoder task is its slice alone: no head, no labels
        if n != 0 or rec.get("labels") or set(shapes) != {TASK_SLICE}:
            raise MetaTTError(
                f"task file {path.name} is not a decoder task (labels or head tensors); re-write the task with merge --factored"
            )
        return
    label_shapes = [s for k, s in shapes.items() if k.startswith("head.")]
    if n != len(rec.get("labels", [])) or not any(s and s[0] == n for s in label_shapes):
        raise MetaTTError(
            f"task file {path.name} lists {len(rec.get('labels', []))} labels but its head has "
            f"{[s[0] for s in label_shapes]} outputs; re-write the task with merge --factored"
        )
