"""ONNX Runtime sessions of an export and the task adapters they run with.

One place decides how a graph is opened (execution providers, threads, optimisation level:
the options `common.threads.session_options_record` describes and manifests record), how a
tokenizer's encoding becomes a graph's feeds, and how a task's ``.onnx_adapter`` is checked
against its bundle before ONNX Runtime ever runs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.common.threads import session_options_record
from metatt_deploy.inference.formats import adapter_model_version, task_file


def available_providers(device: str = "auto") -> list[str]:
    """Execution providers to use: CUDA first when ONNX Runtime offers it (``device="auto"``).

    ``device`` is "auto", "cpu" or "cuda"; asking for CUDA where it is missing is a user error.
    """
    offered = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in offered:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise MetaTTError("CUDAExecutionProvider is not available in this onnxruntime; install onnxruntime-gpu or use --device cpu")
    return ["CPUExecutionProvider"]


def make_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on ``path`` with the options `session_options_record` describes (threads: default all CPUs).

    A graph ONNX Runtime cannot load (truncated, not ONNX, an operator it lacks) is one line.
    """
    record = session_options_record(threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, record["graph_optimization_level"])
    options.intra_op_num_threads = record["intra_op_num_threads"]
    options.inter_op_num_threads = record["inter_op_num_threads"]
    options.execution_mode = getattr(ort.ExecutionMode, record["execution_mode"])
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers or available_providers())
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        raise MetaTTError(f"{path} cannot be loaded by ONNX Runtime ({first_line(e)}); export the model again") from None


def input_names(session: Any, leave_out: Iterable[str] = ()) -> list[str]:
    skip = set(leave_out)
    return [i.name for i in session.get_inputs() if i.name not in skip]


def onnx_feeds(session: Any, encoding: dict[str, Any], leave_out: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The inputs ``session`` takes (but ``leave_out``), from a tokenizer encoding (numpy or torch), as int64 arrays."""
    feeds = {}
    for name in input_names(session, leave_out):
        if name in encoding:
            value = encoding[name]
        elif name == "token_type_ids":
            value = np.zeros_like(as_numpy(encoding["input_ids"]))
        else:
            raise MetaTTError(f"the ONNX model needs input '{name}', which the tokenizer does not produce; re-export the model")
        feeds[name] = as_numpy(value).astype(np.int64)
    return feeds


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array of an array-like (a torch tensor too: export and validate pass those)."""
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def load_task_adapter(bundle: Path, info: dict, rec: dict) -> ort.LoraAdapter:
    """A task's .onnx_adapter as an onnxruntime.LoraAdapter, after checking it belongs here (`checked_adapter_file`).

    The adapter must outlive every RunOptions it is added to (a freed one makes ONNX Runtime
    fall back to the empty defaults), so callers keep it.
    """
    path = checked_adapter_file(bundle, info, rec)
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    return adapter


def adapter_run_options(adapter: ort.LoraAdapter) -> ort.RunOptions:
    """RunOptions with ``adapter`` active (the caller keeps ``adapter`` alive while these are used)."""
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options


def checked_adapter_file(bundle: Path, info: dict, rec: dict) -> Path:
    """The path of a task's .onnx_adapter, after checking it belongs to this bundle and its graph.

    Refused (one line each): a file whose sha256 is not its record's, one written for another
    bundle (model version), tensors the graph does not take, or shapes other than the record's.
    """
    path = task_file(bundle, rec, "onnx_adapter")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as e:  # onnxruntime raises its own (Fail/InvalidArgument) types for bad files
        raise MetaTTError(f"adapter file {path.name} cannot be read ({first_line(e)}); re-write the task") from None
    if fmt.get_model_version() != adapter_model_version(info["bundle_id"]):
        raise MetaTTError(
            f"adapter file {path.name} was written for another bundle (version {fmt.get_model_version()}, "
            f"this bundle {adapter_model_version(info['bundle_id'])}); re-write the task for this bundle"
        )
    params = fmt.get_parameters()
    expected = set(info["onnx"]["adapter_graph"]["adapter_inputs"])
    if set(params) != expected:
        raise MetaTTError(
            f"adapter file {path.name} holds {sorted(params)}, the graph takes {sorted(expected)}; re-write the task with merge --factored"
        )
    shapes = {k: list(np.asarray(v.numpy()).shape) for k, v in params.items()}
    if shapes != rec["shapes"]:
        raise MetaTTError(f"adapter file {path.name} does not match its task record ({shapes} vs {rec['shapes']}); re-write the task")
    del params, fmt  # the parameters are views into the file's buffer
    return path
