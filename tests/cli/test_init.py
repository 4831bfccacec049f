"""cli/__init__.py: usage errors (an option value that does not parse, an unknown option or verb, a missing argument)
are one ``error:`` line and exit 2, as every user error (click's own are three lines)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from metatt_deploy.cli import app


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["generate", "x", "--top-k", "1e-9"], "Invalid value for '--top-k'"),
        (["export", "--bogus"], "No such option: --bogus"),
        (["generate"], "Missing argument"),
        (["nosuch"], "No such command 'nosuch'"),
        (["train", "--max-steps", "nan"], "Invalid value for '--max-steps'"),
    ],
)
def test_usage_errors_are_one_error_line_and_exit_2(argv: list[str], words: str) -> None:
    result = CliRunner().invoke(app, argv)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, lines)
    assert lines[0].startswith("error: ") and words in lines[0] and "--help" in lines[0], lines
