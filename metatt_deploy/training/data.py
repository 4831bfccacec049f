"""Classification data for training and evaluation, from local files, builtin tasks or the Hub.

Every source ends up as the same `TaskData`: one or two text columns plus a "label" column of
class ids 0..K-1 with their names, so training, evaluation and export never care where the data
came from. The user-facing rules are in docs/data.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import read_json
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
TEXT_COLUMN_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("sentence",),
    ("text",),
)
# Hub names written "<benchmark>/<config>" (e.g. glue/mrpc); any other "a/b" is a repository id.
HUB_CONFIG_BENCHMARKS = ("glue", "super_glue")
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


def load_task(
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
    """Load local files (``train``/``validation``/``test``), a builtin task or a Hub data set (``dataset``)."""
    files = {split: path for split, path in zip(SPLITS, (train, validation, test)) if path}
    splits, origins, defaults = _load_sources(dataset, files, label_column)
    text_columns = text_columns or defaults.get("text_columns")
    label_names = label_names or defaults.get("label_names")
    for split, ds in splits.items():
        if len(ds) == 0:
            raise MetaTTError(f"{origins[split]} has no rows; give a {split} split with data")
    if "train" in splits and "validation" not in splits:
        splits["train"], splits["validation"] = _carve_validation(splits["train"], origins["train"])
        origins["validation"] = f"the validation part carved from {origins['train']}"

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
    task_name = name or dataset or Path(files[reference]).stem
    return TaskData(task_name, columns, label_column, names, splits)


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
    builder, options = FILE_FORMATS[path.suffix.lower()]
    try:
        return load_dataset(builder, data_files=str(path), split="train", **options)
    except ValueError as e:
        if "corresponds to no data" in str(e):  # a CSV header without rows
            raise MetaTTError(f"{path.name} has no rows; give a file with data") from None
        raise MetaTTError(f"could not read {path} as {builder.upper()} ({e}); fix the file") from None
    except DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise MetaTTError(f"could not read {path} as {builder.upper()} ({_first_line(cause)}); fix the file") from None


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
            f"could not load '{dataset}' from the Hugging Face hub ({type(e).__name__}: {_first_line(e)}); hub data "
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


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _carve_validation(train: Dataset, origin: str) -> tuple[Dataset, Dataset]:
    """Hold out a fixed 1/10 of train as validation, for sources that ship none."""
    if len(train) < 2:
        raise MetaTTError(f"{origin} has {len(train)} row, too few to carve a validation split from; pass --validation")
    size = max(1, len(train) // VALIDATION_FRACTION_DENOMINATOR)
    parts = train.train_test_split(test_size=size, shuffle=True, seed=CARVE_SEED)
    return parts["train"], parts["test"]


# ---------------------------------------------------------------- columns and labels


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
    raise MetaTTError(f"no text column found in {origin} (columns: {', '.join(reference.column_names)}); pass --text-column")


def _check_text_columns(ds: Dataset, columns: tuple[str, ...], origin: str) -> None:
    """Catch a wrong or holey text column here rather than as a tokenizer traceback."""
    for column in columns:
        if column not in ds.column_names:
            raise MetaTTError(f"column '{column}' not found in {origin} (columns: {', '.join(ds.column_names)}); pass --text-column")
        dtype = getattr(ds.features[column], "dtype", type(ds.features[column]).__name__)
        if dtype not in ("string", "large_string"):
            raise MetaTTError(f"column '{column}' in {origin} holds {dtype} values, not text; pass --text-column")
        row = _first_missing(_values(ds, column))
        if row is not None:
            raise MetaTTError(f"column '{column}' in {origin} has no value in row {row}; fill or drop that row")


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
        if column not in ds.column_names:
            raise MetaTTError(
                f"label column '{column}' not found in {origins[split]} (columns: {', '.join(ds.column_names)}); pass --label-column"
            )
        row = _first_missing(_values(ds, column))
        if row is not None:
            raise MetaTTError(f"label column '{column}' in {origins[split]} has no value in row {row}; fill or drop that row")
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
    return [str(n) for n in names], {
        split: _label_ids(_values(ds, column), lookup, names, origins[split], column) for split, ds in splits.items()
    }


def _int_label_names(ds: Dataset, column: str, feature: Any, label_names: Sequence[str] | None) -> list[str]:
    """Given names, else the ClassLabel's, else "0".."K-1" with K = largest train label + 1."""
    if label_names:
        return list(label_names)
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(max(0, max(_values(ds, column)) + 1))]


def _label_ids(values: list[Any], lookup: dict[Any, int], names: list[str], origin: str, column: str) -> list[int]:
    ids = []
    for row, value in enumerate(values, 1):
        if value not in lookup:
            raise MetaTTError(
                f"unknown label {value!r} in row {row} of {origin} (column '{column}'; labels: "
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
