"""The served tasks of one export: the one table every serving backend selects, adds and removes tasks through.

`Runtime` (classifiers), `Generator` (decoders on the numpy loop) and `GenAIGenerator` (ONNX
Runtime GenAI) each hold a `TaskTable` instead of their own copies of the records, so "which
tasks are served, what a name or index means, which record was left out and why, and how a task
joins or leaves while serving" is decided once for all of them. What differs per backend (which
graph or adapter runs a task) stays with the backend, passed in as ``add``'s ``check``.

A table is either of a factored bundle (``bundle.json`` + ``tasks/NAME.json``: tasks can be added
and removed while serving) or of a single-task export (fixed: one named task, or, for a decoder
export, no named task at all; adding or removing is refused with one line).

Readers on other threads (a batcher resolving a request's task while an admin call adds one)
see the old task set or the new one, never half: records and names are published together in
one assignment of one immutable pair.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import added_task_record, task_records
from metatt_deploy.inference.tasks import resolve_task

# a backend's check of a task before it is served: load and verify its adapter, refuse a task its graph cannot run
TaskCheck = Callable[[str, dict], object]


class _Served:
    """One published state of a table: its records, their names in order, and the records left out. Never mutated."""

    __slots__ = ("records", "tasks", "skipped")

    def __init__(self, records: dict[str, dict], skipped: dict[str, str]):
        self.records: Mapping[str, dict] = MappingProxyType(records)
        self.tasks: tuple[str, ...] = tuple(records)
        self.skipped: Mapping[str, str] = MappingProxyType(skipped)


class TaskTable:
    """The tasks one export serves: name or index -> task, hot add (checked before it is published) and remove."""

    def __init__(self, bundle: str | Path, info: dict | None, records: dict[str, dict], skipped: dict[str, str] | None = None):
        """Prefer `of_bundle` / `single_task`; ``info`` None marks a single-task export (its task set is fixed)."""
        self.bundle = Path(bundle)
        self.info = info
        self._served = _Served(dict(records), dict(skipped or {}))

    @classmethod
    def of_bundle(cls, bundle: str | Path, info: dict, *, keep_going: bool = False) -> TaskTable:
        """A factored bundle's tasks (graph-baked first, then added ones by name), every record checked against the bundle.

        With ``keep_going`` a broken record is left out and kept in ``skipped`` with its reason (a
        classifier server keeps serving the good tasks); without it, it is an error.
        """
        skipped: dict[str, str] | None = {} if keep_going else None
        records = {r["task"]: r for r in task_records(bundle, info, skipped)}
        return cls(bundle, info, records, skipped)

    @classmethod
    def single_task(cls, export: str | Path, record: dict | None = None) -> TaskTable:
        """A single-task export's fixed table: its one ``record`` (a classifier's task and labels), or none (a decoder export)."""
        return cls(export, None, {record["task"]: record} if record is not None else {})

    # ------------------------------------------------------------ reading (one snapshot per call)

    @property
    def fixed(self) -> bool:
        """True for a single-task export: its task set cannot change."""
        return self.info is None

    @property
    def records(self) -> Mapping[str, dict]:
        return self._served.records

    @property
    def tasks(self) -> list[str]:
        return list(self._served.tasks)

    @property
    def skipped(self) -> Mapping[str, str]:
        """Task record file name -> why it is not served (left out at load; see `of_bundle`)."""
        return self._served.skipped

    def name(self, task: str | int | None, what: str = "bundle") -> str:
        """The served name ``task`` means: a served name, or an index (an int, or a string of ASCII digits that is not a name).

        A name that looks like a number in another script (``"٣"``) stays a name; ``None`` means
        the only task. Unknown names and ids are one-line errors listing the tasks; a task whose
        record was left out at load says why.
        """
        served = self._served
        if isinstance(task, str) and task not in served.records:
            reason = served.skipped.get(f"{task}.json")
            if reason is not None:
                raise MetaTTError(f"task '{task}' is not served: {reason}")
            if task.isascii() and task.isdigit():
                task = int(task)
        return served.tasks[resolve_task(served.tasks, task, what)]

    # ------------------------------------------------------------ changing (one assignment each)

    def add(self, name: str, check: TaskCheck | None = None) -> dict:
        """Serve the bundle's ``tasks/NAME.json`` from now on; returns its checked record.

        The record must belong to this bundle with its files' recorded sha256 (`added_task_record`);
        then ``check(name, record)`` lets the backend load and verify what runs the task. Only when
        both pass is the task published, in one assignment, so a failed add leaves the table as it was.
        """
        if self.info is None:
            raise MetaTTError(f"{self.bundle} is a single-task export: its task is fixed; serve a factored bundle to add tasks")
        rec = added_task_record(self.bundle, self.info, name, self._served.tasks)
        if check is not None:
            check(name, rec)
        served = self._served
        skipped = {k: v for k, v in served.skipped.items() if k != f"{name}.json"}  # a record left out at load, now repaired
        self._served = _Served({**served.records, name: rec}, skipped)
        return rec

    def remove(self, name: str | int) -> str:
        """Stop serving a task (its files stay in the bundle); returns its name. Callers drain its in-flight work first."""
        if self.info is None:
            raise MetaTTError(f"{self.bundle} is a single-task export: its task is fixed; serve a factored bundle to remove tasks")
        served = self._served
        task = self.name(name)
        self._served = _Served({t: r for t, r in served.records.items() if t != task}, dict(served.skipped))
        return task


class ServesTasks:
    """A backend's `TaskTable` read through the backend's own names (``tasks``, ``records``, ``task_name``), which the apps,
    the CLI, tools and tests use: `Runtime`, `Generator` and `GenAIGenerator` share these instead of three copies."""

    table: TaskTable

    @property
    def tasks(self) -> list[str]:
        """The served tasks' names (a decoder export's table has none: it has no task to choose)."""
        return self.table.tasks

    @property
    def records(self) -> Mapping[str, dict]:
        return self.table.records

    def task_name(self, task: str | int | None) -> str:
        """A served task's name from a name or an index (see `TaskTable.name`); a skipped task's error says why."""
        return self.table.name(task)
