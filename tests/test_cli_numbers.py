"""Numeric options are checked before any work: NaN and infinities are one-line errors (exit 2) on every verb.

NaN compares false with every bound, so without an explicit finiteness check `--lr nan` would pass a
`lr <= 0` test and train on NaN; these cases fail before anything is loaded or written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from metatt_deploy.cli import app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["train", "--alpha", "inf"], "--alpha must be a finite number, got inf"),
        (["train", "--weight-decay", "-1"], "--weight-decay must be at least 0"),
        (["train", "--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
        (["train", "--task", "a=snli", "--task", "b=snli", "--temperature", "-inf"], "--temperature must be a finite number"),
        (["validate", "adapter", "export", "--max-seconds", "nan"], "--max-seconds must be a finite number"),
        (["predict", "export", "--text", "x", "--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bad_numbers_are_one_line_errors_before_any_work(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = ["-o", str(out)] if args[0] == "train" else []
    result = CliRunner().invoke(app, [*args, *extra])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()
