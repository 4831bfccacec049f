"""Factored ONNX graphs of a multi-task causal LM, with a KV cache.

The graph is optimum's ``text-generation-with-past`` export of the decoder carrying its (4+1)D
adapter (same inputs and outputs as a merged export: ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.*`` -> ``logits``, ``present.*``; so
``optimum.onnxruntime.ORTModelForCausalLM`` and its ``generate()`` drive it), exported with
constant folding off so the base weights and every shared core are one initializer each and no
per-layer update is materialised. The task enters through one ``r x r`` tensor that every adapted
projection multiplies by (`MetaTT.slice_input` during the export), which becomes:

- ``model_adapter.onnx``: a graph input ``task_slice`` with an empty default initializer, fed
  from a task's ``.onnx_adapter`` (``RunOptions.add_active_adapter``). A run without an active
  adapter fails in MatMul instead of answering for some default task.
- ``model_tasks.onnx``: an int64 input ``task_ids`` (one per row) gathering ``(batch, r, r)``
  slices from every baked task's slice (an initializer ``task_slices``, ``(T, r, r)``); MatMul
  broadcasting gives every row its own slice, so a batch may mix tasks. Negative ids are mapped
  past the last task, so every id outside ``0..T-1`` fails in Gather.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
from torch import nn

from metatt_deploy.adapters import model as mt
from metatt_deploy.adapters.multitask import MultiTaskModel
from metatt_deploy.inference.formats import DECODER_PIPELINE, TASK_IDS, TASK_SLICE

TASK_SLICES = "task_slices"


def _optimum_export(hf: nn.Module, path: Path, opset: int) -> None:
    """optimum's export of ``hf`` for text generation with past key/values as inputs, no constant folding."""
    from optimum.exporters.onnx.convert import export_pytorch
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor("onnx", model=hf, task=DECODER_PIPELINE, library_name="transformers")
    config = constructor(hf.config)
    config.use_past_in_inputs = True  # one graph for the prompt (empty cache) and every later step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_pytorch(hf, config, opset, path, do_constant_folding=False)


def export_decoder_graphs(mtm: MultiTaskModel, adapter_path: Path, tasks_path: Path, opset: int) -> dict[str, dict]:
    """Write both factored decoder graphs; returns their bundle.json records (``task_graph``, ``adapter_graph``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    config = mtm.adapter_config
    hf = copy.deepcopy(mtm.model)
    adapter = mt.get_adapter(hf)
    slices = adapter.cores[config.mode_names.index("task")].detach().float()  # (r, T, r')
    adapter.slice_input = nn.Parameter(slices[:, 0, :].clone())
    raw = adapter_path.with_suffix(".raw.onnx")
    _optimum_export(hf, raw, opset)
    graph = onnx.load(str(raw))
    raw.unlink()
    name = next(i.name for i in graph.graph.initializer if i.name.endswith("slice_input"))
    kept = [i for i in graph.graph.initializer if i.name != name]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    for node in graph.graph.node:
        for k, value in enumerate(node.input):
            if value == name:
                node.input[k] = TASK_SLICE
    inputs = [i.name for i in graph.graph.input]
    outputs = [o.name for o in graph.graph.output]

    # form (a): task ids per row -> (batch, r, r') slices
    tasks = copy.deepcopy(graph)
    stacked = np.ascontiguousarray(slices.permute(1, 0, 2).numpy(), dtype=np.float32)  # (T, r, r')
    tasks.graph.input.append(helper.make_tensor_value_info(TASK_IDS, TensorProto.INT64, ["batch_size"]))
    tasks.graph.initializer.extend(
        [
            numpy_helper.from_array(stacked, TASK_SLICES),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "task_ids_zero"),
            numpy_helper.from_array(np.array(stacked.shape[0], dtype=np.int64), "task_ids_past_last"),
        ]
    )
    nodes = [
        helper.make_node("Less", [TASK_IDS, "task_ids_zero"], ["task_ids_negative"]),
        helper.make_node("Where", ["task_ids_negative", "task_ids_past_last", TASK_IDS], ["task_ids_checked"]),
        helper.make_node("Gather", [TASK_SLICES, "task_ids_checked"], [TASK_SLICE], axis=0),
    ]
    for node in reversed(nodes):
        tasks.graph.node.insert(0, node)
    onnx.save(tasks, str(tasks_path))

    # form (b): the slice as an input with an empty default, overridden by an active adapter
    shape = list(slices[:, 0, :].shape)
    graph.graph.input.append(helper.make_tensor_value_info(TASK_SLICE, TensorProto.FLOAT, [f"{TASK_SLICE}_dim0", f"{TASK_SLICE}_dim1"]))
    graph.graph.initializer.append(numpy_helper.from_array(np.zeros((0, shape[1]), dtype=np.float32), TASK_SLICE))
    onnx.save(graph, str(adapter_path))
    common = {"inputs": inputs, "outputs": outputs, "opset": opset, "pipeline_task": DECODER_PIPELINE, "kv_cache": True}
    return {
        "task_graph": {"file": tasks_path.name, **common, "inputs": [*inputs, TASK_IDS], "tasks": list(config.tasks), "max_labels": 0},
        "adapter_graph": {"file": adapter_path.name, **common, "adapter_inputs": [TASK_SLICE]},
    }
