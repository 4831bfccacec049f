"""Task names: the one place a name or an index becomes a task, and what a served task's name may be."""

from __future__ import annotations

import re
from collections.abc import Sequence

from metatt_deploy.common.errors import MetaTTError

# a task name is also a file name in a bundle's tasks/ folder and a model id on the HTTP API
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# the text columns of a task's rows, in the order a reader tries them (pairs first)
TEXT_COLUMN_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("sentence",),
    ("text",),
)
# Labels that name a relation between two texts: a task with one of them takes sentence pairs.
PAIR_LABELS = frozenset(
    {"entailment", "not_entailment", "contradiction", "duplicate", "not_duplicate", "equivalent", "not_equivalent", "paraphrase"}
)


def text_inputs(record: dict) -> int:
    """How many texts one row of a task holds: 1 (a sentence) or 2 (a sentence pair).

    A task record (a bundle's tasks/NAME.json, or an export's manifest.json) that lists its
    training ``text_columns`` (one or two names) says it; otherwise the labels decide: a task
    whose labels name a relation between two texts (entailment, contradiction, duplicate,
    equivalent, paraphrase, their not_ forms) takes pairs, any other task single sentences.
    The one place that decides, so `predict` and `serve` refuse the same rows.
    """
    columns = record.get("text_columns")
    if isinstance(columns, list) and len(columns) in (1, 2) and all(isinstance(c, str) for c in columns):
        return len(columns)
    return 2 if any(str(label).lower() in PAIR_LABELS for label in record.get("labels", [])) else 1


def resolve_task(tasks: Sequence[str], task: str | int | None, what: str = "adapter") -> int:
    """The index of ``task`` (a name or an index) in ``tasks``: the one place names become indices.

    ``None`` means the only task; unknown names and ids are one-line errors listing the tasks.
    A name that looks like a number is a name unless it is ASCII digits (``"٣"`` stays a name).
    """
    if task is None:
        if len(tasks) == 1:
            return 0
        raise MetaTTError(f"this {what} serves several tasks ({', '.join(tasks)}); pass --task NAME")
    if not isinstance(task, (str, int)) and not hasattr(task, "__index__"):
        raise MetaTTError(f"a task is a name or an index, got {type(task).__name__}; pass one task")
    if isinstance(task, int) or (hasattr(task, "__index__") and not isinstance(task, str)):
        index = int(task)
        if isinstance(task, bool) or not 0 <= index < len(tasks):
            raise MetaTTError(f"unknown task id {task}; this {what} has tasks " + ", ".join(f"{i}={t}" for i, t in enumerate(tasks)))
        return index
    if task not in tasks:
        shown = task.encode("ascii", "backslashreplace").decode("ascii")[:80]  # echo user input in any encoding
        raise MetaTTError(f"unknown task '{shown}'; this {what} has tasks: {', '.join(tasks)}")
    return list(tasks).index(task)
