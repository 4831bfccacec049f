"""The factored bundle of a multi-task adapter (``merge --factored``) and its factored ONNX export.

A bundle serves every task of a (4+1)D adapter from one copy of the base model and one copy of
each shared core; a task is its ``r x r`` task-core slice plus its head (kilobytes). Layout
(docs/multitask.md, "Factored bundle"):

    bundle.json                 format, bundle id, adapter layout, the tasks baked into the ONNX graph
    base/                       the base model (Hugging Face folder) + tokenizer, once
    shared.safetensors          the shared cores ``core.<k>`` (every core but the task core), once
    tasks/NAME.safetensors      ``task_slice`` (r x r) + ``head.<module>.<param>`` tensors
    tasks/NAME.json             labels, bundle id, shapes and sha256 of the task's files
    tasks/NAME.onnx_adapter     the same tensors as an ONNX Runtime adapter (for model_adapter.onnx)
    model_tasks.onnx            form (a): input ``task_ids`` (int64, one per row); all baked tasks
    model_adapter.onnx          form (b): task slice + head are inputs fed from an .onnx_adapter
    web/                        metatt.js + index.html: model_tasks.onnx from Node or a browser (export/web.py)

Each graph holds every shared core exactly once (one initializer each, used by every layer: the
per-layer updates are never materialised); the export runs with constant folding off so the
exporter cannot fold per-layer products into new initializers. The base weights are stored once
for the whole bundle: a graph's base initializers are ONNX external data pointing into
``base/model.safetensors`` (shared_weights.py), for both decoder graphs and for a classifier's
model_adapter.onnx; a classifier's model_tasks.onnx keeps its own copy, because the web app
fetches it as one file. bundle.json records what each graph reads from there and the bundle's
size on disk.

Form (a) routes each row to its own task slice and head; logits are ``(batch, max_labels)``
padded with `multitask.PAD_LOGIT`. Negative task ids are mapped past the last task inside the
graph, so any id outside ``0..T-1`` fails in ONNX Runtime's Gather instead of wrapping around.
Form (b) gives ``(batch, n_task)`` logits; its adapter inputs carry empty default initializers,
so a run without an active adapter fails loudly (MatMul dimension mismatch) instead of
answering for some default task.

Every task file records the bundle id (a hash of the base fingerprint, the adapter layout and
the shared core values); the ``.onnx_adapter`` carries its first 31 bits as its model version.
A task trained later with ``train --add-task`` keeps the shared cores, hence the bundle id, and
is added to an existing bundle without touching the graphs or the other tasks.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from metatt_deploy.adapters import model as mt
from metatt_deploy.adapters.config import MetaTTConfig, check_finite
from metatt_deploy.adapters.heads import PAD_LOGIT, TaskHeads, add_task_heads, label_linear, routers, select_task_head
from metatt_deploy.adapters.multitask import MultiTaskModel, bundle_id, load_multitask, routed, shared_core_indices
from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.common.files import atomic_dir, atomic_write_json, check_separate, check_writable, sha256_file
from metatt_deploy.export.factored_lm import export_decoder_graphs
from metatt_deploy.export.shared_weights import point_into_safetensors
from metatt_deploy.export.web import factored_spec, write_web_app
from metatt_deploy.inference.formats import (
    ADAPTER_GRAPH,
    ADAPTER_SUFFIX,
    BASE_DIR,
    BUNDLE_FORMAT,
    BUNDLE_JSON,
    CAUSAL_LM,
    CLASSIFICATION,
    LOGITS,
    SHARED_FILE,
    TASK_GRAPH,
    TASK_IDS,
    TASK_SLICE,
    TASKS_DIR,
    adapter_model_version,
    is_bundle,
    read_bundle,
    task_file,
    task_records,
)

DEFAULT_OPSET = 17
ADAPTER_FORMAT_VERSION = 1
LOGITS_LAYOUT = (
    f"(batch, max_labels) float32; row b holds its task's n_t logits in columns 0..n_t-1 and {PAD_LOGIT:g} "
    "in the rest (model_tasks.onnx); (batch, n_t) for model_adapter.onnx"
)


# ---------------------------------------------------------------- ONNX export


def text_inputs(model: nn.Module, tokenizer=None) -> list[str]:
    """The tokenizer outputs the model's forward takes, in a fixed order."""
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask", "token_type_ids"]
    wanted = set(tokenizer.model_input_names) if tokenizer is not None else set(names)
    return [n for n in names if n in params and (n in wanted or n == "input_ids")]


def _dummy_text(model: nn.Module, names: list[str], batch: int = 2, seq: int = 8) -> list[torch.Tensor]:
    vocab = int(cast(Any, model.config).vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, vocab), (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return [out[n] for n in names]


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Eval for the export, the previous mode of every submodule afterwards.

    (torch.onnx.export restores the *wrapper's* mode recursively, which would leave a model
    that was in eval mode in training mode, dropout on.)
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], dynamic_axes: dict, opset: int) -> None:
    import warnings

    with _eval_mode(module), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=[LOGITS],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=False,
        )


class _TaskIdGraph(nn.Module):
    def __init__(self, mtm: MultiTaskModel, names: list[str]):
        super().__init__()
        self.mtm = mtm
        self.names = names

    def forward(self, *args):
        *text, task_ids = args
        # an id < 0 would wrap around in Gather: send it past the last task so it fails instead
        task_ids = torch.where(task_ids < 0, torch.full_like(task_ids, len(self.mtm.tasks)), task_ids)
        adapter = self.mtm.metatt
        adapter.precompute = True  # every layer's update factor once per call, not once per layer
        heads = routers(self.mtm.model)
        for r in heads:
            r.stacked = True  # one gathered weight per row: a handful of nodes instead of ~15 per task
        try:
            return self.mtm(**dict(zip(self.names, text)), task_ids=task_ids).logits
        finally:
            adapter.precompute = False
            for r in heads:
                r.stacked = False


def export_task_graph(mtm: MultiTaskModel, path: str | Path, names: list[str], opset: int = DEFAULT_OPSET) -> dict:
    """Form (a): text inputs + ``task_ids`` (batch,) -> padded logits, every task baked in."""
    text = _dummy_text(mtm.model, names)
    task_ids = torch.arange(text[0].shape[0]) % len(mtm.tasks)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes.update({TASK_IDS: {0: "batch"}, LOGITS: {0: "batch"}})
    _export(_TaskIdGraph(mtm, names), (*text, task_ids), Path(path), [*names, TASK_IDS], axes, opset)
    return {
        "file": Path(path).name,
        "inputs": [*names, TASK_IDS],
        "outputs": [LOGITS],
        "tasks": mtm.tasks,
        "max_labels": max(mtm.num_labels),
        "opset": opset,
    }


@contextlib.contextmanager
def _parameters_as(root: nn.Module, tensors: dict[str, torch.Tensor]):
    """Let the given parameters of ``root`` be plain tensors (graph inputs while tracing).

    torch.func.functional_call cannot run under the tracer; this swaps the attributes by hand
    and restores every module's parameter order, which the exporter uses to name initializers.
    """
    saved = []
    for path, value in tensors.items():
        owner_name, _, name = path.rpartition(".")
        owner = root.get_submodule(owner_name)
        saved.append((owner, name, list(owner._parameters), owner._parameters.pop(name)))
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, order, param in reversed(saved):
            delattr(owner, name)
            owner._parameters[name] = param
            owner._parameters = OrderedDict((k, owner._parameters[k]) for k in order)


def head_tensors(config: MetaTTConfig, hf: nn.Module, task: int) -> dict[str, torch.Tensor]:
    """``head.<module>.<param>`` -> tensor of task ``task`` (the keys of task files and adapter inputs)."""
    out = {}
    for name in config.head_modules:
        module = hf.get_submodule(name)
        module = module.heads[task] if isinstance(module, TaskHeads) else module
        for k, v in module.state_dict().items():
            out[f"head.{name}.{k}"] = v.detach().to("cpu", torch.float32).contiguous()
    return out


class _AdapterGraph(nn.Module):
    def __init__(self, hf: nn.Module, names: list[str], task_core: str, head_keys: list[str]):
        super().__init__()
        self.hf = hf
        self.names = names
        self.task_core = task_core
        self.head_keys = head_keys

    def forward(self, *args):
        n = len(self.names)
        text, task_slice, head = args[:n], args[n], args[n + 1 :]
        swaps = {self.task_core: task_slice.unsqueeze(1)}
        swaps.update({k[len("head.") :]: v for k, v in zip(self.head_keys, head)})
        with routed(self.hf, 0), _parameters_as(self.hf, swaps):
            return self.hf(**dict(zip(self.names, text))).logits


def export_adapter_graph(mtm: MultiTaskModel, path: str | Path, names: list[str], opset: int = DEFAULT_OPSET) -> dict:
    """Form (b): text inputs + ``task_slice`` + head tensors (fed from an .onnx_adapter) -> (batch, n_t) logits."""
    import onnx
    from onnx import numpy_helper

    config = mtm.adapter_config
    hf = copy.deepcopy(mtm.model)
    hf_config = mt.get_adapter(hf).config
    select_task_head(hf, hf_config, 0)
    t_core = config.mode_names.index("task")
    heads = head_tensors(config, mtm.model, 0)
    slice0 = mtm.metatt.cores[t_core].detach()[:, 0, :].clone()
    text = _dummy_text(hf, names)
    keys = list(heads)
    label_key = _label_keys(config, hf)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[LOGITS] = {0: "batch", 1: "num_labels"}
    axes.update({k: {0: "num_labels"} for k in label_key})
    module = _AdapterGraph(hf, names, f"{mt.ADAPTER_ATTR}.cores.{t_core}", keys)
    _export(module, (*text, slice0, *heads.values()), Path(path), [*names, TASK_SLICE, *keys], axes, opset)
    # Adapter inputs: every dim symbolic and an empty default, so they are overridable by an
    # active adapter and a run without one fails instead of silently using a default task.
    graph = onnx.load(str(path))
    adapter_inputs = {TASK_SLICE: slice0, **heads}
    for inp in graph.graph.input:
        if inp.name in adapter_inputs:
            value = adapter_inputs[inp.name]
            for d, dim in enumerate(inp.type.tensor_type.shape.dim):
                dim.Clear()
                dim.dim_param = f"{inp.name}_dim{d}"
            empty = np.zeros((0, *value.shape[1:]), dtype=np.float32)
            graph.graph.initializer.append(numpy_helper.from_array(empty, inp.name))
    onnx.save(graph, str(path))
    return {"file": Path(path).name, "inputs": names, "adapter_inputs": [TASK_SLICE, *keys], "outputs": [LOGITS], "opset": opset}


def _label_keys(config: MetaTTConfig, hf: nn.Module) -> list[str]:
    """Keys of the label-producing Linear's weight and bias (their first dim is the label count)."""
    last = config.head_modules[-1]
    parent, child, linear = label_linear(hf.get_submodule(last))
    prefix = f"head.{last}." + (f"{_module_path(hf.get_submodule(last), parent)}{child}." if child and parent is not None else "")
    return [prefix + "weight"] + ([prefix + "bias"] if linear.bias is not None else [])


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is target:
            return f"{name}." if name else ""
    return ""


def write_onnx_adapter(path: str | Path, tensors: dict[str, torch.Tensor], bid: str) -> None:
    """One task's slice + head as an ONNX Runtime adapter file stamped with the bundle's version."""
    import onnxruntime as ort

    # AdapterFormat.set_parameters keeps only the C-level values, not the numpy arrays behind them:
    # the arrays must stay referenced here until the file is written, or it gets freed memory.
    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32) for k, v in tensors.items()}
    values = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_FORMAT_VERSION)
    fmt.set_model_version(adapter_model_version(bid))
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))
    # read back (the returned OrtValues are views into the file: keep them referenced while comparing)
    back = ort.AdapterFormat.read_adapter(str(path))
    written = back.get_parameters()
    if set(written) != set(arrays) or any(not np.array_equal(written[k].numpy(), a) for k, a in arrays.items()):
        raise RuntimeError(f"the adapter file {path} does not hold the tensors written into it")
    del written, back, values


# ---------------------------------------------------------------- the bundle


def _task_tensors(mtm: MultiTaskModel, t: int) -> dict[str, torch.Tensor]:
    config = mtm.adapter_config
    t_core = config.mode_names.index("task")
    slice_ = mtm.metatt.cores[t_core].detach()[:, t, :].to("cpu", torch.float32).contiguous()
    return {TASK_SLICE: slice_, **head_tensors(config, mtm.model, t)}


def _write_task(directory: Path, mtm: MultiTaskModel, t: int, bid: str, onnx: bool) -> dict:
    config = mtm.adapter_config
    name = config.tasks[t]
    tensors = _task_tensors(mtm, t)
    files = {"safetensors": f"{name}.safetensors"}
    save_file(tensors, str(directory / files["safetensors"]), metadata={"bundle_id": bid, "task": name})
    if onnx:
        files["onnx_adapter"] = f"{name}{ADAPTER_SUFFIX}"
        write_onnx_adapter(directory / files["onnx_adapter"], tensors, bid)
    record = {
        "format_version": BUNDLE_FORMAT,
        "task": name,
        "bundle_id": bid,
        "labels": list(config.label_names[name]),
        "num_labels": len(config.label_names[name]),
        "text_columns": config.text_columns(name),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "onnx_adapter_model_version": adapter_model_version(bid) if onnx else None,
        "files": {kind: {"file": f, "sha256": sha256_file(directory / f)} for kind, f in files.items()},
    }
    atomic_write_json(directory / f"{name}.json", record)
    return record


@dataclass(frozen=True)
class _BundleKind:
    """What differs between a classifier bundle and a decoder bundle, chosen once per bundle (`_bundle_kind`).

    (The PyTorch base is the adapter's own model kind's, `_load_base`.) ``save_beside_graphs`` writes what the graphs' loaders read
    next to them, ``write_graphs`` writes both ONNX graphs and returns their bundle.json records,
    ``shared_graphs`` are the graphs that read their base weights from ``base/model.safetensors``
    (shared_weights.py) and ``write_web`` writes the browser app (or there is none).
    """

    task_type: str
    save_beside_graphs: Callable[[PreTrainedModel, Path], None]
    write_graphs: Callable[[MultiTaskModel, Path, Any, int], dict]
    shared_graphs: tuple[str, ...]
    write_web: Callable[[MultiTaskModel, Path, Any], dict] | None


def _load_base(name: str, config: MetaTTConfig) -> PreTrainedModel:
    """The adapter's own kind of base (adapters/model_kinds.py), a classifier with the first task's labels
    (every task's head is replaced by the bundle's own)."""
    return cast(PreTrainedModel, config.kind.load_base(name, config.label_names.get(config.tasks[0], [])))


def _save_decoder_configs(base: PreTrainedModel, folder: Path) -> None:
    """ORTModelForCausalLM (and GenAI) read the model and generation configs next to the graph they load."""
    base.config.save_pretrained(folder)
    if base.generation_config is not None:
        base.generation_config.save_pretrained(folder)


def _nothing_beside(base: PreTrainedModel, folder: Path) -> None:
    """A classifier's graphs are loaded by ONNX Runtime alone, which needs nothing next to them."""


def _classifier_graphs(mtm: MultiTaskModel, folder: Path, tokenizer: Any, opset: int) -> dict:
    names = text_inputs(mtm.model, tokenizer)
    return {
        "task_graph": export_task_graph(mtm, folder / TASK_GRAPH, names, opset),
        "adapter_graph": export_adapter_graph(mtm, folder / ADAPTER_GRAPH, names, opset),
    }


def _decoder_graphs(mtm: MultiTaskModel, folder: Path, tokenizer: Any, opset: int) -> dict:
    return export_decoder_graphs(mtm, folder / ADAPTER_GRAPH, folder / TASK_GRAPH, opset)


def _classifier_web(mtm: MultiTaskModel, folder: Path, tokenizer: Any) -> dict:
    config = mtm.adapter_config
    names = [*text_inputs(mtm.model, tokenizer), TASK_IDS]
    spec = factored_spec(TASK_GRAPH, list(config.tasks), config.label_names, names, int(config.extra.get("max_length", 128)))
    return write_web_app(folder, spec, folder / BASE_DIR)


_BUNDLE_KINDS = {
    # the web app fetches model_tasks.onnx as one file, so that graph keeps its own copy of the base
    CLASSIFICATION: _BundleKind(CLASSIFICATION, _nothing_beside, _classifier_graphs, (ADAPTER_GRAPH,), _classifier_web),
    CAUSAL_LM: _BundleKind(CAUSAL_LM, _save_decoder_configs, _decoder_graphs, (ADAPTER_GRAPH, TASK_GRAPH), None),
}


def _bundle_kind(config: MetaTTConfig) -> _BundleKind:
    """The one place a bundle's kind is decided: the adapter's model kind (adapters/model_kinds.py)."""
    return _BUNDLE_KINDS[config.kind.name]


def _share_base(folder: Path, graphs: dict, files: tuple[str, ...]) -> None:
    """Point the listed graphs' base initializers into base/model.safetensors; note it in their records."""
    for record in graphs.values():
        if record["file"] in files:
            weights = sorted((folder / BASE_DIR).glob("*.safetensors"))  # one file, or the shards of a large base
            record["external_data"] = point_into_safetensors(folder / record["file"], weights)


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``: what the bundle really takes on disk (each file once)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_bundle(
    adapter_dir: str | Path,
    output: str | Path,
    *,
    tasks: list[str] | None = None,
    onnx: bool = True,
    opset: int = DEFAULT_OPSET,
    base_model: str | None = None,
    force: bool = False,
) -> dict:
    """Write (or extend) a factored bundle from a multi-task adapter; returns a summary.

    Without ``tasks`` every task of the adapter is written and baked into model_tasks.onnx. If
    ``output`` already is a bundle with the same bundle id and ``tasks`` are given, only those
    task files are added (graphs and other tasks untouched): this is how a task trained with
    ``train --add-task`` reaches a deployed bundle. A task already present needs ``force``.
    The summary's ``bytes`` is the bundle's size on disk, every file counted once.
    """
    output = Path(output)
    mtm, config, tokenizer = load_multitask(adapter_dir, base_model=base_model)
    bid = bundle_id(config, [c.detach() for c in mtm.metatt.cores])
    chosen = list(config.tasks) if not tasks else [config.tasks[config.task_index(t)] for t in tasks]
    if is_bundle(output) and tasks:
        return _add_tasks(output, mtm, chosen, bid, force)
    check_writable(output, force, marker=BUNDLE_JSON)
    check_separate(output, [adapter_dir, base_model or config.base_model])
    started = time.time()
    if tasks:  # a bundle of a subset: the graph bakes only those tasks
        keep = [config.tasks.index(t) for t in chosen]
        mtm = _subset(mtm, keep)
        config = mtm.adapter_config
    kind = _bundle_kind(config)
    with atomic_dir(output, force=force, marker=BUNDLE_JSON) as tmp:
        base = _load_base(base_model or config.base_model, config)
        base.save_pretrained(tmp / BASE_DIR, safe_serialization=True)
        kind.save_beside_graphs(base, tmp)
        del base
        tokenizer.save_pretrained(tmp / BASE_DIR)
        shared = {f"core.{k}": mtm.metatt.cores[k].detach().cpu().contiguous() for k in shared_core_indices(config)}
        save_file(shared, str(tmp / SHARED_FILE), metadata={"bundle_id": bid})
        (tmp / TASKS_DIR).mkdir()
        records = [_write_task(tmp / TASKS_DIR, mtm, t, bid, onnx) for t in range(len(config.tasks))]
        graphs = kind.write_graphs(mtm, tmp, tokenizer, opset) if onnx else None
        if graphs is not None:
            _share_base(tmp, graphs, kind.shared_graphs)
        web = kind.write_web(mtm, tmp, tokenizer) if onnx and kind.write_web is not None else None
        info = {
            "format_version": BUNDLE_FORMAT,
            "kind": "metatt-factored-bundle",
            "task_type": kind.task_type,
            "bundle_id": bid,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source_adapter": str(Path(adapter_dir).resolve()),
            "base_model": config.base_model,
            "base_fingerprint": config.base_fingerprint,
            "base_dir": BASE_DIR,
            "shared_file": SHARED_FILE,
            "shared_cores": sorted(int(k.split(".")[1]) for k in shared),
            "task_core": config.mode_names.index("task"),
            "tasks": list(config.tasks),
            "max_length": int(config.extra.get("max_length", 128)),
            "pad_logit": PAD_LOGIT,
            "logits_layout": LOGITS_LAYOUT,
            "adapter_config": config.to_json(),
            "onnx": graphs,
            "web": web,
            "bytes_without_bundle_json": folder_bytes(tmp),
            "seconds": round(time.time() - started, 1),
        }
        atomic_write_json(tmp / BUNDLE_JSON, info)
        size = folder_bytes(tmp)
    return {"bundle": str(output), "bundle_id": bid, "tasks": [r["task"] for r in records], "added": False, "bytes": size}


def _subset(mtm: MultiTaskModel, keep: list[int]) -> MultiTaskModel:
    """A copy of ``mtm`` with only the tasks ``keep`` (in that order)."""
    mtm = copy.deepcopy(mtm)
    config = mtm.adapter_config
    t_core = config.mode_names.index("task")
    cores = [c.detach() for c in mtm.metatt.cores]
    cores[t_core] = cores[t_core][:, keep, :]
    config = config.with_tasks([config.tasks[t] for t in keep], config.label_names)
    mtm.metatt.set_cores(cores, config)
    for router in routers(mtm.model):
        router.heads = nn.ModuleList([router.heads[t] for t in keep])
    return mtm


def _add_tasks(output: Path, mtm: MultiTaskModel, tasks: list[str], bid: str, force: bool) -> dict:
    info = read_bundle(output)
    if info["bundle_id"] != bid:
        raise MetaTTError(
            f"bundle {output} (id {info['bundle_id'][:12]}) was made from other shared cores than this adapter "
            f"(id {bid[:12]}); add tasks trained with train --add-task --from the bundle's own adapter, or write a new bundle"
        )
    directory = output / TASKS_DIR
    present = {p.stem for p in directory.glob("*.json")}
    clash = [t for t in tasks if t in present]
    if clash and not force:
        raise MetaTTError(f"bundle {output} already has task(s) {', '.join(clash)}; pass --force to replace them")
    # a baked task's slice also lives in model_tasks.onnx (and the web app reading it): replacing only
    # its file would leave the graph serving the old slice, so that takes a new bundle
    baked = [t for t in clash if t in ((info.get("onnx") or {}).get("task_graph") or {}).get("tasks", [])]
    if baked:
        raise MetaTTError(
            f"task(s) {', '.join(baked)} are baked into {TASK_GRAPH} of bundle {output}; write a new bundle "
            "(merge --factored -o NEW) to change them, --force replaces only tasks added later"
        )
    written = []
    for t in tasks:
        # write into a staging folder, then move the files in, so a failure leaves the bundle as it was
        with atomic_dir(output / f".stage-{t}", force=True) as stage:
            _write_task(stage, mtm, mtm.adapter_config.tasks.index(t), bid, info.get("onnx") is not None)
        stage = output / f".stage-{t}"
        for f in sorted(stage.iterdir(), key=lambda p: p.suffix == ".json"):  # the JSON last: it makes the task visible
            f.replace(directory / f.name)
        stage.rmdir()
        written.append(t)
    return {"bundle": str(output), "bundle_id": bid, "tasks": written, "added": True, "bytes": folder_bytes(output)}


# ---------------------------------------------------------------- reading tasks back


def load_task_tensors(bundle: str | Path, rec: dict) -> dict[str, torch.Tensor]:
    path = task_file(bundle, rec, "safetensors")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MetaTTError(f"task file {path} is missing or corrupt ({e}); re-write it with merge --factored") from None
    if {k: list(v.shape) for k, v in tensors.items()} != rec["shapes"]:
        raise MetaTTError(f"task file {path.name} does not match its record {path.stem}.json; re-write the task")
    check_finite(tensors, f"task {rec['task']}")
    return tensors


def load_bundle(bundle: str | Path) -> MultiTaskModel:
    """A bundle back in PyTorch: base + shared cores + every task's slice and head (for checks and merging)."""
    bundle = Path(bundle)
    info = read_bundle(bundle)
    records = task_records(bundle, info)
    if len(records) < 2:
        raise MetaTTError(f"bundle {bundle} has {len(records)} task(s); a multi-task model needs two or more")
    config = MetaTTConfig.from_json({**info["adapter_config"]})
    t_core = info["task_core"]
    try:
        with safe_open(str(bundle / SHARED_FILE), framework="pt") as f:
            shared_id = (f.metadata() or {}).get("bundle_id")
        shared = load_file(str(bundle / SHARED_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise MetaTTError(f"{bundle / SHARED_FILE} is missing or corrupt ({e}); re-write the bundle") from None
    if shared_id != info["bundle_id"]:
        raise MetaTTError(f"{bundle / SHARED_FILE} belongs to another bundle (id {str(shared_id)[:12]}); re-write the bundle")
    check_finite(shared, "shared core")
    tensors = [load_task_tensors(bundle, r) for r in records]
    missing = [k for k in shared_core_indices(config) if f"core.{k}" not in shared]
    slices = {tuple(t[TASK_SLICE].shape) if TASK_SLICE in t else None for t in tensors}
    if "task" not in config.mode_names or t_core != config.mode_names.index("task") or missing or len(slices) != 1 or None in slices:
        raise MetaTTError(f"bundle {bundle} does not fit its own layout (task core, shared cores or task slices); re-write the bundle")
    cores = [
        shared[f"core.{k}"] if k != t_core else torch.stack([t[TASK_SLICE] for t in tensors], dim=1) for k in range(len(config.mode_names))
    ]
    config = config.with_tasks([r["task"] for r in records], {r["task"]: list(r["labels"]) for r in records})
    model = _load_base(str(bundle / info["base_dir"]), config)
    mt.attach(model, config, cores)
    add_task_heads(model, config)
    for t, tensors_t in enumerate(tensors):
        for name in config.head_modules:
            sub = {k[len(f"head.{name}.") :]: v for k, v in tensors_t.items() if k.startswith(f"head.{name}.")}
            try:
                cast(TaskHeads, model.get_submodule(name)).heads[t].load_state_dict(sub)
            except RuntimeError as e:
                raise MetaTTError(f"the head of task {config.tasks[t]} does not fit ({first_line(e)}); re-write the task") from None
    return MultiTaskModel(model).eval()
