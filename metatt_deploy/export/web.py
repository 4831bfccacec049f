"""The JavaScript side of an export: ``web/metatt.js``, a static page, and its runtime files.

Every export (``metatt-deploy export``) and every factored bundle (``merge --factored``) gets a
``web/`` folder:

    web/metatt.json   what to load: the graph (relative to web/), the tokenizer folder, whether
                      the graph takes ``task_ids``, the tasks with their labels, max_length
    web/metatt.js     an ES module for Node (onnxruntime-node) and browsers (onnxruntime-web):
                      ``loadClassifier({root, ort, AutoTokenizer, env})`` then
                      ``classifier.classify([{text, text_pair?, task}, ...])`` classifies rows of
                      different tasks in ONE call of the graph (docs/web.md)
    web/tokenizer/    the export's tokenizer files, for Transformers.js's AutoTokenizer
    web/index.html    a page that classifies typed text in the browser (task menu; static files
                      only: any static file server, or none beyond one, serves the bundle)
    web/vendor/       onnxruntime-web's WASM bundle and Transformers.js (for its tokenizer),
                      copied from an npm install by `vendor_web_runtime` (export --web-runtime)

The page and the module take the runtime libraries as arguments instead of importing package
names, so the same file runs in Node (packages from node_modules) and in a browser (files from
web/vendor/), with no bundler.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_json, atomic_write_text

WEB_DIR = "web"
SPEC_NAME = "metatt.json"
SPEC_FORMAT = 1
ASSETS = ("metatt.js", "index.html")
VENDOR_DIR = "vendor"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# file in web/vendor/ <- path inside node_modules (onnxruntime-web's WASM-only bundle embeds
# its JS glue and fetches the .wasm; Transformers.js's self-contained browser build)
VENDOR_FILES = {
    "ort.wasm.bundle.min.mjs": "onnxruntime-web/dist/ort.wasm.bundle.min.mjs",
    "ort-wasm-simd-threaded.wasm": "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm",
    "transformers.min.js": "@huggingface/transformers/dist/transformers.min.js",
}
NPM_PACKAGES = ("@huggingface/transformers", "onnxruntime-web", "onnxruntime-node")


def single_task_spec(labels: dict[str, str], inputs: list[str], fp32_dir: str | None, max_length: int = 128) -> dict:
    """The spec of a single-task export: its model.onnx (or the Transformers.js fp32 copy) and its labels."""
    graph = f"../{fp32_dir}/model.onnx" if fp32_dir else "../model.onnx"
    ordered = [labels[str(i)] for i in range(len(labels))]
    return {
        "format_version": SPEC_FORMAT,
        "graph": graph,
        "tokenizer": TOKENIZER_DIR,
        "inputs": inputs,
        "task_ids": False,
        "tasks": [{"name": "default", "labels": ordered}],
        "max_length": max_length,
    }


def factored_spec(graph: str, tasks: list[str], labels: dict[str, list[str]], inputs: list[str], max_length: int) -> dict:
    """The spec of a factored bundle: model_tasks.onnx, every baked task, the base tokenizer."""
    return {
        "format_version": SPEC_FORMAT,
        "graph": f"../{graph}",
        "tokenizer": TOKENIZER_DIR,
        "inputs": inputs,
        "task_ids": True,
        "tasks": [{"name": t, "labels": list(labels[t])} for t in tasks],
        "max_length": max_length,
    }


def write_web_app(folder: Path, spec: dict, tokenizer_dir: Path) -> dict:
    """Write ``folder/web/`` (spec, module, page, tokenizer files from ``tokenizer_dir``); returns the manifest's ``web`` entry."""
    web = folder / WEB_DIR
    (web / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, web / TOKENIZER_DIR / name)
    atomic_write_json(web / SPEC_NAME, spec)
    for name in ASSETS:
        atomic_write_text(
            web / name, resources.files("metatt_deploy.export").joinpath("web_assets").joinpath(name).read_text(encoding="utf-8")
        )
    return {
        "folder": WEB_DIR,
        "files": [SPEC_NAME, *ASSETS],
        "graph": spec["graph"],
        "runtime": f"{WEB_DIR}/{VENDOR_DIR}/ (copy with export --web-runtime NODE_MODULES, or vendor_web_runtime)",
    }


def check_web_runtime(node_modules: Path) -> None:
    """``node_modules`` holds every browser runtime file (checked before an export writes anything)."""
    missing = [src for src in VENDOR_FILES.values() if not (Path(node_modules) / src).is_file()]
    if missing:
        raise MetaTTError(
            f"{node_modules} lacks {', '.join(missing)}; run `npm install {' '.join(NPM_PACKAGES)}` there and pass its node_modules"
        )


def vendor_web_runtime(folder: Path, node_modules: Path) -> list[str]:
    """Copy the browser runtime files from an npm install into ``folder/web/vendor/``; returns their names."""
    node_modules = Path(node_modules)
    check_web_runtime(node_modules)
    vendor = Path(folder) / WEB_DIR / VENDOR_DIR
    vendor.mkdir(parents=True, exist_ok=True)
    for name, src in VENDOR_FILES.items():
        shutil.copyfile(node_modules / src, vendor / name)
    return sorted(VENDOR_FILES)
