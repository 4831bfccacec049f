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
    check_writable,
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
