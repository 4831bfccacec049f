"""Numeric options of validate and predict are checked before any work: NaN and infinities are one-line errors (exit 2).

NaN compares false with every bound, so each check asks for a finite number first. (train's options are
checked by its configs: tests/training/test_loop.py; serve's: tests/serving/test_server.py; generate's
sampling parameters: tests/inference/test_decode.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from metatt_deploy.cli import app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["validate", "adapter", "export", "--max-seconds", "nan"], "--max-seconds must be a finite number"),
        (["predict", "export", "--text", "x", "--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bad_numbers_are_one_line_errors_before_any_work(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()
