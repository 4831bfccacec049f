#!/usr/bin/env python
"""Latency of every serving form of a MetaTT adapter on this machine -> docs/reports/latency.md + docs/reports/latency.png.

Runtimes, each on the same fixed-shape inputs (batch x seq tokens, padded):

  pytorch-adapter    PyTorch eager, base model + unmerged MetaTT adapter (the training graph)
  pytorch-merged     PyTorch eager, merged model
  ort-base           ONNX Runtime, the base model without adapter (same head): the reference
  ort-merged         ONNX Runtime, merged fp32 export (`metatt-deploy export`)
  ort-merged-opt     ... with --optimize (fused attention / layer norm / GELU / embeddings)
  ort-merged-int8    ... with --quantize int8 (dynamic quantization of the plain graph)
  ort-merged-opt-int8 ... with --optimize --quantize int8
  ort-merged-int8-static ... with --quantize int8-static --calibration DATA (QDQ, calibrated)
  ort-merged-ort     the fp32 export as an ORT-format model (`export --format ort`: model.ort)
  ort-merged-1t      ort-merged with 1 intra-op thread (when --threads is not 1): the thread default
  tjs-node           Transformers.js (@huggingface/transformers, onnxruntime-node) in Node on the
                     export's Transformers.js layout, fp32 (onnx/model.onnx); tjs-node-q8: the
                     dynamic int8 file (onnx/model_quantized.onnx). A Node process per dtype
                     serves calls over a pipe, so it is timed in the same round robin as the rest
                     (the pipe adds well under 0.1 ms a call); skipped with a note without Node or
                     an npm install (--node-modules)
  ort-factored       the factored graph of a (4+1)D adapter (model_tasks.onnx, task_ids input),
                     built from a random 2-task adapter of the same rank when the adapter at hand
                     is single-task (latency does not depend on the values); skipped with a note
                     if the factored exporter is missing or fails

Timing: PyTorch and ONNX Runtime both get --threads intra-op threads (default 2); per shape the
runtimes take turns in blocks (common/timing.time_round_robin), so background load hits all alike;
medians (p50) and p95 of single calls; ratios are p50 / p50 of ort-base at the same shape.

The adapter: --adapter DIR, else the newest trained single-task adapter under runs/ (a
`best/` folder), else a random non-zero one (no-no-no-no cores, rank 8) on the embedded model.
With a trained adapter and --accuracy-data, the accuracy of the fp32 and int8 exports is measured
too. A quick run: --repeats 10 --max-seconds 10 (a few minutes on 2 cores).

Internals (what this measures lies below the public API, docs/api.md):

- metatt_deploy.adapters.base_model: the base classifier and its tokenizer, loaded without an adapter: the `pytorch-*` runtimes and the random adapter start from them.
- metatt_deploy.adapters.config: reads an adapter's config (its tasks, labels, base model) to decide what to build and time.
- metatt_deploy.adapters.model: attaches an unmerged adapter to a PyTorch model: the training graph is one of the runtimes timed, which no deployment runs.
- metatt_deploy.adapters.multitask: builds a random 2-task (4+1)D adapter for the factored graph when the adapter at hand is single-task (latency does not depend on its values).
- metatt_deploy.tt.cores: the random cores of that adapter.
- metatt_deploy.export.onnx_classifier: the fixed sample sentences every classifier export is timed on.
- metatt_deploy.export.onnx_files: the library versions recorded with the figures.
- metatt_deploy.export.quantize: the CPU's instruction-set flags, recorded with the int8 figures they explain.
- metatt_deploy.export.held_out: validate's own held-out reader, so accuracy is read as validate reads it.
- metatt_deploy.common.timing: validate's round-robin timer and summary, so these figures are measured as validate measures them.
- metatt_deploy.export.options: the int8-static export's `Calibration` (export_onnx's frozen options).
- metatt_deploy.inference.sessions: a bare ONNX Runtime session per graph: each export form is timed alone, without a `Runtime`'s tokenizing.
- metatt_deploy.common.errors: first_line, the one-line form of an error that a skipped or failed row reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metatt_deploy import export_onnx, merge_adapter, write_bundle  # noqa: E402
from metatt_deploy.adapters import multitask
from metatt_deploy.adapters.base_model import load_classifier, load_tokenizer, resolve_model
from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.adapters.model import attach, build_config, get_adapter, load_adapter, load_head, read_weights, save_adapter, split_state
from metatt_deploy.common.errors import first_line
from metatt_deploy.common.timing import summarize, time_round_robin
from metatt_deploy.export.held_out import load_held_out  # noqa: E402
from metatt_deploy.export.onnx_classifier import SAMPLE_SENTENCES  # noqa: E402
from metatt_deploy.export.onnx_files import library_versions  # noqa: E402
from metatt_deploy.export.options import Calibration
from metatt_deploy.export.quantize import cpu_summary
from metatt_deploy.inference.sessions import make_session, onnx_feeds  # noqa: E402
from metatt_deploy.tt import cores as tt  # noqa: E402

ORDER = [
    "pytorch-adapter",
    "pytorch-merged",
    "ort-base",
    "ort-merged",
    "ort-merged-opt",
    "ort-merged-int8",
    "ort-merged-opt-int8",
    "ort-merged-int8-static",
    "ort-merged-ort",
    "ort-merged-1t",
    "tjs-node",
    "tjs-node-q8",
    "ort-factored",
]
LABELS = {
    "pytorch-adapter": "PyTorch eager, adapter unmerged",
    "pytorch-merged": "PyTorch eager, merged",
    "ort-base": "ORT base model (no adapter)",
    "ort-merged": "ORT merged fp32",
    "ort-merged-opt": "ORT merged fp32, optimised",
    "ort-merged-int8": "ORT merged int8",
    "ort-merged-opt-int8": "ORT merged optimised + int8",
    "ort-merged-int8-static": "ORT merged static int8 (QDQ)",
    "ort-merged-ort": "ORT merged fp32, ORT format (.ort)",
    "ort-merged-1t": "ORT merged fp32, 1 thread",
    "tjs-node": "Transformers.js in Node, fp32",
    "tjs-node-q8": "Transformers.js in Node, q8",
    "ort-factored": "ORT factored (4+1)D graph",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, help="adapter folder (default: newest trained one under runs/, else random)")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--seq-lens", default="32,128", help="comma-separated sequence lengths (tokens, padded)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per runtime and shape")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per runtime and shape before timing")
    p.add_argument("--max-seconds", type=float, default=20.0, help="cap on timed seconds per runtime and shape (>= 3 calls)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for ONNX Runtime and PyTorch")
    p.add_argument("--rank", type=int, default=8, help="rank of the random adapter (when no trained one is used)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-latency", help="merged model and exports go here")
    p.add_argument("--reuse", action="store_true", help="reuse exports already in --work-dir")
    p.add_argument(
        "--accuracy-data",
        default="movie-sentiment",
        help="held-out data for the fp32 vs int8 accuracy (trained adapters only); 'none' to skip",
    )
    p.add_argument("--max-examples", type=int, default=1000, help="held-out examples for the accuracy check")
    p.add_argument("--no-factored", action="store_true", help="skip the factored graph")
    p.add_argument("--calibration", default="movie-sentiment", help="calibration data of the static int8 export")
    p.add_argument(
        "--node-modules",
        type=Path,
        default=Path(os.environ.get("METATT_NPM_DIR", "/tmp/metatt-npm-tests")) / "node_modules",
        help="an npm install holding @huggingface/transformers (tests/export/js/package.json); 'none' skips Transformers.js",
    )
    p.add_argument("--out-md", type=Path, default=ROOT / "docs" / "reports" / "latency.md")
    p.add_argument("--out-png", type=Path, default=ROOT / "docs" / "reports" / "latency.png")
    p.add_argument("--out-json", type=Path, default=None, help="raw results as JSON (default: <work-dir>/latency.json)")
    return p.parse_args()


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def find_trained_adapter() -> Path | None:
    found = []
    for config in (ROOT / "runs").glob("**/best/metatt_config.json"):
        try:
            if not MetaTTConfig.load(config.parent).multitask:
                found.append(config.parent)
        except Exception:  # unreadable or other-format adapters are simply not candidates
            continue
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def random_adapter(work: Path, rank: int) -> Path:
    torch.manual_seed(0)
    model = load_classifier(None, ["negative", "positive"]).eval()
    config = build_config(model, rank=rank, base_model=resolve_model(None))
    attach(model, config)
    get_adapter(model).set_cores(tt.init_cores("no-" * (len(config.mode_names) - 1) + "no", config.core_shapes(), seed=1))
    return save_adapter(model, work / "random-adapter", load_tokenizer(None), force=True)


def base_without_adapter(adapter: Path, out: Path) -> Path:
    """The adapter's base model with the adapter's head and no adapter, as a Hugging Face folder."""
    config = MetaTTConfig.load(adapter)
    _, heads = split_state(read_weights(adapter), config)
    model = load_classifier(config.base_model, config.label_names[config.tasks[0]])
    load_head(model, heads, config)

    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").is_file() else config.base_model).save_pretrained(out)
    return out


def factored_graph(adapter: Path, work: Path, rank: int, reuse: bool) -> tuple[Path | None, str]:
    """model_tasks.onnx of a factored bundle, and a note on what it is (or why it is missing)."""
    bundle = work / "factored"
    graph = bundle / "model_tasks.onnx"
    if reuse and graph.is_file():
        return graph, "factored bundle reused from the work dir"
    try:
        config = MetaTTConfig.load(adapter)
        source = adapter
        note = "factored graph of this (4+1)D adapter"
        if not config.multitask:
            torch.manual_seed(0)
            labels = config.label_names[config.tasks[0]]
            model = load_classifier(config.base_model, labels)
            tasks = ["task_a", "task_b"]
            ranks = config.ranks[:2] + [config.ranks[1]] + config.ranks[2:]  # (4+1)D: task bond after the matrix core
            mtm = multitask.build_multitask(
                model,
                tasks,
                {t: labels for t in tasks},
                rank=ranks if len(set(ranks)) > 1 else ranks[0],
                targets=config.targets,
                alpha=config.alpha,
                base_model=config.base_model,
                init="no-no-no-no-no",
            )
            source = multitask.save_multitask(mtm, work / "random-multitask-adapter", load_tokenizer(config.base_model), force=True)
            note = (
                "factored graph of a random 2-task (4+1)D adapter with the same ranks and targets "
                "(the adapter at hand is single-task; latency does not depend on the values)"
            )
        write_bundle(source, bundle, force=True)
        return graph, note
    except Exception as e:  # the factored path belongs to another module: report, do not fail the bench
        return None, f"skipped: factored export failed ({type(e).__name__}: {first_line(e)})"


def build_exports(adapter: Path, work: Path, reuse: bool, calibration: str) -> dict[str, Path]:
    merged = work / "merged"
    if not (reuse and (merged / "config.json").is_file()):
        merge_adapter(adapter, merged, force=True)
    base = work / "base"
    if not (reuse and (base / "config.json").is_file()):
        base_without_adapter(adapter, base)
    specs = {
        "ort-base": (base, {}),
        # the reference export also carries the Transformers.js layout (onnx/) and model.ort
        "ort-merged": (merged, {"layout": "transformers.js", "formats": ("onnx", "ort")}),
        "ort-merged-opt": (merged, {"optimize": True}),
        "ort-merged-int8": (merged, {"quantize": "int8"}),
        "ort-merged-opt-int8": (merged, {"optimize": True, "quantize": "int8"}),
        "ort-merged-int8-static": (merged, {"quantize": "int8-static", "calibration": Calibration(calibration)}),
    }
    out = {}
    for key, (source, options) in specs.items():
        folder = work / "onnx" / key
        if not (reuse and (folder / "manifest.json").is_file() and (key != "ort-merged" or (folder / "model.ort").is_file())):
            t0 = time.time()
            export_onnx(source, folder, force=True, **options)
            print(f"  exported {key} in {time.time() - t0:.0f}s", flush=True)
        out[key] = folder
    return out


class NodeRunner:
    """tools/tjs_latency.mjs in a Node process: Transformers.js runs one call per `run()` (timed here, pipe included)."""

    def __init__(self, npm_dir: Path, export: Path, dtype: str, threads: int):
        self.proc = subprocess.Popen(
            ["node", "tjs_latency.mjs", str(export.parent), export.name, dtype, str(threads)],
            cwd=npm_dir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._expect("ready")

    def _expect(self, wanted: str | None = None) -> str:
        line = self.proc.stdout.readline().strip()
        if not line or (wanted is not None and line != wanted):
            raise RuntimeError(f"tjs_latency.mjs said {line!r} (exit {self.proc.poll()})")
        return line

    def set_inputs(self, feeds: dict[str, list]) -> None:
        self.proc.stdin.write(json.dumps(feeds) + "\n")
        self._expect("ok")

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        return float(self._expect())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def start_node(node_modules: Path, export: Path, threads: int) -> tuple[dict[str, NodeRunner], str]:
    """One Transformers.js runner per dtype on the export's Transformers.js layout, or none and why."""
    if str(node_modules) == "none":
        return {}, "skipped (--node-modules none)"
    if shutil.which("node") is None or not (node_modules / "@huggingface" / "transformers").is_dir():
        return (
            {},
            f"skipped: no node, or no @huggingface/transformers under {node_modules} (npm install tests/export/js/package.json there)",
        )
    shutil.copyfile(ROOT / "tools" / "tjs_latency.mjs", node_modules.parent / "tjs_latency.mjs")
    version = json.loads((node_modules / "@huggingface" / "transformers" / "package.json").read_text())["version"]
    runners = {"tjs-node": NodeRunner(node_modules.parent, export, "fp32", threads)}
    runners["tjs-node-q8"] = NodeRunner(node_modules.parent, export, "q8", threads)
    return runners, (
        f"@huggingface/transformers {version} in Node {subprocess.run(['node', '--version'], capture_output=True, text=True).stdout.strip()}"
        f" (onnxruntime-node), AutoModelForSequenceClassification on onnx/model.onnx (fp32) and onnx/model_quantized.onnx (q8), "
        f"{threads} intra-op threads; timed through a pipe"
    )


def accuracy(adapter, exports, tokenizer, data: str, max_examples: int, threads: int) -> dict:
    """Accuracy of the unmerged PyTorch adapter and every export on held-out data."""
    config = MetaTTConfig.load(adapter)
    held = load_held_out(data, split="test", max_examples=max_examples, model_labels=config.label_names[config.tasks[0]])
    labels = np.asarray(held.labels)
    model, _, _ = load_adapter(adapter)
    preds: dict[str, list] = {"pytorch-adapter": []}
    sessions = {k: make_session(v / "model.onnx", ["CPUExecutionProvider"], threads) for k, v in exports.items() if k != "ort-base"}
    preds.update({k: [] for k in sessions})
    for start in range(0, len(held.texts), 32):
        enc = dict(tokenizer(*held.columns(slice(start, start + 32)), padding=True, truncation=True, max_length=128, return_tensors="pt"))
        with torch.no_grad():
            preds["pytorch-adapter"].append(model(**enc).logits.argmax(-1).numpy())
        for k, s in sessions.items():
            preds[k].append(s.run(["logits"], onnx_feeds(s, enc))[0].argmax(-1))
    result = {k: float((np.concatenate(v) == labels).mean()) for k, v in preds.items()}
    return {"data": held.source, "split": held.split, "examples": len(labels), "accuracy": result}


def main() -> None:
    args = parse_args()
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")

    torch.set_num_threads(args.threads)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.time()

    adapter = args.adapter or find_trained_adapter()
    trained = adapter is not None
    if adapter is None:
        print("no trained adapter under runs/: using a random non-zero one on the embedded model", flush=True)
        adapter = random_adapter(work, args.rank)
    print(f"adapter: {adapter}", flush=True)
    exports = build_exports(Path(adapter), work, args.reuse, args.calibration)
    factored_path, factored_note = (
        (None, "skipped (--no-factored)") if args.no_factored else factored_graph(Path(adapter), work, args.rank, args.reuse)
    )
    print(f"factored: {factored_note}", flush=True)

    from transformers import AutoModelForSequenceClassification

    adapter_model, config, tokenizer = load_adapter(adapter)
    merged_model = AutoModelForSequenceClassification.from_pretrained(work / "merged").eval()
    sessions = {k: make_session(v / "model.onnx", ["CPUExecutionProvider"], args.threads) for k, v in exports.items()}
    sessions["ort-merged-ort"] = make_session(exports["ort-merged"] / "model.ort", ["CPUExecutionProvider"], args.threads)
    if args.threads != 1:
        sessions["ort-merged-1t"] = make_session(exports["ort-merged"] / "model.onnx", ["CPUExecutionProvider"], 1)
    if factored_path is not None:
        sessions["ort-factored"] = make_session(factored_path, ["CPUExecutionProvider"], args.threads)
    node, node_note = start_node(args.node_modules, exports["ort-merged"], args.threads)
    print(f"Transformers.js: {node_note}", flush=True)

    def torch_call(model, enc):
        def call():
            with torch.no_grad():
                model(**enc)

        return call

    def ort_call(session, enc):
        feeds = {}
        for inp in session.get_inputs():
            if inp.name == "task_ids":
                feeds["task_ids"] = np.zeros(enc["input_ids"].shape[0], dtype=np.int64)
            elif inp.name in enc or inp.name == "token_type_ids":
                feeds[inp.name] = onnx_feeds_one(enc, inp.name)
        return lambda: session.run(None, feeds)

    rows = []
    for seq in ints(args.seq_lens):
        for batch in ints(args.batch_sizes):
            texts = [SAMPLE_SENTENCES[i % len(SAMPLE_SENTENCES)] for i in range(batch)]
            enc = dict(tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))
            fns = {"pytorch-adapter": torch_call(adapter_model, enc), "pytorch-merged": torch_call(merged_model, enc)}
            fns.update({k: ort_call(s, enc) for k, s in sessions.items()})
            for key, runner in node.items():
                runner.set_inputs({k: v.tolist() for k, v in enc.items()})
                fns[key] = runner.run
            t0 = time.time()
            times = time_round_robin(fns, warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_seconds)
            base = float(np.median(times["ort-base"])) * 1000
            for key in ORDER:
                if key not in times:
                    continue
                stats = summarize(times[key])
                rows.append({"runtime": key, "batch": batch, "seq_len": seq, **stats, "vs_ort_base": round(stats["p50_ms"] / base, 3)})
            print(
                f"  batch {batch:>3} seq {seq:>4}: "
                + ", ".join(f"{k} {summarize(v)['p50_ms']:.1f}ms" for k, v in times.items())
                + f"  ({time.time() - t0:.0f}s)",
                flush=True,
            )

    for runner in node.values():
        runner.close()
    acc = None
    if trained and args.accuracy_data.lower() != "none":
        try:
            acc = accuracy(Path(adapter), exports, tokenizer, args.accuracy_data, args.max_examples, args.threads)
        except Exception as e:  # accuracy is a bonus here; validate is the command that enforces it
            acc = {"error": f"{type(e).__name__}: {first_line(e)}"}

    manifests = {k: json.loads((v / "manifest.json").read_text()) for k, v in exports.items()}
    result = {
        "adapter": str(adapter),
        "adapter_trained": trained,
        "adapter_method": config.method,
        "adapter_ranks": config.ranks,
        "base_model": config.base_model,
        "factored": factored_note,
        "transformers_js": node_note,
        "calibration": manifests["ort-merged-int8-static"]["quantization"]["calibration"],
        "settings": {
            "batch_sizes": ints(args.batch_sizes),
            "seq_lens": ints(args.seq_lens),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "max_seconds": args.max_seconds,
            "threads": args.threads,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_flags": cpu_summary()["flags"],
            "processor": platform.processor() or platform.machine(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "parity": {k: m["parity"]["final"]["max_abs_logit_diff"] for k, m in manifests.items()},
        "ort_format": manifests["ort-merged"].get("ort_format"),
        "fused_nodes": manifests["ort-merged-opt"].get("fused_nodes"),
        "sizes_mb": {k: round(m["sizes"]["final_bytes"] / 2**20, 1) for k, m in manifests.items()},
        "accuracy": acc,
        "versions": library_versions(),
        "seconds": round(time.time() - started),
        "rows": rows,
    }
    out_json = args.out_json or work / "latency.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(render(result, args.out_png.name))
    plot(result, args.out_png)
    print(f"wrote {args.out_md}, {args.out_png}, {out_json} in {result['seconds']}s")


def onnx_feeds_one(enc, name):
    value = enc.get(name)
    if value is None:  # token_type_ids for a tokenizer that does not produce them
        value = torch.zeros_like(enc["input_ids"])
    return value.numpy().astype(np.int64)


def p50(result: dict, key: str, batch: int, seq: int) -> float | None:
    return next((r["p50_ms"] for r in result["rows"] if (r["runtime"], r["batch"], r["seq_len"]) == (key, batch, seq)), None)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def render(result: dict, png_name: str) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        "# Latency of the serving forms (measured)",
        "",
        "Written by `tools/bench_latency.py`; re-run it to refresh. Raw numbers: the JSON named at the end of its output.",
        "",
        f"- adapter: `{result['adapter']}` ({'trained' if result['adapter_trained'] else 'random, non-zero: latency only'}; "
        f"{result['adapter_method']}, ranks {result['adapter_ranks']}); base model `{result['base_model']}`",
        f"- machine: {m['cpu_count']} CPU cores ({m['processor']}, {', '.join(m.get('cpu_flags', [])) or 'flags unknown'}); "
        f"1-minute load average before/after {m['load_average_before'][0]} / {m['load_average_after'][0]}",
        f"- {s['threads']} intra-op threads for ONNX Runtime (CPUExecutionProvider) and PyTorch; {s['warmup']} warm-up calls, "
        f"up to {s['repeats']} timed calls (at most {s['max_seconds']:.0f} s) per runtime and shape, runtimes timed in "
        "interleaved blocks; p50 = median, p95 of single calls; inputs padded to the sequence length",
        "- ratio = p50 / p50 of the base model's ONNX export (no adapter) at the same shape; the merged fp32 graph is the "
        "base graph with other weights, so its ratio's spread around 1.00 is this run's noise band",
        f"- factored: {result['factored']}",
        f"- Transformers.js: {result.get('transformers_js', 'not measured')}",
        f"- static int8 calibration: {_calibration(result.get('calibration'))}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
    ]
    batches, seqs = s["batch_sizes"], s["seq_lens"]
    keys = [k for k in ORDER if any(r["runtime"] == k for r in result["rows"])]
    lines += ["## p50 latency (ms) and ratio to the base model's ONNX export", ""]
    header = "| runtime | " + " | ".join(f"b{b} s{q}" for q in seqs for b in batches) + " |"
    lines += [header, "|---|" + "---:|" * (len(batches) * len(seqs))]
    for key in keys:
        cells = []
        for q in seqs:
            for b in batches:
                r = next((r for r in result["rows"] if (r["runtime"], r["batch"], r["seq_len"]) == (key, b, q)), None)
                cells.append(f"{r['p50_ms']:.1f} ({r['vs_ort_base']:.2f})" if r else "n/a")
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    lines += ["", "## p95 latency (ms)", "", header, "|---|" + "---:|" * (len(batches) * len(seqs))]
    for key in keys:
        cells = [
            next((f"{r['p95_ms']:.1f}" for r in result["rows"] if (r["runtime"], r["batch"], r["seq_len"]) == (key, b, q)), "n/a")
            for q in seqs
            for b in batches
        ]
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")

    lines += ["", "## Targets", "", "| target | shape | measured |", "|---|---|---:|"]
    for q in seqs:
        for b in batches:
            lines.append(
                f"| merged fp32 / base ONNX ~ 1.00 | b{b} s{q} | {ratio(p50(result, 'ort-merged', b, q), p50(result, 'ort-base', b, q))} |"
            )
    b1 = 1 if 1 in batches else batches[0]
    for q in seqs:
        lines.append(
            f"| ORT merged fp32 vs PyTorch eager (adapter) >= 1.5x | b{b1} s{q} | "
            f"{ratio(p50(result, 'pytorch-adapter', b1, q), p50(result, 'ort-merged', b1, q))} |"
        )
        lines.append(
            f"| ORT merged optimised vs PyTorch eager (adapter) | b{b1} s{q} | "
            f"{ratio(p50(result, 'pytorch-adapter', b1, q), p50(result, 'ort-merged-opt', b1, q))} |"
        )
        lines.append(
            f"| int8 vs fp32 merged >= 1.8x (plain graphs) | b{b1} s{q} | "
            f"{ratio(p50(result, 'ort-merged', b1, q), p50(result, 'ort-merged-int8', b1, q))} |"
        )
        lines.append(
            f"| optimised int8 vs fp32 merged | b{b1} s{q} | "
            f"{ratio(p50(result, 'ort-merged', b1, q), p50(result, 'ort-merged-opt-int8', b1, q))} |"
        )
        lines.append(
            f"| optimised int8 vs optimised fp32 | b{b1} s{q} | "
            f"{ratio(p50(result, 'ort-merged-opt', b1, q), p50(result, 'ort-merged-opt-int8', b1, q))} |"
        )
        lines.append(
            f"| static int8 vs fp32 merged >= 1.8x | b{b1} s{q} | "
            f"{ratio(p50(result, 'ort-merged', b1, q), p50(result, 'ort-merged-int8-static', b1, q))} |"
        )
    for q in seqs:
        for b in batches:
            lines.append(
                f"| ORT format / .onnx ~ 1.00 | b{b} s{q} | {ratio(p50(result, 'ort-merged-ort', b, q), p50(result, 'ort-merged', b, q))} |"
            )
    for q in seqs:
        for b in batches:
            lines.append(
                f"| Transformers.js Node fp32 / ORT Python fp32 | b{b} s{q} | "
                f"{ratio(p50(result, 'tjs-node', b, q), p50(result, 'ort-merged', b, q))} |"
            )
    for q in seqs:
        for b in batches:
            lines.append(
                f"| ORT fp32, {s['threads']} threads vs 1 (speed-up) | b{b} s{q} | "
                f"{ratio(p50(result, 'ort-merged-1t', b, q), p50(result, 'ort-merged', b, q))} |"
            )
    acc = result["accuracy"]
    lines += ["", "## Accuracy of the exports", ""]
    if acc is None:
        lines.append(
            "Not measured: no trained adapter was found under runs/ (the random adapter's accuracy means nothing). "
            "Train one (`make demo`) and re-run."
        )
    elif "error" in acc:
        lines.append(f"Not measured: {acc['error']}")
    else:
        lines += [
            f"{acc['examples']} examples of {acc['data']} ({acc['split']}).",
            "",
            "| model | accuracy | change vs ORT merged fp32 (points) |",
            "|---|---:|---:|",
        ]
        ref = acc["accuracy"].get("ort-merged")
        for key, value in acc["accuracy"].items():
            lines.append(
                f"| {LABELS[key]} | {value:.4f} | {100 * (value - ref):+.2f} |"
                if ref is not None
                else f"| {LABELS[key]} | {value:.4f} | n/a |"
            )
    lines += ["", "## Export facts", "", "| export | size (MiB) | max abs logit diff vs PyTorch merged |", "|---|---:|---:|"]
    for key, size in result["sizes_mb"].items():
        lines.append(f"| {LABELS[key]} | {size} | {result['parity'][key]:.2e} |")
    ort_format = result.get("ort_format")
    if ort_format:
        diffs = ", ".join(f"{k} {v['max_abs_logit_diff']:.1e}" for k, v in ort_format["parity_vs_onnx"].items())
        lines += [
            "",
            f"ORT format: {', '.join(ort_format['models'])} (optimization style {ort_format['optimization_style']}), "
            f"{ort_format['operator_config_lines']} operator lines in {ort_format['operator_config']}; max abs logit diff vs the .onnx: {diffs}.",
        ]
    if result["fused_nodes"]:
        fused = ", ".join(f"{k} {v}" for k, v in result["fused_nodes"].items() if k not in ("complete", "layers"))
        lines += ["", f"Fused nodes in the optimised graph: {fused} (complete: {result['fused_nodes'].get('complete')})."]
    lines += ["", f"![p50 latency]({png_name})", ""]
    return "\n".join(lines)


def _calibration(calibration: dict | None) -> str:
    if not calibration:
        return "n/a"
    return f"{calibration.get('method')} on {calibration.get('data')}, {calibration.get('rows')} rows fed {calibration.get('fed')}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    shapes = [(b, q) for q in s["seq_lens"] for b in s["batch_sizes"]]
    keys = [k for k in ORDER if any(r["runtime"] == k for r in result["rows"])]
    fig, ax = plt.subplots(figsize=(11, 5.6))
    width = 0.8 / len(keys)
    x = np.arange(len(shapes))
    for i, key in enumerate(keys):
        values = [p50(result, key, b, q) or np.nan for b, q in shapes]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, values, width, label=LABELS[key])
    ax.set_yscale("log")
    ax.set_xticks(x, [f"batch {b}\nseq {q}" for b, q in shapes])
    ax.set_ylabel("p50 latency per call (ms, log scale)")
    ax.set_title(f"MetaTT serving forms, {s['threads']} threads, {result['machine']['cpu_count']}-core CPU")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
