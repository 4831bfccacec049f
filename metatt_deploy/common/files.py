"""Writes that never leave half an output behind.

Every command writes its output directory (or file) under a temporary name beside the final
one and renames it into place only once everything is written: an interrupted or failed run
leaves the old output (or nothing) and a stray temporary at most, never a partial result.
Existing outputs are replaced only when the caller passes ``force=True``.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from metatt_deploy.common.errors import MetaTTError

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"


def _umask() -> int:
    """The process umask (os.umask can only be read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path, directory: bool) -> None:
    """Give a finished temporary the mode a plain ``mkdir``/``open`` would have given it.

    mkdtemp and mkstemp create 0700 folders and 0600 files whatever the umask (and so do some
    libraries' writers), and a rename keeps the mode: without this, another user of an exported
    model gets "Permission denied". A folder's contents are set alike.
    """
    mask = _umask()
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)
    if directory:  # libraries write some files 0600 too (safetensors through transformers)
        for p in path.rglob("*"):
            if not p.is_symlink():
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(final: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` and ``.NAME.old-PID`` leftovers of dead processes beside ``final``.

    A process killed between creating its temporary and the rename (kill -9, power loss) leaves
    one behind; the PID in its name tells whether its writer is gone. Returns what was removed.
    """
    removed: list[Path] = []
    parent = final.parent
    if not parent.is_dir():
        return removed
    for tag in (TMP_TAG, OLD_TAG):
        for p in parent.glob(f".{glob_escape(final.name)}{tag}*"):
            pid = p.name[len(final.name) + 1 + len(tag) :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def check_folder_path(path: str | os.PathLike, allow_file: bool = False) -> Path:
    """Refuse an output path under an existing file, or (unless ``allow_file``) that is one."""
    path = Path(path)
    for ancestor in list(path.parents)[::-1]:
        if ancestor.exists() and not ancestor.is_dir():
            raise MetaTTError(f"output {path} lies under {ancestor}, which is a file, not a folder; choose another path")
    if not allow_file and path.exists() and not path.is_dir():
        raise MetaTTError(f"output {path} is a file, not a folder; choose another path")
    return path


def check_writable(path: str | os.PathLike, force: bool, *, marker: str | None = None, kind: str = "folder") -> Path:
    """Fail early, before any work, if ``path`` cannot or must not be written.

    Refused: an existing output without ``force``; a path under an existing file; a location the
    user cannot write to. With ``force`` and ``marker`` (the file every output of the calling
    command holds, e.g. ``metatt_merge.json``), only a previous output of that command, or an
    empty folder, is replaced: never an unrelated folder or file (``kind="file"`` outputs replace a
    file, never a folder).
    """
    path = check_folder_path(path, allow_file=True)
    if path.exists() or path.is_symlink():
        if not force:
            raise MetaTTError(f"output {path} already exists; choose another path or pass --force to replace it")
        if kind == "file" and path.is_dir():
            raise MetaTTError(f"output {path} is a folder, not a file; choose a file path")
        if kind == "folder" and marker is not None:
            if not path.is_dir():
                raise MetaTTError(f"output {path} is a file, not a folder; --force replaces only a previous output, choose another path")
            if any(path.iterdir()) and not (path / marker).is_file():
                raise MetaTTError(
                    f"output {path} is a folder this command did not write (no {marker}); --force replaces only a previous "
                    "output, so choose another path or empty it"
                )
    existing = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise MetaTTError(f"cannot write {path}: {existing} is not writable; choose another location")
    return path


def check_separate(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "output") -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs.

    Writing there would replace or delete the inputs (``merge A -o A --force`` used to replace the
    adapter by its merge). Paths are compared resolved, so symlinks and ``..`` do not hide it.
    """
    out = Path(output).resolve()
    for item in inputs:
        if item is None or not Path(item).exists():
            continue
        src = Path(item).resolve()
        if out == src or src in out.parents or out in src.parents:
            relation = "is" if out == src else "lies inside" if src in out.parents else "contains"
            raise MetaTTError(f"{what} {output} {relation} the input {item}; write the output somewhere else")


def _os_error(e: OSError, path: Path) -> MetaTTError:
    return MetaTTError(f"cannot write {path} ({e.strerror or e}); choose a writable location with free space")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False, *, marker: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``path`` when the block succeeds.

    The temporary is named ``.NAME.tmp-PID-XXXX`` beside ``path``; those of dead processes are
    removed first. The finished folder gets the umask's mode, like a plain ``mkdir``.
    """
    final = check_writable(path, force, marker=marker)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_TAG}{os.getpid()}-", dir=final.parent))
    except OSError as e:
        raise _os_error(e, final) from None
    try:
        yield tmp
        follow_umask(tmp, directory=True)
        if final.exists() or final.is_symlink():
            old = final.with_name(f".{final.name}{OLD_TAG}{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename (mode from the umask)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}{os.getpid()}-", dir=path.parent)
    except OSError as e:
        raise _os_error(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file a user handed in; a missing or corrupt file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise MetaTTError(f"{what} not found: {path}; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetaTTError(f"{what} {path} is not valid JSON ({e}); re-create it") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (model files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: ``.NAME.lock`` beside it (it must outlive a --force rmtree)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold ``path`` for this process: a lock file with the owner's PID and host beside it.

    A second process asking for the same output fails at once with the owner's PID, instead of
    both writing into one folder. A lock left by a dead process (kill -9) is detected by its PID,
    reported on stderr and taken over, so an interrupted run resumes without manual cleanup.
    """
    lock = lock_path(check_folder_path(path, allow_file=True))
    host = socket.gethostname()
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, lock) from None
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None or owner[1] != host or _pid_alive(owner[0]):
                who = f"process {owner[0]} on {owner[1]}" if owner else "an unknown process"
                raise MetaTTError(
                    f"{what} {path} is in use by {who} (lock {lock}); wait for it to finish or choose another output"
                    + ("" if owner else ", or delete the lock file if no run is active")
                ) from None
            sys.stderr.write(f"note: removed the stale lock {lock} of process {owner[0]}, which no longer runs\n")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        except OSError as e:
            raise _os_error(e, lock) from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}\n")
        break
    else:
        raise MetaTTError(f"could not take the lock {lock}; another process keeps replacing it, try again")
    try:
        yield lock
    finally:
        if _lock_owner(lock) == (os.getpid(), host):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _lock_owner(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None when it is unreadable or not in that form."""
    try:
        pid, host = lock.read_text(encoding="utf-8").split()
        return int(pid), host
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def check_utf8(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse a text input that is not UTF-8 (binary, Latin-1, ...), naming the first bad byte.

    Readers downstream (Arrow, tokenizers) either fail with a traceback or read it wrongly.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                offset += len(block)
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        at = offset - len(e.object) + e.start  # e.object: the bytes still pending plus this block
        raise MetaTTError(f"{what} {path} is not UTF-8 text (byte {at}); save it as UTF-8") from None
    except OSError as e:
        raise MetaTTError(f"cannot read {what} {path} ({e.strerror or e}); check the path") from None


def jsonl_objects(lines: Iterable[str], name: str) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of JSON Lines ``name``.

    A line that is not JSON, or not a JSON object, is a one-line error naming the line.
    """
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetaTTError(f"line {n} of {name} is not valid JSON ({e.msg}, column {e.colno}); fix that line") from None
        if not isinstance(obj, dict):
            raise MetaTTError(f"line {n} of {name} is not a JSON object; write one object per line") from None
        yield n, obj
