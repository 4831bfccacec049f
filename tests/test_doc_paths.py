"""Every repository path the documentation names exists: module and test paths written in
backticks (`metatt_deploy/...`, `tests/...`, `tools/...`) and relative markdown links.

The restructure moved most modules; pages that still pointed at the old flat layout sent
readers to files that were gone. This keeps them honest after the next move.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "exported" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_PATH = re.compile(r"\b((?:metatt_deploy|tests|tools)/[A-Za-z0-9_/.-]+\.(?:py|md|json|sh))\b")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _named_paths(page: Path) -> list[tuple[str, Path]]:
    text = page.read_text()
    named = [(p, ROOT / p) for p in REPO_PATH.findall(text)]
    named += [(link, page.parent / link) for link in LINK.findall(text) if "://" not in link and not link.startswith("mailto:")]
    return named


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_named_in_the_docs_exist(page: Path) -> None:
    missing = sorted({name for name, path in _named_paths(page) if not path.exists()})
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"
