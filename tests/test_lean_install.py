"""The runtime install (`pip install .`, no extras) runs every export the full install writes, alike.

`make test` builds that venv (`.venv-lean`) and names its python in METATT_LEAN_PYTHON; without it
(pytest run by hand) these tests skip, saying so. Exports are made here, in the full venv; the
lean venv's `metatt-deploy` then predicts, generates and serves from them in subprocesses started
outside the repository (so they import the installed package, not this checkout), and its answers
must equal the full install's: labels identical and logits within 1e-5, tokens identical.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from multitask_fixtures import LABELS, build_tiny_multitask
from onnx_fixtures import LABELLED, build_tiny
from servers import free_port, stop, wait_ready
from tiny_decoders import save_tiny_adapter, save_tiny_multitask

from metatt_deploy.export.factored import write_bundle
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.runtime import Runtime

LEAN = os.environ.get("METATT_LEAN_PYTHON")
pytestmark = pytest.mark.skipif(not LEAN, reason="METATT_LEAN_PYTHON unset: `make test` builds the runtime-only venv and sets it")
TEXTS = [text for text, _ in LABELLED]
PROMPTS = ["Review: this was good", "Say something: é ü 日本 😀"]
DECODER_TASKS = ["movie", "nli", "tweet"]


def lean(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``metatt-deploy ARGS`` from the lean venv, outside the repository."""
    command = [str(Path(str(LEAN)).parent / "metatt-deploy"), *args]
    return subprocess.run(command, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """One export of each form: a classifier, a factored classifier bundle, a decoder, a factored decoder bundle."""
    root = tmp_path_factory.mktemp("lean")
    tiny = build_tiny(root / "classifier")
    _, adapter, _, _ = build_tiny_multitask(root / "multitask")
    _, decoder_adapter = save_tiny_adapter(root / "decoder", "llama")
    _, decoder_multitask = save_tiny_multitask(root / "decoders", DECODER_TASKS, seed=5)
    write_bundle(adapter, root / "bundle")
    write_bundle(decoder_multitask, root / "decoder-bundle")
    return {
        "classifier": export_onnx(tiny.merged, root / "classifier-export"),
        "bundle": root / "bundle",
        "decoder": export_onnx(decoder_adapter, root / "decoder-export"),
        "decoder-bundle": root / "decoder-bundle",
    }


def test_the_lean_venv_has_no_training_stack_and_train_names_the_extra(tmp_path: Path) -> None:
    for module in ("torch", "transformers", "datasets", "optimum", "peft", "accelerate"):
        probe = subprocess.run([str(LEAN), "-c", f"import {module}"], cwd=tmp_path, capture_output=True, text=True)
        assert probe.returncode != 0, f"{module} is importable in the runtime-only venv"
    for verb in ("train", "merge", "export", "validate"):
        result = lean(verb, "anything", "-o", str(tmp_path / "out"), cwd=tmp_path)
        assert result.returncode == 2 and "[train]" in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("form", ["classifier", "bundle"])
def test_predict_equals_the_full_install(exports: dict[str, Path], form: str, tmp_path: Path) -> None:
    runtime = Runtime(exports[form])
    singles = [t for t in runtime.tasks if runtime.text_inputs(t) == 1]  # each row in the form its task takes
    pairs = [t for t in runtime.tasks if runtime.text_inputs(t) == 2]
    rows = [{"id": i, "text": t, "task": singles[i % len(singles)]} for i, t in enumerate(TEXTS)]
    rows += [{"id": "pair", "text": "A man sleeps.", "text_pair": "A man is awake.", "task": task} for task in pairs]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = lean("predict", str(exports[form]), "--input", str(inputs), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    texts = [r["text"] if "text_pair" not in r else (r["text"], r["text_pair"]) for r in rows]
    expected = runtime.predict(texts, tasks=[r["task"] for r in rows])
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(list(g["scores"].values()), list(e["scores"].values()), atol=1e-6)


@pytest.mark.parametrize(("form", "task"), [("decoder", None), ("decoder-bundle", "nli"), ("decoder-bundle", "2")])
def test_generate_equals_the_full_install(exports: dict[str, Path], form: str, task: str | None, tmp_path: Path) -> None:
    generator = Generator(exports[form])
    if task is not None:
        generator.use(task)
    expected = "".join("".join(generator.stream(p, max_new_tokens=10)) + "\n" for p in PROMPTS)  # the verb prints a line per answer
    result = lean("generate", str(exports[form]), *PROMPTS, "--max-new-tokens", "10", *(["--task", task] if task else []), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_serve_answers_like_the_full_install(exports: dict[str, Path], tmp_path: Path) -> None:
    runtime = Runtime(exports["bundle"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(str(LEAN)).parent / "metatt-deploy"), "serve", str(exports["bundle"]), "--port", str(port), "--threads", "1"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, 120, process)
        for task in LABELS:
            texts = TEXTS if runtime.text_inputs(task) == 1 else [[t, "A man is awake."] for t in TEXTS]  # the form its task takes
            r = httpx.post(f"{url}/v1/classify", json={"task": task, "texts": texts, "return_logits": True}, timeout=30)
            assert r.status_code == 200, r.text
            got = r.json()["predictions"]
            expected = runtime.logits([t if isinstance(t, str) else tuple(t) for t in texts], task=task)
            assert [p["label"] for p in got] == [LABELS[task][int(np.argmax(e))] for e in expected]
            np.testing.assert_allclose(np.array([p["logits"] for p in got]), np.array(expected), atol=1e-5)
    finally:
        log = stop(process)
    assert "Traceback" not in log
