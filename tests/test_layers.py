"""The package's structure holds: no private names imported across modules, no import hidden
in a function to dodge a cycle, and every stage a documented subpackage.

(`lint-imports` in `make test` checks the direction of imports between stages.)
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metatt_deploy"
STAGES = ("common", "inference", "tt", "adapters", "training", "export", "serving", "cli")
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> list[tuple[ast.ImportFrom, bool]]:
    """(import-from node, inside a function?) for every ``from metatt_deploy... import``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("metatt_deploy"):
                found.append((child, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_across_modules(path: Path) -> None:
    private = [
        f"{node.module}.{alias.name}"
        for node, _ in _imports(path)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not private, f"{path.name} imports private names {private}: make them public or move the code"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_imports_sit_at_module_top(path: Path) -> None:
    hidden = [node.module for node, in_function in _imports(path) if in_function]
    assert not hidden, f"{path.name} imports {hidden} inside a function: import at the top (stages import only downward)"


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_is_a_documented_subpackage(stage: str) -> None:
    module = importlib.import_module(f"metatt_deploy.{stage}")
    assert module.__doc__ and len(module.__doc__.split()) >= 20, f"metatt_deploy/{stage}/__init__.py needs a paragraph saying what it owns"
