"""metatt_deploy.common.files: outputs appear whole or not at all, and never replace without force."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from metatt_deploy.common import files as atomic
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_separate,
    check_utf8,
    check_writable,
    clean_stale_temporaries,
    lock_path,
    output_lock,
    read_json,
)


def listing(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_check_writable(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "new", force=False) == tmp_path / "new"
    (tmp_path / "old").mkdir()
    with pytest.raises(MetaTTError, match=r"already exists; choose another path or pass --force"):
        check_writable(tmp_path / "old", force=False)
    assert check_writable(tmp_path / "old", force=True) == tmp_path / "old"


def test_atomic_dir_success_creates_parents_and_leaves_nothing_else(tmp_path: Path) -> None:
    final = tmp_path / "a" / "b" / "out"
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".out.tmp-")
        assert not final.exists()  # nothing visible until the block succeeds
        (tmp / "x.txt").write_text("hello")
    assert (final / "x.txt").read_text() == "hello"
    assert listing(final.parent) == ["out"]


def test_atomic_dir_refuses_existing_without_force_before_running(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep").write_text("old")
    ran = False
    with pytest.raises(MetaTTError, match="already exists"), atomic_dir(final):
        ran = True
    assert not ran
    assert (final / "keep").read_text() == "old" and listing(tmp_path) == ["out"]


def test_atomic_dir_force_replaces_directory_and_file(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale").write_text("old")
    with atomic_dir(final, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert listing(final) == ["new"] and listing(tmp_path) == ["out"]
    target = tmp_path / "file"
    target.write_text("a plain file")
    with atomic_dir(target, force=True) as tmp:
        (tmp / "inside").write_text("x")
    assert target.is_dir() and listing(target) == ["inside"]
    assert listing(tmp_path) == ["file", "out"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_failure_leaves_old_output_or_nothing(tmp_path: Path, exc: BaseException) -> None:
    final = tmp_path / "out"
    with pytest.raises(type(exc)), atomic_dir(final) as tmp:
        (tmp / "half").write_text("partial")
        raise exc
    assert listing(tmp_path) == []
    final.mkdir()
    (final / "keep").write_text("old")
    with pytest.raises(type(exc)), atomic_dir(final, force=True) as tmp:
        (tmp / "half").write_text("partial")
        raise exc
    assert listing(final) == ["keep"] and listing(tmp_path) == ["out"]


def test_atomic_write_bytes_text_json(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2], "b": "x"})
    text = (tmp_path / "j.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": "x"} and text.endswith("\n")
    atomic_write_text(tmp_path / "t.txt", "replaced")  # files are replaced (callers check force)
    assert (tmp_path / "t.txt").read_text() == "replaced"
    assert listing(tmp_path) == ["j.json", "sub", "t.txt"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(path, "new")
    monkeypatch.setattr(atomic.os, "replace", os.replace)
    assert path.read_text() == "old" and listing(tmp_path) == ["f.txt"]


def test_read_json(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "ok.json", {"x": 1})
    assert read_json(tmp_path / "ok.json", "thing") == {"x": 1}
    with pytest.raises(MetaTTError, match=r"thing not found: .*missing.json; check the path"):
        read_json(tmp_path / "missing.json", "thing")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(MetaTTError, match=r"thing .*bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json", "thing")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(MetaTTError, match="not valid JSON"):
        read_json(tmp_path / "bin.json", "thing")


# ------------------------------------------------------------------ issue 10: inputs, force, modes, litter, locks


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_check_separate_refuses_outputs_that_are_in_or_around_inputs(tmp_path: Path) -> None:
    adapter = tmp_path / "runs" / "best"
    adapter.mkdir(parents=True)
    (adapter / "w").write_text("x")
    for out, relation in ((adapter, "is"), (adapter / "merged", "lies inside"), (tmp_path / "runs", "contains")):
        with pytest.raises(MetaTTError, match=f"output .* {relation} the input"):
            check_separate(out, [adapter])
    with pytest.raises(MetaTTError, match="is the input"):
        check_separate(tmp_path / "runs" / ".." / "runs" / "best", [adapter])  # resolved, not compared as text
    check_separate(tmp_path / "elsewhere", [adapter, None, tmp_path / "missing"])
    assert (adapter / "w").read_text() == "x"


def test_force_replaces_only_a_previous_output_of_the_same_command(tmp_path: Path) -> None:
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_text("meow")
    with pytest.raises(MetaTTError, match="did not write .*no metatt_merge.json"):
        check_writable(unrelated, force=True, marker="metatt_merge.json")
    with pytest.raises(MetaTTError, match="did not write"), atomic_dir(unrelated, force=True, marker="metatt_merge.json"):
        pass
    assert (unrelated / "cat.jpg").read_text() == "meow"
    (unrelated / "metatt_merge.json").write_text("{}")  # a previous output: replaced whole
    with atomic_dir(unrelated, force=True, marker="metatt_merge.json") as tmp:
        (tmp / "new").write_text("n")
    assert listing(unrelated) == ["new"]
    empty = tmp_path / "empty"
    empty.mkdir()
    check_writable(empty, force=True, marker="metatt_merge.json")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(MetaTTError, match="is a file, not a folder"):
        check_writable(a_file, force=True, marker="metatt_merge.json")
    with pytest.raises(MetaTTError, match="lies under .*notes.txt, which is a file"):
        check_writable(a_file / "sub" / "out", force=True)
    with pytest.raises(MetaTTError, match="is a folder, not a file"):
        check_writable(empty, force=True, kind="file")
    assert a_file.read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_location_is_refused_before_work(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(MetaTTError, match="not writable"):
        check_writable(ro / "out", force=False)


def test_os_errors_while_creating_outputs_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", denied)
    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    with pytest.raises(MetaTTError, match="cannot write .*Permission denied"), atomic_dir(tmp_path / "out"):
        pass
    with pytest.raises(MetaTTError, match="cannot write .*Permission denied"):
        atomic_write_text(tmp_path / "f.txt", "x")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "plain").write_text("x")
        atomic_write_text(tmp_path / "out" / "atomic.txt", "y")
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "out") == 0o777 & ~umask
    assert mode(tmp_path / "out" / "atomic.txt") == mode(tmp_path / "out" / "plain") == 0o666 & ~umask


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    gone, alive = dead_pid(), os.getpid()
    stale = tmp_path / f".out.tmp-{gone}-abc"
    stale.mkdir()
    (stale / "half").write_text("partial")
    (tmp_path / f".out.old-{gone}").mkdir()
    (tmp_path / f".out.tmp-{gone}-merge-xyz").mkdir()
    live = tmp_path / f".out.tmp-{alive}-def"  # a run in progress: left alone
    live.mkdir()
    legacy = tmp_path / ".out.tmp-k3j2h1"  # no PID (older versions): cannot tell, left alone
    legacy.mkdir()
    other = tmp_path / f".other.tmp-{gone}-abc"  # another output's: cleaned when that output is written
    other.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert listing(tmp_path) == sorted([live.name, legacy.name, other.name, "out"])
    assert clean_stale_temporaries(tmp_path / "other") == [other]


def test_output_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    with output_lock(out) as lock:
        assert lock == lock_path(out) and lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(MetaTTError, match=f"in use by process {os.getpid()}"), output_lock(out):
            pass
    assert not lock_path(out).exists()  # released
    lock_path(out).write_text(f"{dead_pid()} {__import__('socket').gethostname()}\n")
    with output_lock(out):
        pass
    assert "removed the stale lock" in capsys.readouterr().err
    lock_path(out).write_text("garbage")
    with pytest.raises(MetaTTError, match="unknown process.*delete the lock file"), output_lock(out):
        pass


def test_check_utf8(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("héllo ✓", encoding="utf-8")
    check_utf8(tmp_path / "ok.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(MetaTTError, match=r"not UTF-8 text \(byte 3\)"):
        check_utf8(tmp_path / "latin1.txt", "data file")
    (tmp_path / "bin").write_bytes(bytes(range(256)))
    with pytest.raises(MetaTTError, match="not UTF-8"):
        check_utf8(tmp_path / "bin")
