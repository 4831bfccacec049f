"""The adapter's configuration: everything needed to rebuild it on its base model, as JSON.

Documented field by field in docs/adapter-format.md, so a loader can be written without this
package. The format version is bumped on any incompatible change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metatt_deploy.adapters.model_kinds import ModelKind, adapter_kind
from metatt_deploy.adapters.targets import TargetModule, module_dims
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_json, read_json
from metatt_deploy.inference.tasks import resolve_task
from metatt_deploy.tt.cores import check_ranks, core_shapes, parse_init

# 2: the base fingerprint covers every base weight outside the head modules (1: the adapted
# modules' weights only), and head_modules may list head-adjacent modules (a pooler) that the
# base checkpoint lacked. Format 1 adapters are still read and checked the format-1 way.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "metatt_config.json"
WEIGHTS_NAME = "metatt_adapter.safetensors"
METATT_METHODS = ("metatt-4d", "metatt-5d")
DEFAULT_ALPHA = 4.0
MAX_PARTS = 3  # a module's output is one matrix type, or up to 3 fused ones (GPT-2 c_attn: q, k, v)
# extra[TEXT_COLUMNS]: task -> the text columns it was trained on, carried to merge records, export
# manifests and bundle task records, where inference/tasks.text_inputs reads pair vs single from them
TEXT_COLUMNS = "text_columns"


@dataclass(frozen=True)
class MetaTTConfig:
    """A MetaTT adapter's shape, placement and provenance."""

    method: str
    mode_names: list[str]
    mode_sizes: list[int]
    ranks: list[int]
    alpha: float
    init: str
    targets: list[str]
    layers: list[int]
    modules: list[TargetModule]
    tasks: list[str]
    label_names: dict[str, list[str]]
    head_modules: list[str]
    base_model: str
    base_fingerprint: str
    model_type: str
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> ModelKind:
        """The kind of base model the adapter sits on, as its extra records it (adapters/model_kinds.py)."""
        return adapter_kind(self.extra)

    @property
    def multitask(self) -> bool:
        return "task" in self.mode_names

    def core_shapes(self) -> list[tuple[int, int, int]]:
        return core_shapes(self.mode_sizes, self.ranks)

    def mode_size(self, name: str) -> int:
        return self.mode_sizes[self.mode_names.index(name)]

    def text_columns(self, task: str) -> list[str] | None:
        """The text columns ``task`` was trained on; None for adapters trained before they were recorded."""
        columns = (self.extra.get(TEXT_COLUMNS) or {}).get(task)
        return list(columns) if columns else None

    def with_text_columns(self, task: str, columns: Sequence[str]) -> MetaTTConfig:
        """A copy that records ``columns`` as the text columns of ``task``."""
        return replace(self, extra={**self.extra, TEXT_COLUMNS: {**(self.extra.get(TEXT_COLUMNS) or {}), task: list(columns)}})

    def task_index(self, task: str | int | None) -> int:
        """Index of a task in the task mode (and in ``tasks``); a clear error for unknown names."""
        return resolve_task(self.tasks, task)

    def with_tasks(self, tasks: Sequence[str], label_names: dict[str, list[str]]) -> MetaTTConfig:
        """A copy serving ``tasks`` (the task mode resized to match): tasks added, subset or reordered."""
        t_core = self.mode_names.index("task")
        sizes = [len(tasks) if k == t_core else n for k, n in enumerate(self.mode_sizes)]
        return replace(self, tasks=list(tasks), label_names={t: list(label_names[t]) for t in tasks}, mode_sizes=sizes)

    def validate(self) -> None:
        """Check every field and their consistency (without changing anything); one-line errors.

        Rules (docs/adapter-format.md): the mode layout of the method, positive mode sizes,
        ranks within the bounds of the modes around them, a finite alpha, one matrix index per
        target and one layer index per layer, modules whose layer, matrix indices, widths and
        disjoint segments fit the modes, one label list of two or more names per task.
        """
        _check_types(self)
        if self.method not in METATT_METHODS:
            raise _bad(f"unknown method '{self.method}' (use one of {', '.join(METATT_METHODS)})")
        tail = ["out"] if self.method == "metatt-4d" else ["head", "head_dim"]
        task = ["task"] if len(self.tasks) > 1 else []
        if self.mode_names != ["in", "layer", "matrix", *task, *tail]:
            raise _bad(f"mode_names {self.mode_names} do not fit method {self.method} with {len(self.tasks)} task(s)")
        if len(self.mode_names) != len(self.mode_sizes):
            raise _bad("mode_names and mode_sizes differ in length")
        if any(n < 1 for n in self.mode_sizes):
            raise _bad(f"mode_sizes {self.mode_sizes} must be positive")
        if len(self.ranks) != len(self.mode_sizes) - 1:
            raise _bad(f"{len(self.mode_sizes)} modes need {len(self.mode_sizes) - 1} ranks, not {len(self.ranks)}")
        check_ranks(self.mode_names, self.mode_sizes, self.ranks)
        if not math.isfinite(self.alpha):
            raise _bad(f"alpha is {self.alpha}; it must be a finite number")
        parse_init(self.init, len(self.mode_names))
        _unique(self.targets, "targets")
        _unique(self.tasks, "tasks")
        if len(self.targets) != self.mode_size("matrix"):
            raise _bad(f"{len(self.targets)} targets but the matrix mode has size {self.mode_size('matrix')}")
        if len(self.layers) != self.mode_size("layer") or self.layers != sorted(set(self.layers)) or min(self.layers) < 0:
            raise _bad(f"layers {self.layers} must be {self.mode_size('layer')} distinct ascending layer numbers")
        if task and self.mode_size("task") != len(self.tasks):
            raise _bad(f"{len(self.tasks)} tasks but the task mode has size {self.mode_size('task')}")
        if set(self.label_names) != set(self.tasks):
            raise _bad(f"label_names name tasks {sorted(self.label_names)}, not the tasks {self.tasks}")
        if not self.kind.has_head:  # a decoder generates with its own frozen LM head: no labels, no head shipped
            if self.head_modules or any(self.label_names.values()):
                raise _bad(f"a {self.kind.name} adapter ships no head and no labels; head_modules and label_names must be empty")
        else:
            for t, names in self.label_names.items():
                if len(names) < 2 or len(set(names)) != len(names):
                    raise _bad(f"task '{t}' needs two or more distinct label names, has {names}")
            if not self.head_modules or len(set(self.head_modules)) != len(self.head_modules):
                raise _bad(f"head_modules {self.head_modules} must name one or more distinct modules")
        if self.base_fingerprint and not re.fullmatch(r"[0-9a-f]{32}", self.base_fingerprint):
            raise _bad("base_fingerprint must be 32 lowercase hex characters (or empty)")
        self._check_modules()

    def _check_modules(self) -> None:
        if not self.modules:
            raise _bad("modules is empty")
        _unique([m.name for m in self.modules], "module names")
        d_in = self.mode_sizes[0]
        d_out = self.mode_size("out") if self.method == "metatt-4d" else self.mode_size("head") * self.mode_size("head_dim")
        n_layers, n_matrices = self.mode_size("layer"), self.mode_size("matrix")
        used: set[tuple[int, int]] = set()
        widest, widest_in = 0, 0
        for mod in self.modules:
            where = f"module {mod.name}"
            if not 0 <= mod.layer < n_layers:
                raise _bad(f"{where} has layer index {mod.layer}; it must be in 0..{n_layers - 1}")
            if not 1 <= mod.in_features <= d_in or mod.out_features < 1:
                raise _bad(f"{where} has in_features {mod.in_features} (must be 1..{d_in}) and out_features {mod.out_features}")
            widest_in = max(widest_in, mod.in_features)
            spans = []
            for m, start, end in mod.segments:
                if not 0 <= m < n_matrices:
                    raise _bad(f"{where} has matrix index {m}; it must be in 0..{n_matrices - 1}")
                width = end - start
                parts = mod.out_features // width if width > 0 else 0
                if (
                    not 0 <= start < end <= mod.out_features
                    or width > d_out
                    or mod.out_features % width
                    or start % width
                    or parts > MAX_PARTS
                ):
                    raise _bad(
                        f"{where} has segment [{m}, {start}, {end}]; a segment is one of the 1 to {MAX_PARTS} equal parts of the "
                        f"module's {mod.out_features} outputs (width dividing {mod.out_features}, at most {d_out})"
                    )
                if (mod.layer, m) in used:
                    raise _bad(f"layer index {mod.layer} and matrix index {m} are given to two modules")
                used.add((mod.layer, m))
                spans.append((start, end))
                widest = max(widest, end - start)
            if not spans:
                raise _bad(f"{where} has no segments")
            spans.sort()
            if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
                raise _bad(f"{where} has overlapping segments; segments of one module are disjoint")
        if widest_in != d_in or widest != d_out:
            raise _bad(f"the widest module input {widest_in} and segment {widest} must equal the in and out mode sizes {d_in}, {d_out}")
        if {m for _, m in used} != set(range(n_matrices)) or {layer for layer, _ in used} != set(range(n_layers)):
            raise _bad("some layer or matrix index is used by no module")

    def check_cores(self, cores: Sequence[torch.Tensor]) -> None:
        """The cores must have exactly the shapes the config gives (ranks included) and be finite."""
        expected = self.core_shapes()
        if len(cores) != len(expected):
            raise MetaTTError(f"adapter has {len(cores)} cores but its config describes {len(expected)}; re-create the adapter")
        for k, (core, shape) in enumerate(zip(cores, expected)):
            if tuple(core.shape) != shape:
                raise MetaTTError(
                    f"adapter core {k} has shape {tuple(core.shape)} but the config (mode_sizes, ranks) says {shape}; re-create the adapter"
                )
        check_finite({f"core.{k}": c for k, c in enumerate(cores)}, "adapter")

    def check_base(self, model: nn.Module) -> None:
        """The base model must be of the config's architecture and hold every module as described."""
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        if model_type != self.model_type:
            raise MetaTTError(
                f"this adapter is for a {self.model_type} model, but the base model is a {model_type}; pass its own base model"
            )
        for mod in self.modules:
            try:
                module = model.get_submodule(mod.name)
                dims = module_dims(module)
            except (AttributeError, MetaTTError):
                raise MetaTTError(f"the base model has no adaptable module {mod.name}; pass the adapter's own base model") from None
            if dims != (mod.in_features, mod.out_features, mod.transposed):
                raise MetaTTError(
                    f"module {mod.name} of the base model is {dims[0]} -> {dims[1]}, the adapter says "
                    f"{mod.in_features} -> {mod.out_features}; pass the adapter's own base model"
                )
        for name in self.head_modules:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise MetaTTError(f"the base model has no head module {name}; pass the adapter's own base model") from None

    def to_json(self) -> dict:
        d = asdict(self)
        d["modules"] = [m.to_json() for m in self.modules]
        return d

    @classmethod
    def from_json(cls, d: Any) -> MetaTTConfig:
        if not isinstance(d, dict):
            raise _bad("it is not a JSON object")
        if d.get("format_version") not in READABLE_VERSIONS:
            raise MetaTTError(
                f"adapter format version {d.get('format_version')} is not supported (this build reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}); use the metatt-deploy version that wrote it"
            )
        try:
            modules = [TargetModule.from_json(m) for m in d["modules"]]
            cfg = cls(**{**d, "modules": modules})
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise MetaTTError(f"adapter config is missing or has unknown or malformed fields ({e}); re-create it") from None
        cfg.validate()
        return cfg

    def save(self, directory: str | Path) -> None:
        atomic_write_json(Path(directory) / CONFIG_NAME, self.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> MetaTTConfig:
        path = Path(directory) / CONFIG_NAME
        if not Path(directory).is_dir():
            raise MetaTTError(f"adapter folder not found: {directory}; check the path (a run's best/ folder)")
        if not path.is_file():
            raise MetaTTError(f"{directory} is not a MetaTT adapter (no {CONFIG_NAME}); pass the adapter directory")
        return cls.from_json(read_json(path, "adapter config"))


def _bad(what: str) -> MetaTTError:
    return MetaTTError(f"adapter config is invalid: {what}; re-create the adapter")


def _unique(items: list, what: str) -> None:
    if not items or len(set(items)) != len(items):
        raise _bad(f"{what} {items} must be non-empty and distinct")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_types(cfg: MetaTTConfig) -> None:
    """JSON types of every field: a string where a number belongs is an error, not a silent cast."""

    def strings(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def ints(v: Any) -> bool:
        return isinstance(v, list) and all(_is_int(x) for x in v)

    checks = {
        "format_version": _is_int(cfg.format_version),
        "method": isinstance(cfg.method, str),
        "mode_names": strings(cfg.mode_names),
        "mode_sizes": ints(cfg.mode_sizes),
        "ranks": ints(cfg.ranks),
        "alpha": isinstance(cfg.alpha, (int, float)) and not isinstance(cfg.alpha, bool),
        "init": isinstance(cfg.init, str),
        "targets": strings(cfg.targets),
        "layers": ints(cfg.layers),
        "tasks": strings(cfg.tasks),
        "label_names": isinstance(cfg.label_names, dict) and all(strings(v) for v in cfg.label_names.values()),
        "head_modules": strings(cfg.head_modules),
        "base_model": isinstance(cfg.base_model, str),
        "base_fingerprint": isinstance(cfg.base_fingerprint, str),
        "model_type": isinstance(cfg.model_type, str),
        "extra": isinstance(cfg.extra, dict),
    }
    for name, ok in checks.items():
        if not ok:
            raise _bad(f"field '{name}' has the wrong type ({type(getattr(cfg, name)).__name__}: {str(getattr(cfg, name))[:40]})")
    for m in cfg.modules:
        seg_ok = isinstance(m.segments, list) and all(
            isinstance(s, tuple) and len(s) == 3 and all(_is_int(x) for x in s) for s in m.segments
        )
        if not (
            isinstance(m.name, str)
            and all(_is_int(x) for x in (m.layer, m.in_features, m.out_features))
            and isinstance(m.transposed, bool)
            and seg_ok
        ):
            raise _bad(f"module entry {str(m.name)[:60]} has a field of the wrong type")


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse NaN or Inf in weights (as PEFT's safe_merge does): they would poison every answer."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MetaTTError(f"{what} weight {name} holds NaN or Inf values; retrain (a lower --lr or --alpha) or re-create it")
