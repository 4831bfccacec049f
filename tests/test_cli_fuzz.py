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

import hashlib
import json
import math
import os
import random
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from onnx_fixtures import build_tiny
from typer.testing import CliRunner

from metatt_deploy.adapters import model as mt
from metatt_deploy.adapters.base_model import load_tokenizer
from metatt_deploy.adapters.config import CONFIG_NAME, WEIGHTS_NAME
from metatt_deploy.adapters.multitask import build_multitask, save_multitask
from metatt_deploy.cli import app
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.inference.formats import BUNDLE_JSON, MANIFEST_NAME, SHARED_FILE, TASKS_DIR

SEED = int(os.environ.get("METATT_FUZZ_SEED", "0"))
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
WEIRD = [
    None,
    True,
    -1,
    0,
    1,
    3,
    10**12,
    -(10**12),
    1.5,
    float("nan"),
    float("inf"),
    "",
    "x",
    "../../outside",
    [],
    {},
    [1, 2],
    {"a": 1},
    "0" * 40,
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
    model = mt.load_classifier(str(tiny.base), labels["movie"])
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


# ---------------------------------------------------------------- corruptions


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON value, containers included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def _delete(obj, path):
    for key in path[:-1]:
        obj = obj[key]
    del obj[path[-1]]


def mutate_json(rng: random.Random, obj):
    """One structural change: a value replaced, nudged or dropped, a key added, a list reshaped."""
    obj = json.loads(json.dumps(obj))
    paths = [p for p, _ in _paths(obj) if p]
    path = rng.choice(paths)
    value = dict(_paths(obj))[path]
    kind = rng.choice(["replace", "replace", "nudge", "delete", "add", "list"])
    if kind == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
        _set(obj, path, value + rng.choice([-1, 1, 7, -value - 1]) if isinstance(value, int) else value * rng.choice([-1, 0.5, 1e6]))
    elif kind == "delete":
        _delete(obj, path)
    elif kind == "add" and isinstance(value, dict):
        value[rng.choice(["unknown", "extra_field", "tasks"])] = rng.choice(WEIRD)
    elif kind == "list" and isinstance(value, list) and value:
        rng.choice([value.reverse, value.pop, lambda: value.append(value[0]), lambda: value.insert(0, rng.choice(WEIRD))])()
    else:
        _set(obj, path, rng.choice(WEIRD))
    return obj


def corrupt_bytes(rng: random.Random, data: bytes) -> bytes:
    kind = rng.choice(["truncate", "flip", "garbage", "empty", "latin1"])
    if kind == "truncate":
        return data[: rng.randrange(max(1, len(data)))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    if kind == "empty":
        return b""
    return data.replace(b"e", b"\xe9", 3)


def corrupt_json_file(rng: random.Random, path: Path) -> None:
    data = path.read_bytes()
    if rng.random() < 0.7:
        text = json.dumps(mutate_json(rng, json.loads(data)), indent=1)  # NaN / Infinity as Python writes them
        path.write_text(text)
    else:
        path.write_bytes(corrupt_bytes(rng, data))


def corrupt_safetensors(rng: random.Random, path: Path) -> None:
    """The JSON header (dtypes, shapes, offsets, metadata), its length prefix, or the tensor bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    kind = rng.choice(["header", "header", "prefix", "body", "nan"])
    if kind == "header":
        raw = json.dumps(mutate_json(rng, header)).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    elif kind == "prefix":
        path.write_bytes(struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**40])) + data[8:])
    elif kind == "body":
        path.write_bytes(data[: 8 + n] + corrupt_bytes(rng, body)[: len(body)].ljust(len(body), b"\0"))
    else:  # a NaN written over one float32 of some tensor
        name = rng.choice([k for k in header if k != "__metadata__"])
        start = header[name]["data_offsets"][0]
        body = body[:start] + struct.pack("<f", rng.choice([math.nan, math.inf])) + body[start + 4 :]
        path.write_bytes(data[: 8 + n] + body)


def corrupt_jsonl(rng: random.Random, path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    kind = rng.choice(["row", "row", "single_class", "bytes", "not_json", "many_classes"])
    if kind == "row":
        i = rng.randrange(len(rows))
        rows[i] = mutate_json(rng, {"r": rows[i]}).get("r", None) if rng.random() < 0.8 else rng.choice(WEIRD)
    elif kind == "single_class":
        rows = [{**r, "label": "positive"} for r in rows]
    elif kind == "many_classes":
        rows = [{**r, "label": f"class{i}"} for i, r in enumerate(rows)]
    if kind == "bytes":
        path.write_bytes(corrupt_bytes(rng, path.read_bytes()))
    elif kind == "not_json":
        path.write_text(path.read_text().replace("}", "", 1))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- cases


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the given folders (or of the given files), and the file lists."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


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
    runner = CliRunner()
    shared = snapshot(world.base, world.adapter, world.export, world.bundle, world.data)
    outcomes: Counter = Counter()
    failures = []
    n = 0
    for (command, target), count in PLAN.items():
        for _ in range(count):
            n += 1
            work = tmp_path / f"case{n}"
            work.mkdir()
            argv, out, inputs = case(world, rng, command, target, work)
            before = snapshot(*inputs)
            result = runner.invoke(app, argv)
            err = [line for line in result.stderr.splitlines() if line.strip()]
            where = f"case {n} ({command} {target}, seed {SEED}): {argv[:2]} -> {result.exit_code}"
            if result.exit_code not in (0, 2) or "Traceback" in result.output:
                failures.append(f"{where}: {type(result.exception).__name__}: {result.exception}")
            elif result.exit_code == 2 and (len(err) != 1 or not err[0].startswith("error: ")):
                failures.append(f"{where}: stderr is not one error line: {err}")
            after = snapshot(*inputs)
            if after != before:
                failures.append(f"{where}: inputs changed: {sorted(k for k in before if before[k] != after.get(k))[:3]}")
            report_left = command == "validate" and "report in" in result.stderr
            if result.exit_code != 0 and out.exists() and not report_left:
                failures.append(f"{where}: output left behind: {sorted(p.name for p in out.iterdir())[:5]}")
            outcomes[(command, result.exit_code)] += 1
            shutil.rmtree(work)
    print(dict(outcomes))
    assert n >= 200
    assert not failures, "\n".join(failures[:20])
    assert snapshot(world.base, world.adapter, world.export, world.bundle, world.data) == shared
    # the corruptions are not all caught the same way: some commands still succeed, most fail cleanly
    assert sum(v for (_, code), v in outcomes.items() if code == 2) > n // 2, outcomes
