"""Progress off a terminal: whole lines, never glued to log lines; a bar on a terminal."""

from __future__ import annotations

import io

import pytest

from metatt_deploy.common import report
from metatt_deploy.common.report import Progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_off_a_terminal_progress_prints_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    err, out = _Stream(False), _Stream(False)
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr("sys.stdout", out)
    now = [0.0]
    monkeypatch.setattr(report.time, "monotonic", lambda: now[0])
    progress = Progress(4, 0, "train metatt-4d", unit="steps")
    now[0] = 1.0
    progress.update(1)  # 1 s after the last line: none
    progress.set_postfix(loss="0.5000", epoch=1)
    now[0] = 40.0
    progress.update(1)  # 40 s: a line
    progress.write("epoch 1: accuracy 0.9550")
    now[0] = 42.0
    progress.update(2)
    progress.close()
    assert "\r" not in err.getvalue()
    assert err.getvalue().splitlines() == [
        "train metatt-4d: 0/4 steps (0%), 0 s",
        "train metatt-4d: 2/4 steps (50%), 40 s, loss=0.5000, epoch=1",
        "train metatt-4d: 4/4 steps (100%), 42 s, loss=0.5000, epoch=1",
    ]
    assert out.getvalue() == "epoch 1: accuracy 0.9550\n"


def test_disabled_progress_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    err, out = _Stream(False), _Stream(False)
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr("sys.stdout", out)
    progress = Progress(3, 0, "x", enabled=False)
    progress.update(3)
    progress.write("epoch 1")
    progress.close()
    assert err.getvalue() == out.getvalue() == ""


def test_on_a_terminal_log_lines_clear_the_bar_first(monkeypatch: pytest.MonkeyPatch) -> None:
    err, out = _Stream(True), _Stream(False)
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr("sys.stdout", out)
    progress = Progress(3, 0, "train")
    assert progress._bar is not None
    progress.update(1)
    progress.write("epoch 1: accuracy 0.9")
    progress.close()
    assert out.getvalue() == "epoch 1: accuracy 0.9\n"  # on its own line, not after the bar's text
