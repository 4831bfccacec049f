"""Every repository path the documentation names exists: paths written out (`metatt_deploy/...`,
`tests/...`, `tools/...`, `docs/...`) and relative markdown links in the pages, the same paths in
the docstrings of the package and the tools, in the shell tools and in the Makefile; and every
measurement report under docs/reports/ is linked from a guide (or the README).

The restructure moved most modules, and later the reports and the research scripts; pages and
docstrings that still pointed at the old flat layout sent readers to files that were gone. This
keeps them honest after the next move.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REPORTS = DOCS / "reports"
GUIDES = sorted(DOCS.glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "exported" / "README.md", ROOT / "tools" / "README.md", *GUIDES, *sorted(REPORTS.glob("*.md"))]
SOURCES = sorted([*(ROOT / "metatt_deploy").rglob("*.py"), *(ROOT / "tools").rglob("*.py")])
# text files read whole: their comments are their documentation
SCRIPTS = [ROOT / "Makefile", *sorted((ROOT / "tools").rglob("*.sh"))]
REPO_PATH = re.compile(r"(?<![\w/.-])((?:metatt_deploy|tests|tools|docs)/[A-Za-z0-9_/.-]+\.(?:py|md|json|sh|png))\b")
# a dotted name in prose or code spans: `metatt_deploy.to_peft`, `metatt_deploy.inference.decode`
DOTTED = re.compile(r"(?<![\w/.])metatt_deploy(?:\.\w+)+")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _missing(text: str) -> list[str]:
    return sorted({p for p in REPO_PATH.findall(text) if not (ROOT / p).exists()})


def _docstrings(source: Path) -> str:
    """The module's, classes' and functions' docstrings, where a file path is a pointer for the reader."""
    tree = ast.parse(source.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
    return "\n".join(doc for n in nodes if (doc := ast.get_docstring(n)))


def _named_paths(page: Path) -> list[tuple[str, Path]]:
    text = page.read_text()
    named = [(p, ROOT / p) for p in REPO_PATH.findall(text)]
    named += [(link, page.parent / link) for link in LINK.findall(text) if "://" not in link and not link.startswith("mailto:")]
    return named


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_paths_named_in_the_docs_exist(page: Path) -> None:
    missing = sorted({name for name, path in _named_paths(page) if not path.exists()})
    assert not missing, f"{_rel(page)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("source", SOURCES, ids=_rel)
def test_paths_named_in_docstrings_exist(source: Path) -> None:
    missing = _missing(_docstrings(source))
    assert not missing, f"docstrings in {_rel(source)} name paths that do not exist: {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=_rel)
def test_paths_named_in_the_makefile_and_shell_tools_exist(script: Path) -> None:
    missing = _missing(script.read_text())
    assert not missing, f"{_rel(script)} names paths that do not exist: {missing}"


def _resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` is a module, or an attribute of the longest module prefix that imports."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_dotted_names_in_the_docs_resolve(page: Path) -> None:
    """`metatt_deploy.x.y` in a page is a module or a name a reader can import (the API moved once already)."""
    stale = sorted({name for name in DOTTED.findall(page.read_text()) if not _resolves(name)})
    assert not stale, f"{_rel(page)} names modules or attributes that do not exist: {stale}"


def test_every_report_is_linked_from_a_guide() -> None:
    """A report nobody links to is a measurement nobody finds: each backs a guide, which says so."""
    linked = {(page.parent / link).resolve() for page in [ROOT / "README.md", *GUIDES] for link in LINK.findall(page.read_text())}
    orphans = sorted(_rel(r) for r in REPORTS.glob("*.md") if r.resolve() not in linked)
    assert not orphans, f"reports linked from no guide in docs/ (nor the README): {orphans}"


def test_the_checks_see_a_missing_path(tmp_path: Path) -> None:
    """The checks above pass on an empty match too; this proves the extraction finds paths at all."""
    source = tmp_path / "m.py"
    source.write_text('"""See docs/reports/no-such-report.md."""\n\n\ndef f() -> None:\n    """And tools/experiments/gone.py."""\n')
    assert _missing(_docstrings(source)) == ["docs/reports/no-such-report.md", "tools/experiments/gone.py"]
    assert _missing("see metatt_deploy/cli/run.py and docs/reports/latency.md") == []
    assert DOTTED.findall("`metatt_deploy.to_peft(x)` and metatt_deploy.peft_export.to_peft.") == [
        "metatt_deploy.to_peft",
        "metatt_deploy.peft_export.to_peft",
    ]
    assert _resolves("metatt_deploy.to_peft") and _resolves("metatt_deploy.inference.decode")
    assert not _resolves("metatt_deploy.peft_export.to_peft") and not _resolves("metatt_deploy.data.load_task")
