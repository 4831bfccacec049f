"""Fuzzing the CLI with corrupted inputs: never a traceback, never a changed input, never half an output.

A seeded generator (reproducible; ``METATT_FUZZ_SEED`` picks another run) corrupts adapter
configs, safetensors headers and data, export manifests, bundle.json, task records and task
files, and data and input files, then runs train / merge / export / validate / predict on them
in-process (typer's CliRunner). Every case must end with:

- exit status 0 or 2 (a MetaTTError), never 1 (an uncaught exception);
- for exit 2, exactly one line on stderr, starting with ``error:``; no ``Traceback`` anywhere;
- every input file byte-identical afterwards (the pristine copies are hashed before and after);
- nothing at the output path unless the command succeeded (validate may leave its report after a
  parity failure, which its message names).

Tiny models only (a 2-layer width-32 BERT with the embedded tokenizer).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fuzzing import SEED, CliCases, corrupt_json_file, corrupt_jsonl, corrupt_safetensors, snapshot
from onnx_fixtures import build_tiny

from metatt_deploy.adapters.base_model import load_classifier, load_tokenizer
from metatt_deploy.adapters.config import CONFIG_NAME, WEIGHTS_NAME
from metatt_deploy.adapters.multitask import build_multitask, save_multitask
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.inference.formats import BUNDLE_JSON, MANIFEST_NAME, SHARED_FILE, TASKS_DIR

# cases per (command, corrupted input); 205 in all
PLAN = {
    ("merge", "config"): 40,
    ("merge", "weights"): 25,
    ("peft", "config"): 10,
    ("export", "config"): 8,
    ("validate", "config"): 12,
    ("validate", "manifest"): 12,
    ("validate", "data"): 12,
    ("predict", "bundle"): 16,
    ("predict", "record"): 16,
    ("predict", "task_weights"): 12,
    ("predict", "input"): 12,
    ("train", "data"): 30,
}
ROWS = [
    {"text": f"this was {w} today", "label": "positive" if w in ("good", "great", "fine") else "negative"}
    for w in ("good", "bad", "great", "awful", "fine", "poor")
]


@dataclass
class World:
    root: Path
    base: Path
    adapter: Path
    merged: Path
    export: Path
    bundle: Path
    data: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("fuzz")
    tiny = build_tiny(root)
    export = export_onnx(tiny.merged, root / "export")
    labels = {"movie": ["negative", "positive"], "nli": ["entailment", "neutral", "contradiction"]}
    model = load_classifier(str(tiny.base), labels["movie"])
    mtm = build_multitask(model, list(labels), labels, rank=3, base_model=str(tiny.base))
    with torch.no_grad():
        for p in mtm.metatt.cores:
            p.normal_(0, 0.3)
    multi = save_multitask(mtm, root / "multi", load_tokenizer(str(tiny.base)))
    bundle = root / "bundle"
    write_bundle(multi, bundle)
    data = root / "data"
    data.mkdir()
    for name, rows in (("train", ROWS), ("validation", ROWS[:4]), ("input", [{"text": r["text"], "task": "movie"} for r in ROWS[:3]])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return World(root, tiny.base, tiny.adapter, tiny.merged, export, bundle, data)


# ---------------------------------------------------------------- cases


def case(world: World, rng: random.Random, command: str, target: str, work: Path) -> tuple[list[str], Path, list[Path]]:
    """Copy the inputs into ``work``, corrupt one, and return (argv, output path, input roots)."""
    out = work / "out"
    if command in ("merge", "peft", "export", "validate"):
        adapter = Path(shutil.copytree(world.adapter, work / "adapter"))
        export = Path(shutil.copytree(world.export, work / "export"))
        data = Path(shutil.copy(world.data / "train.jsonl", work / "held_out.jsonl"))
        if target == "config":
            corrupt_json_file(rng, adapter / CONFIG_NAME)
        elif target == "weights":
            corrupt_safetensors(rng, adapter / WEIGHTS_NAME)
        elif target == "manifest":
            corrupt_json_file(rng, export / MANIFEST_NAME)
        elif target == "data":
            corrupt_jsonl(rng, data)
        argv = {
            "merge": ["merge", str(adapter), "-o", str(out)],
            "peft": ["merge", str(adapter), "-o", str(out), "--to", "peft"],
            "export": ["export", str(adapter), "-o", str(out)],
            "validate": ["validate", str(adapter), str(export), "--data", str(data), "-o", str(out)]
            + ["--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--seq-len", "16", "--max-seconds", "0.05"],
        }[command]
        return argv, out, [adapter, export, data]
    if command == "predict":
        bundle = Path(shutil.copytree(world.bundle, work / "bundle"))
        inputs = Path(shutil.copy(world.data / "input.jsonl", work / "input.jsonl"))
        if target == "bundle":
            corrupt_json_file(rng, bundle / BUNDLE_JSON)
        elif target == "record":
            corrupt_json_file(rng, rng.choice(sorted((bundle / TASKS_DIR).glob("*.json"))))
        elif target == "task_weights":
            corrupt_safetensors(rng, rng.choice([*sorted((bundle / TASKS_DIR).glob("*.safetensors")), bundle / SHARED_FILE]))
        else:
            corrupt_jsonl(rng, inputs)
        return ["predict", str(bundle), "--input", str(inputs), "-o", str(out), "--threads", "1"], out, [bundle, inputs]
    train = Path(shutil.copy(world.data / "train.jsonl", work / "train.jsonl"))
    validation = Path(shutil.copy(world.data / "validation.jsonl", work / "validation.jsonl"))
    corrupt_jsonl(rng, rng.choice([train, validation]))
    argv = ["train", "--train", str(train), "--validation", str(validation), "--model", str(world.base), "-o", str(out)]
    argv += ["--epochs", "1", "--max-steps", "1", "--batch-size", "4", "--rank", "2"]
    return argv, out, [train, validation]


def test_corrupted_inputs_never_crash_change_inputs_or_leave_outputs(world: World, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    cases = CliCases()
    shared = snapshot(world.base, world.adapter, world.export, world.bundle, world.data)
    for (command, target), count in PLAN.items():
        for _ in range(count):
            work = tmp_path / f"case{cases.n + 1}"
            work.mkdir()
            argv, out, inputs = case(world, rng, command, target, work)
            # validate may leave its report after a parity failure, which its message names
            cases.run(argv, out, inputs, f"{command} {target}", may_leave=lambda r, c=command: c == "validate" and "report in" in r.stderr)
            shutil.rmtree(work)
    cases.check(at_least=200)
    assert snapshot(world.base, world.adapter, world.export, world.bundle, world.data) == shared
    # the corruptions are not all caught the same way: some commands still succeed, most fail cleanly
    assert sum(v for (_, code), v in cases.outcomes.items() if code == 2) > cases.n // 2, cases.outcomes
