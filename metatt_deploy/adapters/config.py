"""The adapter's configuration: everything needed to rebuild it on its base model, as JSON.

Documented field by field in docs/adapter-format.md, so a loader can be written without this
package. The format version is bumped on any incompatible change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from metatt_deploy.adapters.targets import TargetModule
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_json, read_json
from metatt_deploy.tt.cores import check_ranks, core_shapes

FORMAT_VERSION = 1
CONFIG_NAME = "metatt_config.json"
WEIGHTS_NAME = "metatt_adapter.safetensors"
METATT_METHODS = ("metatt-4d", "metatt-5d")
DEFAULT_ALPHA = 4.0


def resolve_task(tasks: Sequence[str], task: str | int | None, what: str = "adapter") -> int:
    """The index of ``task`` (a name or an index) in ``tasks``: the one place names become indices.

    ``None`` means the only task; unknown names and ids are one-line errors listing the tasks.
    """
    if task is None:
        if len(tasks) == 1:
            return 0
        raise MetaTTError(f"this {what} serves several tasks ({', '.join(tasks)}); pass --task NAME")
    if isinstance(task, int) or (hasattr(task, "__index__") and not isinstance(task, str)):
        index = int(task)
        if isinstance(task, bool) or not 0 <= index < len(tasks):
            raise MetaTTError(f"unknown task id {task}; this {what} has tasks " + ", ".join(f"{i}={t}" for i, t in enumerate(tasks)))
        return index
    if task not in tasks:
        raise MetaTTError(f"unknown task '{task}'; this {what} has tasks: {', '.join(tasks)}")
    return list(tasks).index(task)


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
    def multitask(self) -> bool:
        return "task" in self.mode_names

    def core_shapes(self) -> list[tuple[int, int, int]]:
        return core_shapes(self.mode_sizes, self.ranks)

    def mode_size(self, name: str) -> int:
        return self.mode_sizes[self.mode_names.index(name)]

    def task_index(self, task: str | int | None) -> int:
        """Index of a task in the task mode (and in ``tasks``); a clear error for unknown names."""
        return resolve_task(self.tasks, task)

    def with_tasks(self, tasks: Sequence[str], label_names: dict[str, list[str]]) -> MetaTTConfig:
        """A copy serving ``tasks`` (the task mode resized to match): tasks added, subset or reordered."""
        t_core = self.mode_names.index("task")
        sizes = [len(tasks) if k == t_core else n for k, n in enumerate(self.mode_sizes)]
        return replace(self, tasks=list(tasks), label_names={t: list(label_names[t]) for t in tasks}, mode_sizes=sizes)

    def validate(self) -> None:
        if self.method not in METATT_METHODS:
            raise MetaTTError(f"unknown method '{self.method}'; use one of {', '.join(METATT_METHODS)}")
        if len(self.mode_names) != len(self.mode_sizes):
            raise MetaTTError("adapter config is inconsistent: mode_names and mode_sizes differ in length; re-create it")
        check_ranks(self.mode_names, self.mode_sizes, self.ranks)

    def to_json(self) -> dict:
        d = asdict(self)
        d["modules"] = [m.to_json() for m in self.modules]
        return d

    @classmethod
    def from_json(cls, d: dict) -> MetaTTConfig:
        if d.get("format_version") != FORMAT_VERSION:
            raise MetaTTError(
                f"adapter format version {d.get('format_version')} is not supported (this build reads "
                f"{FORMAT_VERSION}); use the metatt-deploy version that wrote it"
            )
        try:
            cfg = cls(**{**d, "modules": [TargetModule.from_json(m) for m in d["modules"]]})
        except (TypeError, KeyError) as e:
            raise MetaTTError(f"adapter config is missing or has unknown fields ({e}); re-create it") from None
        cfg.validate()
        return cfg

    def save(self, directory: str | Path) -> None:
        atomic_write_json(Path(directory) / CONFIG_NAME, self.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> MetaTTConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise MetaTTError(f"{directory} is not a MetaTT adapter (no {CONFIG_NAME}); pass the adapter directory")
        return cls.from_json(read_json(path, "adapter config"))
