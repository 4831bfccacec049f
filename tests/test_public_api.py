"""metatt_deploy/__init__.py: the public API resolves, stays torch-free on its runtime side, and is
what the user tools in tools/ import.

The names resolve lazily (PEP 562), so nothing but a test notices when one points at a module
that moved, or when a runtime name starts pulling in torch (the runtime-only install has none).
The tools are the package's first users: one that reaches into internals breaks silently when
they move, so each such import is named, with its reason, in the tool's docstring.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import metatt_deploy

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "api.md"
TRAINING_STACK = ("torch", "transformers", "datasets", "optimum", "peft", "accelerate")
# imports a tool may make below the public API without saying why: the report writers every
# measurement tool shares (atomic writes, markdown tables, figures), which are no user-facing API
REPORT_HELPERS = {"metatt_deploy.common.files", "metatt_deploy.common.report"}
USER_TOOLS = sorted((ROOT / "tools").glob("*.py"))
# a docstring line "- metatt_deploy.x.y: why" names an internal module the tool imports, and why
INTERNAL_NOTE = re.compile(r"^\s*- (metatt_deploy(?:\.\w+)+): \S", re.MULTILINE)


def _run(code: str) -> dict:
    """What ``code`` prints as JSON in a fresh interpreter (this checkout first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def _documented() -> dict[str, dict[str, list[str]]]:
    """docs/api.md's tables, per section (runtime, train): name -> the modules its row says define it.

    The page is the reference the package is checked against: a name added without its row, a row
    without its name, or a name the lazy table points at the wrong module fails.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in API_PAGE.read_text().splitlines():
        if line.startswith("## "):
            section = "runtime" if "(runtime)" in line else "train" if "(train)" in line else ""
        elif section and line.startswith("| `"):
            cells = line.split(" | ")
            modules = [m.replace("/", ".") for m in re.findall(r"`(metatt_deploy/[\w/]+)\.py`", cells[-1])]
            for name in re.findall(r"`(\w+)", cells[0]):
                sections.setdefault(section, {})[name] = modules
    return sections


def test_the_public_names_are_the_documented_ones_and_resolve_to_their_modules() -> None:
    documented = _documented()
    assert set(documented) == {"runtime", "train"}
    rows = {**documented["runtime"], **documented["train"]}
    assert sorted(metatt_deploy.__all__) == sorted(["__version__", *rows])
    for name, modules in rows.items():
        defined = [m for m in modules if getattr(importlib.import_module(m), name, None) is getattr(metatt_deploy, name)]
        assert defined, f"metatt_deploy.{name} is not the {name} of {modules}, where docs/api.md says it lives"
    assert set(rows) <= set(dir(metatt_deploy))
    with pytest.raises(AttributeError, match="no attribute 'Runtimes'"):
        metatt_deploy.Runtimes  # noqa: B018  (a typo is an AttributeError, not an import of something else)
    from metatt_deploy import Runtime, train  # the form docs/api.md shows

    assert Runtime is importlib.import_module("metatt_deploy.serving.runtime").Runtime
    assert train is importlib.import_module("metatt_deploy.training.single").train


def test_the_runtime_names_import_no_training_stack() -> None:
    """``import metatt_deploy`` imports no subpackage; every runtime name loads only the torch-free floor."""
    probe = (
        "import json, sys\n"
        "import metatt_deploy\n"
        "bare = sorted(m for m in sys.modules if m.startswith('metatt_deploy.'))\n"
        f"for name in {sorted(_documented()['runtime'])!r}: getattr(metatt_deploy, name)\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_STACK!r})\n"
        "stages = sorted(m for m in sys.modules if m.split('.')[:2] in "
        "[['metatt_deploy', s] for s in ('training', 'export', 'adapters', 'tt', 'cli')])\n"
        "metatt_deploy.train\n"  # the control: a training name does import torch, so the probe can see it
        "print(json.dumps({'bare': bare, 'heavy': heavy, 'stages': stages, 'torch_after_train': 'torch' in sys.modules}))\n"
    )
    seen = _run(probe)
    assert seen["bare"] == []
    assert seen["heavy"] == [] and seen["stages"] == [], seen
    assert seen["torch_after_train"]


def test_without_the_training_stack_runtime_names_work_and_training_names_say_which_extra() -> None:
    """The runtime-only install, simulated: torch and friends cannot be imported at all."""
    probe = (
        "import importlib.abc, json, sys\n"
        "class NoTrainingStack(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {TRAINING_STACK!r}: raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)\n"
        "sys.meta_path.insert(0, NoTrainingStack())\n"
        "import metatt_deploy\n"
        f"found = [n for n in {sorted(_documented()['runtime'])!r} if getattr(metatt_deploy, n) is not None]\n"
        "try:\n"
        "    from metatt_deploy import train\n"
        "    error = None\n"
        "except ModuleNotFoundError as e:\n"
        "    error = str(e)\n"
        "print(json.dumps({'found': found, 'error': error}))\n"
    )
    seen = _run(probe)
    assert seen["found"] == sorted(_documented()["runtime"])
    assert re.fullmatch(
        r"metatt_deploy\.train needs the training stack \((\w+) is not installed\): pip install 'metatt-deploy\[train\]'",
        seen["error"] or "",
    )
    assert re.match(r".*\((\w+) is", seen["error"]).group(1) in TRAINING_STACK


def _package_imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import from metatt_deploy anywhere in the file, functions included;
    ``from metatt_deploy.tt import cores`` counts as an import of the module metatt_deploy.tt.cores."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "metatt_deploy":
            module = node.module or ""
            folder = ROOT.joinpath(*module.split("."))
            submodules = [a.name for a in node.names if (folder / f"{a.name}.py").exists() or (folder / a.name / "__init__.py").exists()]
            found += [(f"{module}.{name}", []) for name in submodules]
            names = [a.name for a in node.names if a.name not in submodules]
            if names:
                found.append((module, names))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "metatt_deploy"]
    return found


@pytest.mark.parametrize("tool", USER_TOOLS, ids=lambda p: p.name)
def test_user_tools_import_the_public_api_or_say_why_not(tool: Path) -> None:
    tree = ast.parse(tool.read_text())
    explained = set(INTERNAL_NOTE.findall(ast.get_docstring(tree) or ""))
    imports = _package_imports(tree)
    not_public = [
        f"metatt_deploy.{n}" for module, names in imports if module == "metatt_deploy" for n in names if n not in metatt_deploy.__all__
    ]
    assert not not_public, f"{tool.name} imports {not_public}, which the public API does not have"
    internal = {module for module, _ in imports if module != "metatt_deploy"} - REPORT_HELPERS
    unexplained = sorted(internal - explained)
    assert not unexplained, (
        f"{tool.name} imports {unexplained} below the public API: use `from metatt_deploy import ...`, or add a "
        "docstring line '- MODULE: why' saying what the public API lacks"
    )
    stale = sorted(explained - internal)
    assert not stale, f"{tool.name}'s docstring explains imports it no longer makes: {stale}"


def test_the_tool_check_sees_an_internal_import() -> None:
    """The check above passes on a tool without package imports too; this proves it finds them."""
    tree = ast.parse(
        '"""x\n\n- metatt_deploy.export.onnx_files: sizes\n"""\ndef f():\n    from metatt_deploy.export.onnx_files import model_bytes\n'
    )
    assert _package_imports(tree) == [("metatt_deploy.export.onnx_files", ["model_bytes"])]
    assert _package_imports(ast.parse("from metatt_deploy.tt import cores")) == [("metatt_deploy.tt.cores", [])]
    assert INTERNAL_NOTE.findall(ast.get_docstring(tree) or "") == ["metatt_deploy.export.onnx_files"]
