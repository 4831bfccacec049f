"""Held-out data for validating a classifier export: texts (one or two columns) and labels in the model's label ids.

``load_held_out`` reads a builtin task's split, a Hub data set, or a CSV/TSV/JSONL/JSON file (labels
optional; unlabelled files are read whole with their text columns guessed as the runtime guesses
them), maps the data's label names onto the adapter's, and takes a fixed random subset on request.
Training's data reader (training/data.py) does the reading; this module adds the unlabelled case and the mapping.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.export.onnx_classifier import SAMPLE_SENTENCES
from metatt_deploy.inference.tasks import TEXT_COLUMN_CANDIDATES
from metatt_deploy.training.data import FILE_FORMATS, check_records, load_task, quiet_datasets


class HeldOut:
    """Texts (one or two columns) and optional labels, in the model's label ids.

    ``total`` is how many examples the source has; fewer ``texts`` means a random subset was taken.
    """

    def __init__(self, texts: list[tuple[str, ...]], labels: list[int] | None, source: str, split: str | None):
        self.texts, self.labels, self.source, self.split = texts, labels, source, split
        self.total = len(texts)

    @property
    def subset(self) -> bool:
        return len(self.texts) < self.total

    def limit(self, max_examples: int | None, seed: int = 0) -> HeldOut:
        """A fixed random subset of ``max_examples`` (in source order), or everything when None or larger."""
        if max_examples is None or max_examples >= self.total:
            return self
        keep = sorted(np.random.default_rng(seed).choice(self.total, size=max_examples, replace=False).tolist())
        self.texts = [self.texts[i] for i in keep]
        self.labels = [self.labels[i] for i in keep] if self.labels is not None else None
        return self

    def describe(self) -> str:
        """One line for the console: the source and how much of it is used."""
        where = self.source + (f" ({self.split} split)" if self.split else "")
        if self.subset:
            return f"{where}: a random {len(self.texts):,} of {self.total:,} examples (--max-examples; omit it to use all)"
        return f"{where}: all {self.total:,} examples"

    def columns(self, rows: slice | list[int]) -> list[list[str]]:
        picked = self.texts[rows] if isinstance(rows, slice) else [self.texts[i] for i in rows]
        return [list(col) for col in zip(*picked)]


def load_held_out(
    data: str | None,
    *,
    split: str = "test",
    max_examples: int | None = None,
    model_labels: Sequence[str] = (),
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    seed: int = 0,
) -> HeldOut:
    """Held-out examples: a builtin task or Hub name (``split``), a CSV/TSV/JSONL/JSON file, or samples.

    Every example is used unless ``max_examples`` is smaller: then a fixed random subset.
    """
    if max_examples is not None and max_examples < 1:
        raise MetaTTError(f"--max-examples is {max_examples}; give at least 1")
    return _load_all(data, split, model_labels, text_columns, label_column, seed).limit(max_examples, seed)


def _load_all(data, split, model_labels, text_columns, label_column, seed) -> HeldOut:
    if data is None:
        return HeldOut([(s,) for s in SAMPLE_SENTENCES], None, "builtin sample sentences", None)

    path = Path(data)
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise MetaTTError(f"data file not found: {path}; check the path, or pass a builtin task name")
        if label_column not in _file_columns(path):
            return _unlabelled_file(path, text_columns)
        task = load_task(test=str(path), text_columns=text_columns, label_column=label_column, seed=seed)
        source, split, name = str(path), None, "test"
    else:
        task = load_task(dataset=data, text_columns=text_columns, label_column=label_column, seed=seed)
        if split not in task.splits:
            raise MetaTTError(f"'{data}' has no '{split}' split (it has {', '.join(task.splits)}); pass --split")
        source, name = data, split
    ds = task.splits[name]
    columns = ds.select_columns(list(task.text_columns))[:]
    texts = list(zip(*(columns[c] for c in task.text_columns)))
    mapping = _label_mapping(task.label_names, list(model_labels))
    labels = [mapping[i] for i in ds.select_columns(["label"])[:]["label"]]
    return HeldOut(texts, labels, source, split)


def _file_columns(path: Path) -> list[str]:
    """Column names of a data file, from its header or first record (cheap; no full read)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix.lower() in (".csv", ".tsv"):
                return next(csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","), [])
            if path.suffix.lower() == ".json":
                head = f.read(1)
                if head == "[":  # a JSON array of records: read it all (JSON files are small)
                    records = json.loads(head + f.read())
                    return list(records[0]) if records and isinstance(records[0], dict) else []
                f.seek(0)
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return list(record) if isinstance(record, dict) else []
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetaTTError(f"could not read {path} ({e}); fix the file") from None
    return []


def _unlabelled_file(path: Path, text_columns: Sequence[str] | None) -> HeldOut:
    from datasets import load_dataset

    builder, options = FILE_FORMATS[path.suffix.lower()]
    check_records(path)
    try:
        with quiet_datasets():
            ds = load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as e:  # the datasets reader's errors are all about the file's content
        raise MetaTTError(f"could not read {path} ({first_line(e)}); fix the file") from None
    columns = (
        list(text_columns)
        if text_columns
        else next((list(c) for c in TEXT_COLUMN_CANDIDATES if all(x in ds.column_names for x in c)), None)
    )
    if not columns or any(c not in ds.column_names for c in columns):
        raise MetaTTError(f"no text column found in {path} (columns: {', '.join(ds.column_names)}); pass --text-column")
    values = ds.select_columns(columns)[:]
    return HeldOut(list(zip(*(values[c] for c in columns))), None, str(path), None)


def _label_mapping(data_labels: list[str], model_labels: list[str]) -> list[int]:
    """data class id -> model class id, by name; integer labels map to themselves."""
    if not model_labels or data_labels == model_labels:
        return list(range(len(data_labels)))
    if set(data_labels) <= set(model_labels):
        return [model_labels.index(name) for name in data_labels]
    if all(name.isdigit() and int(name) < len(model_labels) for name in data_labels):
        return [int(name) for name in data_labels]
    raise MetaTTError(
        f"the data's labels ({', '.join(data_labels)}) are not the adapter's ({', '.join(model_labels)}); "
        "pass held-out data of the adapter's task"
    )
