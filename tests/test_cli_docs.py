"""docs/cli.md is generated from the CLI; it must not drift from the options the code has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_matches_the_code(tmp_path: Path) -> None:
    out = tmp_path / "cli.md"
    subprocess.run(
        [sys.executable, "-m", "typer", "metatt_deploy.cli", "utils", "docs", "--name", "metatt-deploy", "--output", str(out)],
        check=True,
        capture_output=True,
    )
    committed = DOC.read_text().splitlines()
    assert committed[0].startswith("<!-- generated:"), "docs/cli.md lost its 'generated' header"
    assert committed[1:] == out.read_text().splitlines(), "docs/cli.md is stale; regenerate it with: make cli-docs"
