"""web/: the spec, metatt.js and the page written with every export, and their runtime files.

Fast tests check what is written; the slow ones run it: Transformers.js's text-classification
pipeline in Node on a Transformers.js-layout export of the real MiniLM, web/metatt.js in Node
(onnxruntime-node) on a factored bundle with rows of several tasks in one call, and the page in
headless Chromium (onnxruntime-web, WASM) behind a loopback static server. npm packages come
from the registry at test time (js_runtime.py); the tests skip only when npm is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from js_runtime import chromium, node, npm_dir, static_server
from test_multitask import LABELS, build_tiny_multitask

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.export.web import SPEC_NAME, WEB_DIR, factored_spec, single_task_spec, vendor_web_runtime, write_web_app
from metatt_deploy.serving.runtime import Runtime, softmax

TOL = 1e-4


def real_sentences(n: int = 20) -> list[str]:
    """The first ``n`` sentences of the movie-sentiment test split (real data, short enough for every tokenizer cut)."""
    from metatt_deploy.training.data import load_task

    test = load_task(dataset="movie-sentiment").splits["test"]
    texts = [t for t in test.select_columns(["text"])[:]["text"] if len(t.split()) < 60]
    return texts[:n]


def test_single_and_factored_specs_and_files(tmp_path) -> None:
    spec = single_task_spec({"0": "negative", "1": "positive"}, ["input_ids", "attention_mask"], "onnx")
    assert spec["graph"] == "../onnx/model.onnx" and spec["tasks"] == [{"name": "default", "labels": ["negative", "positive"]}]
    assert not spec["task_ids"] and spec["tokenizer"] == "tokenizer"
    (tmp_path / "tokenizer.json").write_text("{}")
    entry = write_web_app(tmp_path, spec, tmp_path)
    assert sorted(p.name for p in (tmp_path / WEB_DIR).iterdir()) == sorted([*entry["files"], "tokenizer"])
    assert (tmp_path / WEB_DIR / "tokenizer" / "tokenizer.json").read_text() == "{}"
    assert json.loads((tmp_path / WEB_DIR / SPEC_NAME).read_text()) == spec
    assert "export async function loadClassifier" in (tmp_path / WEB_DIR / "metatt.js").read_text()
    assert "./vendor/ort.wasm.bundle.min.mjs" in (tmp_path / WEB_DIR / "index.html").read_text()
    fspec = factored_spec("model_tasks.onnx", ["a", "b"], {"a": ["x", "y"], "b": ["p", "q", "r"]}, ["input_ids", "task_ids"], 64)
    assert fspec["task_ids"] and [t["name"] for t in fspec["tasks"]] == ["a", "b"] and fspec["graph"] == "../model_tasks.onnx"
    with pytest.raises(MetaTTError, match="lacks .*npm install"):
        vendor_web_runtime(tmp_path, tmp_path / "node_modules")


def test_factored_bundle_writes_its_web_app(tmp_path) -> None:
    _, adapter, _, _ = build_tiny_multitask(tmp_path)
    write_bundle(adapter, tmp_path / "bundle")
    spec = json.loads((tmp_path / "bundle" / WEB_DIR / SPEC_NAME).read_text())
    assert spec["graph"] == "../model_tasks.onnx" and spec["task_ids"] and spec["inputs"][-1] == "task_ids"
    assert [t["name"] for t in spec["tasks"]] == list(LABELS) and spec["tasks"][1]["labels"] == LABELS["nli"]


# ---------------------------------------------------------------- slow: Node and Chromium


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory) -> Path:
    """The real MiniLM with a random non-zero adapter, exported in the Transformers.js layout."""
    from metatt_deploy.adapters.base_model import load_classifier, load_tokenizer, resolve_model
    from metatt_deploy.adapters.model import attach, build_config, get_adapter, save_adapter
    from metatt_deploy.export.merge import merge_adapter
    from metatt_deploy.export.onnx import export_onnx
    from metatt_deploy.tt import cores as tt

    root = tmp_path_factory.mktemp("minilm-web")
    torch.manual_seed(0)
    model = load_classifier(None, ["negative", "positive"]).eval()
    config = build_config(model, rank=8, base_model=resolve_model(None))
    attach(model, config)
    get_adapter(model).set_cores(tt.init_cores("no-no-no-no", config.core_shapes(), seed=1))
    save_adapter(model, root / "adapter", load_tokenizer(None))
    merge_adapter(root / "adapter", root / "merged")
    return export_onnx(root / "merged", root / "exports" / "minilm", layout="transformers.js")


def python_top(model: Path, tokenizer_dir: Path, texts: list[str], labels: list[str]) -> list[tuple[str, float]]:
    """Python ONNX Runtime's top label and its probability, one text at a time."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    out = []
    for text in texts:
        enc = {
            k: v.astype(np.int64) for k, v in tokenizer(text, truncation=True, max_length=128, return_tensors="np").items() if k in names
        }
        p = softmax(session.run(["logits"], enc)[0][0].astype(np.float64))
        out.append((labels[int(p.argmax())], float(p.max())))
    return out


@pytest.mark.slow
def test_transformers_js_pipeline_in_node_matches_python(minilm_export, tmp_path) -> None:
    npm_dir()
    texts = real_sentences()
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    got = node("pipeline.mjs", str(minilm_export.parent), minilm_export.name, str(tmp_path / "texts.json"), "fp32")
    want = python_top(minilm_export / "onnx" / "model.onnx", minilm_export, texts, ["negative", "positive"])
    assert [g["label"] for g in got] == [w[0] for w in want]
    assert max(abs(g["score"] - w[1]) for g, w in zip(got, want)) <= TOL
    # the int8 file loads too (dtype q8 -> onnx/model_quantized.onnx) and mostly agrees
    q8 = node("pipeline.mjs", str(minilm_export.parent), minilm_export.name, str(tmp_path / "texts.json"), "q8")
    assert len(q8) == len(texts) and sum(a["label"] == b[0] for a, b in zip(q8, want)) >= 0.8 * len(texts)


@pytest.mark.slow
def test_metatt_js_in_node_classifies_mixed_tasks_in_one_call(tmp_path) -> None:
    npm_dir()
    _, adapter, _, _ = build_tiny_multitask(tmp_path)
    bundle = tmp_path / "bundle"
    write_bundle(adapter, bundle)
    texts = real_sentences(6)
    rows = [{"text": t, "task": task} for t, task in zip(texts, ["movie", "four", "movie", "four", "movie", "four"])]
    rows.append({"text": "A man sleeps.", "text_pair": "A man is awake.", "task": "nli"})
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    got = node("classify.mjs", str(bundle / WEB_DIR), str(tmp_path / "rows.json"))
    runtime = Runtime(bundle, form="tasks", threads=1)
    inputs = [r["text"] if "text_pair" not in r else (r["text"], r["text_pair"]) for r in rows]
    want = runtime.logits(inputs, tasks=[r["task"] for r in rows])
    predicted = runtime.predict(inputs, tasks=[r["task"] for r in rows])
    for g, w, p, r in zip(got, want, predicted, rows):
        assert g["task"] == r["task"] and len(g["logits"]) == len(LABELS[r["task"]])
        assert np.abs(np.asarray(g["logits"]) - w).max() <= TOL
        assert g["label"] == p["label"] and abs(g["score"] - p["score"]) <= TOL


@pytest.mark.slow
def test_page_classifies_in_headless_chromium(minilm_export) -> None:
    modules = npm_dir() / "node_modules"
    browser = chromium()
    vendor_web_runtime(minilm_export, modules)
    texts = real_sentences()
    (minilm_export / "texts.json").write_text(json.dumps(texts))
    screenshot = minilm_export / WEB_DIR / "screenshot.png"
    with static_server(minilm_export) as url:
        done = node("page.mjs", f"{url}/{WEB_DIR}/index.html", str(minilm_export / "texts.json"), "default", str(screenshot), timeout=400)
    want = python_top(minilm_export / "onnx" / "model.onnx", minilm_export, texts, ["negative", "positive"])
    assert [r["label"] for r in done] == [w[0] for w in want]
    assert max(abs(r["score"] - w[1]) for r, w in zip(done, want)) <= TOL
    assert screenshot.stat().st_size > 10_000 and browser
