"""The README's "Using it" commands run as written, so the documentation cannot drift from the code.

Each line of the section's bash block is one `metatt-deploy` command; it runs through the CLI in
a scratch folder with the builtin data sets faked in METATT_DATA_DIR, the files it names
(my.jsonl, dev.jsonl) written there, and only these additions: train commands get a tiny base
model (`--model`) and a few steps; validate commands time fewer calls.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import sentiment_rows
from typer.testing import CliRunner

from metatt_deploy.cli import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from demo_summary import summary  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
FEWER_STEPS = ["--max-steps", "2", "--batch-size", "8", "--max-length", "32"]
FEWER_CALLS = ["--repeats", "3", "--warmup", "1", "--threads", "1"]


def using_it_commands() -> list[list[str]]:
    """The argument lists of the `metatt-deploy` lines in the first bash block of "## Using it"."""
    section = README.read_text().split("## Using it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's 'Using it' section lost its bash block"
    commands = []
    for line in block.group(1).splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] == ".":  # comments, blank lines, `. .venv/bin/activate`
            continue
        assert words[0] == "metatt-deploy", f"README command is not metatt-deploy: {line}"
        commands.append(words[1:])
    return commands


def test_the_block_covers_every_verb_and_kind_of_run() -> None:
    commands = using_it_commands()
    assert {c[0] for c in commands} == {"train", "merge", "export", "validate", "predict"}
    flat = [" ".join(c) for c in commands]
    assert any("--method lora" in c for c in flat) and any(c.startswith("validate runs/lora") for c in flat)
    assert any("--task " in c and c.startswith("validate") for c in flat)
    assert any(c.startswith("predict exported/") for c in flat) and any(c.startswith("predict runs/bundle") for c in flat)


def test_where_things_are_leads_from_each_capability_to_its_guide_code_and_tests() -> None:
    """Two steps from the README to any capability's code, test and doc: the table names all three
    per row (tests/test_doc_paths.py checks they exist), and no guide in docs/ is left out of it."""
    section = README.read_text().split("## Where things are", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and not line.startswith("| capability")]
    rows = [r for r in rows if not set(r[0]) <= set("|- ")]
    assert len(rows) >= 10
    for capability, guide, code, tests in rows:
        assert re.search(r"\]\((docs|tools)/", guide), f"{capability}: no guide"
        assert re.search(r"`(metatt_deploy|tools)/", code), f"{capability}: no code"
        assert re.search(r"`tests/", tests), f"{capability}: no tests"
    guides = {p.name for p in (README.parent / "docs").glob("*.md")}
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", section))
    assert guides <= linked, f"guides missing from README's 'Where things are': {sorted(guides - linked)}"


@pytest.mark.slow
def test_readme_using_it_commands_run(tmp_path, monkeypatch, tiny_base_128, fake_builtins) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METATT_DATA_DIR", str(fake_builtins))
    for name, n, offset in (("my.jsonl", 40, 0), ("dev.jsonl", 12, 100)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n, offset)))
    outputs = {}
    for args in using_it_commands():
        extra = {"train": ["--model", str(tiny_base_128), *FEWER_STEPS], "validate": FEWER_CALLS}.get(args[0], [])
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, f"metatt-deploy {shlex.join(args)}\n{result.output}"
        outputs[shlex.join(args[:2])] = result.output
    assert (tmp_path / "exported/mt/manifest.json").is_file() and (tmp_path / "exported/mt.validation.md").is_file()
    assert json.loads((tmp_path / "runs/mine/metrics.json").read_text())["task"] == "mine"
    assert json.loads((tmp_path / "exported/snli.validation.json").read_text())["task"] == "snli"
    assert json.loads((tmp_path / "exported/lora.validation.json").read_text())["method"] == "lora"
    rows = [json.loads(line) for line in outputs["predict exported/mt"].splitlines() if line.startswith("{")]
    assert [r["task"] for r in rows] == ["movie-sentiment"] * 2
    # `make demo`'s closing summary (tools/demo_summary.py) reads the same two reports these commands wrote
    report = json.loads((tmp_path / "exported/mt.validation.json").read_text())
    lines = summary(Path("runs/mt"), Path("exported/mt"))
    assert lines[0].startswith(f"accuracy: {json.loads((tmp_path / 'runs/mt/metrics.json').read_text())['test']['accuracy']:.4f} ")
    assert f"max |logit diff| {report['parity']['max_abs_logit_diff']:.2e}" in "\n".join(lines)
    assert sum(line.startswith("latency:  batch ") for line in lines) == len(report["latency"]["speedups"]) >= 1
    assert len(lines) <= 8 and lines[-1].startswith("files:    exported/mt/ ")
