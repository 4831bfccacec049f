"""Classification data for training and evaluation, from local files, builtin tasks or the Hub.

Every source ends up as the same `TaskData`: one or two text columns plus a "label" column of
class ids 0..K-1 with their names, so training, evaluation and export never care where the data
came from. The user-facing rules are in docs/data.md.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.utils import logging as ds_logging

from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.common.files import check_utf8, jsonl_objects, read_json
from metatt_deploy.inference.tasks import TEXT_COLUMN_CANDIDATES
from metatt_deploy.training.builtin_data import BUILTIN_TASKS, ensure_builtin

SPLITS = ("train", "validation", "test")
LABEL = "label"
FILE_FORMATS: dict[str, tuple[str, dict[str, str]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
}
# Pairs first: "question"/"sentence" (QNLI) must win over the single "sentence".
# Hub names written "<benchmark>/<config>" (e.g. glue/mrpc); any other "a/b" is a repository id.
HUB_CONFIG_BENCHMARKS = ("glue", "super_glue")
# Hidden column added to rows read from a line-based file (JSONL, CSV, TSV): the 1-based line of the
# file where the row starts, so data errors name the line the user can open, even after carving.
LINE = "__line__"
# File stems like "bbc.train" or "bbc_test": the part after the last separator names the split.
SPLIT_SUFFIXES = ("train", "training", "validation", "valid", "val", "dev", "test")
VALIDATION_FRACTION_DENOMINATOR = 10  # carve 1/10 of train when a source has no validation split
CARVE_SEED = 0  # fixed, so the carved validation split does not move with the training seed


@dataclass
class TaskData:
    """A classification task: ``splits`` hold the text columns and "label" (class ids)."""

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: list[str]
    splits: dict[str, Dataset]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def recorded_text_columns(tasks: Sequence[Any]) -> dict[str, list[str]]:
    """Task -> text columns of the classifier tasks among ``tasks``, for the adapter config (`MetaTTConfig.text_columns`).

    Recorded so that predict and serve know a pair task from a single-sentence one by what it was
    trained on, not by guessing from its labels; a text-to-text task (a causal LM's) has none.
    """
    return {t.name: list(t.text_columns) for t in tasks if isinstance(t, TaskData)}


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bars or error logs from ``datasets`` while reading files: reading a local file
    is quick, and its failures reach the user as one MetaTTError line, not as log lines around it."""
    bars = ds_logging.is_progress_bar_enabled()
    level = ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            ds_logging.enable_progress_bar()


def load_task(**kwargs: Any) -> TaskData:
    """Load local files (``train``/``validation``/``test``), a builtin task or a Hub data set (``dataset``); see `read_task`."""
    with quiet_datasets():
        return read_task(**kwargs)


def read_task(
    *,
    name: str | None = None,
    train: str | None = None,
    validation: str | None = None,
    test: str | None = None,
    dataset: str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    max_samples: dict[str, int] | None = None,
    seed: int = 0,
) -> TaskData:
    """Load local files (``train``/``validation``/``test``), a builtin task or a Hub data set (``dataset``).

    ``name`` names the task (adapter config, reports, bundles); default: the data set, or the
    first file's name without its split suffix (`default_task_name`).
    """
    files = {split: path for split, path in zip(SPLITS, (train, validation, test)) if path}
    if name is not None and (not name.strip() or any(c in name for c in "/\\") or name != name.strip()):
        raise MetaTTError(f"task name {name!r} is not usable (empty, a path, or padded with spaces); pass a plain --task-name")
    splits, origins, defaults = _load_sources(dataset, files, label_column)
    text_columns = text_columns or defaults.get("text_columns")
    label_names = label_names or defaults.get("label_names")
    for split, ds in splits.items():
        if len(ds) == 0:
            raise MetaTTError(f"{origins[split]} has no rows; give a {split} split with data")
    if "train" in splits and "validation" not in splits:
        splits["train"], splits["validation"] = _carve_validation(splits["train"], origins["train"])
        origins["validation"] = origins["train"]  # its rows keep their lines in the train file

    reference = "train" if "train" in splits else next(iter(splits))
    columns = _resolve_text_columns(text_columns, splits[reference], origins[reference])
    for split, ds in splits.items():
        _check_text_columns(ds, columns, origins[split])
    names, ids = _encode_labels(splits, origins, reference, label_column, label_names)
    splits = {
        split: ds.select_columns(list(columns)).add_column(LABEL, ids[split], feature=ClassLabel(names=names))
        for split, ds in splits.items()
    }
    if max_samples:
        splits = _subsample(splits, max_samples, seed)
    task_name = name or dataset or default_task_name(files[reference])
    return TaskData(task_name, columns, label_column, names, splits)


def default_task_name(path: str | Path) -> str:
    """The task name of a data file: its stem without a split suffix (bbc.train.jsonl -> bbc).

    A file named after its split alone (data/bbc/train.jsonl) takes its folder's name.
    """
    path = Path(path)
    stem = path.stem
    if stem.lower() in SPLIT_SUFFIXES:
        return path.resolve().parent.name or stem
    for sep in (".", "_", "-"):
        head, found, tail = stem.rpartition(sep)
        if found and head and tail.lower() in SPLIT_SUFFIXES:
            return head
    return stem


# ---------------------------------------------------------------- sources


def _load_sources(
    dataset: str | None, files: dict[str, str], label_column: str
) -> tuple[dict[str, Dataset], dict[str, str], dict[str, Any]]:
    """Raw splits, a name per split for messages, and column defaults (a builtin's info.json)."""
    if dataset and files:
        raise MetaTTError("pass either --dataset or data files (--train/--validation/--test), not both")
    if dataset in BUILTIN_TASKS:
        return _load_builtin(dataset)
    if dataset:
        return (*_load_hub(dataset, label_column), {})
    if files:
        splits = {split: read_data_file(Path(path)) for split, path in files.items()}
        return splits, {split: Path(path).name for split, path in files.items()}, {}
    raise MetaTTError("no data given; pass --train FILE (CSV, TSV, JSONL or JSON) or --dataset NAME")


def read_data_file(path: Path) -> Dataset:
    """One local data file as a Dataset; reading errors become one-line messages."""
    if not path.is_file():
        raise MetaTTError(f"data file not found: {path}; check the path")
    if path.suffix.lower() not in FILE_FORMATS:
        raise MetaTTError(f"unsupported data file type '{path.suffix}' ({path}); use .csv, .tsv, .jsonl or .json")
    if path.stat().st_size == 0:
        raise MetaTTError(f"{path.name} is empty; give a file with a header (CSV) or records (JSONL)")
    check_utf8(path, "data file")
    check_records(path)
    builder, options = FILE_FORMATS[path.suffix.lower()]
    try:
        ds = load_dataset(builder, data_files=str(path), split="train", **options)
    except ValueError as e:
        if "corresponds to no data" in str(e):  # a CSV header without rows
            raise MetaTTError(f"{path.name} has no rows; give a file with data") from None
        _raise_bad_json_line(path, builder)
        raise MetaTTError(f"could not read {path} as {builder.upper()} ({e}); fix the file") from None
    except DatasetGenerationError as e:
        _raise_bad_json_line(path, builder)
        cause = e.__cause__ or e
        raise MetaTTError(f"could not read {path} as {builder.upper()} ({first_line(cause)}); fix the file") from None
    lines = _row_lines(path, builder, options.get("delimiter", ","))
    return ds.add_column(LINE, lines) if lines is not None and len(lines) == len(ds) else ds


def _is_json_array(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    return head.startswith("[")


def _row_lines(path: Path, builder: str, delimiter: str) -> list[int] | None:
    """The 1-based file line where each row starts (blank lines are skipped, as the readers do).

    None for a JSON array, whose records are not lines (errors then count records as rows).
    """
    if builder == "json":
        if _is_json_array(path):
            return None
        with open(path, encoding="utf-8", errors="replace") as f:
            return [n for n, line in enumerate(f, 1) if line.strip()]
    lines = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        start = 1
        for i, record in enumerate(reader):
            if i > 0 and any(field.strip() for field in record):
                lines.append(start)
            start = reader.line_num + 1
    return lines


def _raise_bad_json_line(path: Path, builder: str) -> None:
    """For a JSON Lines file the reader refused: name the first line that is not a JSON object."""
    if builder != "json" or _is_json_array(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for _ in jsonl_objects(f, path.name):  # raises at the first line that is not a JSON object
            pass


def check_records(path: Path) -> None:
    """A JSON Lines file must hold one JSON object per non-blank line.

    pyarrow's JSON reader (used by ``datasets``) crashes the whole process (segmentation fault)
    on a line holding ``null``; other non-objects give unreadable messages. A ``.json`` file may
    instead be one JSON array or object, which ``datasets`` reads through Python's json module.
    """
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
    if suffix == ".json" and head[:1] in (b"[", b"{"):
        try:
            whole = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = None  # not one JSON value: JSON Lines, checked below
        if isinstance(whole, (list, dict)):
            if isinstance(whole, list) and not all(isinstance(r, dict) for r in whole):
                raise MetaTTError(f"{path.name} is a JSON array whose items are not all objects; write one object per record")
            return
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith(b"{"):
                raise MetaTTError(
                    f"line {n} of {path.name} is not a JSON object ({line[:30].decode('utf-8', 'replace')}); write one object per line"
                )


def _load_builtin(name: str) -> tuple[dict[str, Dataset], dict[str, str], dict[str, Any]]:
    task_dir = ensure_builtin(name)
    info = read_json(task_dir / "info.json", f"builtin {name} info.json")
    splits = {split: read_data_file(task_dir / f"{split}.jsonl") for split in SPLITS}
    return splits, {split: f"builtin {name} {split}.jsonl" for split in SPLITS}, info


def hub_arguments(dataset: str) -> tuple[str, str | None]:
    """``load_dataset`` path and config: "name:config", "glue/mrpc" or a plain repository id."""
    if ":" in dataset:
        path, config = dataset.split(":", 1)
        return path, config
    benchmark, _, config = dataset.partition("/")
    if config and benchmark in HUB_CONFIG_BENCHMARKS:
        return benchmark, config
    return dataset, None


def _fetch_hub(path: str, config: str | None) -> DatasetDict:
    return load_dataset(path, config)


def _load_hub(dataset: str, label_column: str) -> tuple[dict[str, Dataset], dict[str, str]]:
    """The train/validation/test splits of a Hub data set, minus unlabelled ones (GLUE test: all -1)."""
    try:
        loaded = _fetch_hub(*hub_arguments(dataset))
    except Exception as e:  # network, offline mode, unknown name: all fixed by the user, none by us
        raise MetaTTError(
            f"could not load '{dataset}' from the Hugging Face hub ({type(e).__name__}: {first_line(e)}); hub data "
            f"needs network access, else pass local files (--train) or a builtin --dataset "
            f"({', '.join(BUILTIN_TASKS)})"
        ) from None
    present = [split for split in SPLITS if split in loaded]
    splits = {split: loaded[split] for split in present if not _unlabelled(loaded[split], label_column)}
    if not splits:
        raise MetaTTError(
            f"hub data set '{dataset}' has no labelled train, validation or test split "
            f"(splits: {', '.join(loaded)}); pass local files instead"
        )
    return splits, {split: f"{dataset} {split} split" for split in splits}


def _unlabelled(ds: Dataset, label_column: str) -> bool:
    return label_column in ds.column_names and len(ds) > 0 and all(label == -1 for label in _values(ds, label_column))


def _carve_validation(train: Dataset, origin: str) -> tuple[Dataset, Dataset]:
    """Hold out a fixed 1/10 of train as validation, for sources that ship none."""
    if len(train) < 2:
        raise MetaTTError(f"{origin} has {len(train)} row, too few to carve a validation split from; pass --validation")
    size = max(1, len(train) // VALIDATION_FRACTION_DENOMINATOR)
    parts = train.train_test_split(test_size=size, shuffle=True, seed=CARVE_SEED)
    return parts["train"], parts["test"]


# ---------------------------------------------------------------- columns and labels


def _columns(ds: Dataset) -> str:
    """The data's own column names, for messages (not the hidden line column)."""
    return ", ".join(c for c in ds.column_names if c != LINE)


def _place(ds: Dataset, row: int, origin: str) -> str:
    """Where 1-based row ``row`` of ``ds`` is, for a message: the file line when known."""
    if LINE in ds.column_names:
        return f"line {ds[row - 1][LINE]} of {origin}"
    return f"row {row} of {origin}"


def _resolve_text_columns(given: Sequence[str] | None, reference: Dataset, origin: str) -> tuple[str, ...]:
    if given:
        if isinstance(given, str) or not 1 <= len(given) <= 2:
            raise MetaTTError(f"text columns must be one or two names, got {given!r}; pass --text-column once or twice")
        return tuple(given)
    for candidate in TEXT_COLUMN_CANDIDATES:
        if all(column in reference.column_names for column in candidate):
            return candidate
    if "messages" in reference.column_names or {"prompt", "response"} <= set(reference.column_names):
        raise MetaTTError(
            f"{origin} holds text-to-text data (prompt/response or messages), not classification data; "
            "train a causal language model on it (a decoder --model, or --task-type causal-lm)"
        )
    raise MetaTTError(f"no text column found in {origin} (columns: {_columns(reference)}); pass --text-column")


def _check_text_columns(ds: Dataset, columns: tuple[str, ...], origin: str) -> None:
    """Catch a wrong or holey text column here rather than as a tokenizer traceback."""
    for column in columns:
        if column not in ds.column_names or column == LINE:
            raise MetaTTError(f"column '{column}' not found in {origin} (columns: {_columns(ds)}); pass --text-column")
        dtype = getattr(ds.features[column], "dtype", type(ds.features[column]).__name__)
        if dtype not in ("string", "large_string"):
            raise MetaTTError(f"column '{column}' in {origin} holds {dtype} values, not text; pass --text-column")
        row = _first_missing(_values(ds, column))
        if row is not None:
            raise MetaTTError(f"column '{column}' has no value in {_place(ds, row, origin)}; fill or drop that row")


def _values(ds: Dataset, column: str) -> list[Any]:
    """A column as a list in one Arrow conversion (iterating a Column goes row by row: 100x slower)."""
    return ds.select_columns([column])[:][column]


def _first_missing(values: list[Any]) -> int | None:
    """1-based number of the first row whose value is missing, if any."""
    return next((i for i, value in enumerate(values, 1) if value is None), None)


def _encode_labels(
    splits: dict[str, Dataset],
    origins: dict[str, str],
    reference: str,
    column: str,
    label_names: Sequence[str] | None,
) -> tuple[list[str], dict[str, list[int]]]:
    """Label names and the class ids of every split; unknown labels are errors, never new classes."""
    for split, ds in splits.items():
        if column not in ds.column_names or column == LINE:
            raise MetaTTError(f"label column '{column}' not found in {origins[split]} (columns: {_columns(ds)}); pass --label-column")
        row = _first_missing(_values(ds, column))
        if row is not None:
            raise MetaTTError(f"label column '{column}' has no value in {_place(ds, row, origins[split])}; fill or drop that row")
    feature = splits[reference].features[column]
    dtype = getattr(feature, "dtype", type(feature).__name__)
    if isinstance(feature, ClassLabel) or dtype.startswith(("int", "uint")):
        names = _int_label_names(splits[reference], column, feature, label_names)
        lookup: dict[Any, int] = {i: i for i in range(len(names))}
    elif dtype in ("string", "large_string"):
        names = list(label_names) if label_names else sorted(set(_values(splits[reference], column)))
        lookup = {label: i for i, label in enumerate(names)}
    else:
        raise MetaTTError(
            f"label column '{column}' in {origins[reference]} holds {dtype} values; classification "
            "needs integer or string labels, pass --label-column"
        )
    if len(set(names)) != len(names):
        raise MetaTTError(f"label names repeat: {', '.join(map(str, names))}; give each class once in --labels")
    return [str(n) for n in names], {split: _label_ids(ds, column, lookup, names, origins[split]) for split, ds in splits.items()}


def _int_label_names(ds: Dataset, column: str, feature: Any, label_names: Sequence[str] | None) -> list[str]:
    """Given names, else the ClassLabel's, else "0".."K-1" with K = largest train label + 1."""
    if label_names:
        return list(label_names)
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(max(0, max(_values(ds, column)) + 1))]


def _label_ids(ds: Dataset, column: str, lookup: dict[Any, int], names: list[str], origin: str) -> list[int]:
    ids = []
    for row, value in enumerate(_values(ds, column), 1):
        if value not in lookup:
            raise MetaTTError(
                f"unknown label {value!r} in {_place(ds, row, origin)} (column '{column}'; labels: "
                f"{', '.join(names)}); fix the data or pass --labels"
            )
        ids.append(lookup[value])
    return ids


def _subsample(splits: dict[str, Dataset], max_samples: dict[str, int], seed: int) -> dict[str, Dataset]:
    """A seeded random subset per split, to keep CPU runs short; the same seed gives the same rows."""
    for split, n in max_samples.items():
        if split not in SPLITS:
            raise MetaTTError(f"max samples given for unknown split '{split}'; use {', '.join(SPLITS)}")
        if n < 1:
            raise MetaTTError(f"max samples for {split} is {n}; give at least 1")
    subset = dict(splits)
    for split, ds in splits.items():
        if max_samples.get(split, len(ds)) < len(ds):
            subset[split] = ds.shuffle(seed=seed).select(range(max_samples[split]))
    return subset


# ---------------------------------------------------------------- tokenization


def tokenize_task(task: TaskData, tokenizer: Any, max_length: int) -> dict[str, Dataset]:
    """input_ids, attention_mask (+ token_type_ids) and labels per split, unpadded: a collator pads per batch."""
    return {
        split: ds.map(
            _encode_batch,
            batched=True,
            remove_columns=ds.column_names,
            fn_kwargs={"tokenizer": tokenizer, "text_columns": task.text_columns, "max_length": max_length},
            desc=f"tokenizing {split}",
        )
        for split, ds in task.splits.items()
    }


def _encode_batch(batch: dict[str, list[Any]], tokenizer: Any, text_columns: tuple[str, ...], max_length: int) -> dict[str, list[Any]]:
    encoded = dict(tokenizer(*(batch[column] for column in text_columns), truncation=True, max_length=max_length))
    encoded["labels"] = batch[LABEL]
    return encoded
