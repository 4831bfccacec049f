"""Benchmark serving T tasks from one factored bundle against T merged ONNX models.

    python tools/bench_multitask.py --adapter runs/multitask-3/best [--work runs/bench-mt] [--threads 1]

Measures, on ONNX Runtime's CPU execution provider (fixed-shape random token ids, seq 128):

1. task switch: the first factored call after switching task (form a: a different task id;
   form b: a task whose .onnx_adapter is loaded for the first time) against loading the merged
   model of the new task into a fresh session plus its first call; the switch *overhead* is
   that first call minus a steady-state call;
2. a mixed batch of K tasks: one factored call against K calls to K merged sessions;
3. disk and resident memory for T tasks: one bundle against T merged models (RSS measured in a
   fresh subprocess per configuration);
4. latency at batch 1 and 32: factored (model_tasks.onnx) against merged (optimum's plain fp32
   export, no transformer fusions on either side), timed round-robin (validate.time_round_robin).

Writes docs/multitask-bench.md, docs/multitask-bench.json and docs/multitask-bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metatt_deploy.common.files import atomic_write_json, atomic_write_text  # noqa: E402
from metatt_deploy.common.report import markdown_table, save_figure  # noqa: E402
from metatt_deploy.export.factored import ADAPTER_GRAPH, TASK_GRAPH, TASKS_DIR, read_bundle, task_records, write_bundle  # noqa: E402
from metatt_deploy.export.merge import merge_adapter  # noqa: E402
from metatt_deploy.export.onnx import export_onnx, make_session  # noqa: E402
from metatt_deploy.export.validate import summarize, time_round_robin  # noqa: E402

CPU = ["CPUExecutionProvider"]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def build(adapter: Path, work: Path) -> tuple[Path, dict[str, Path], dict]:
    """The bundle and one merged ONNX export per task (re-used when present)."""
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "bundle"
    timings = {}
    if not bundle.exists():
        t0 = time.perf_counter()
        write_bundle(adapter, bundle)
        timings["bundle_s"] = time.perf_counter() - t0
    tasks = read_bundle(bundle)["tasks"]
    merged = {}
    for task in tasks:
        out = work / f"onnx-{task}"
        if not out.exists():
            t0 = time.perf_counter()
            merge_adapter(adapter, work / f"merged-{task}", task=task, force=True)
            export_onnx(work / f"merged-{task}", out, force=True)
            timings[f"merged_export_{task}_s"] = time.perf_counter() - t0
        merged[task] = out / "model.onnx"
    return bundle, merged, timings


def inputs(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


RSS_SCRIPT = r"""
import json, os, sys, psutil, numpy as np, onnxruntime as ort
paths = json.loads(sys.argv[1]); threads = int(sys.argv[2]); adapters = json.loads(sys.argv[3])
proc = psutil.Process()
before = proc.memory_info().rss
o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1; o.log_severity_level = 3
ids = np.full((1, 16), 1037, dtype=np.int64); ids[:, 0] = 101
feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
kept = []
for p in paths:
    s = ort.InferenceSession(p, o, providers=["CPUExecutionProvider"]); kept.append(s)
    names = {i.name for i in s.get_inputs()}
    f = {k: v for k, v in feed.items() if k in names}
    if "task_ids" in names:
        f["task_ids"] = np.zeros(1, dtype=np.int64)
    if adapters:
        for a in adapters:
            lo = ort.LoraAdapter(); lo.Load(a); kept.append(lo)
            r = ort.RunOptions(); r.add_active_adapter(lo); s.run(None, f, r)
    else:
        s.run(None, f)
print(json.dumps({"rss_mib": (proc.memory_info().rss - before) / 2**20}))
"""


def resident(paths: list[Path], threads: int, adapters: list[Path] | None = None) -> float:
    """RSS growth (MiB) of a fresh process that loads ``paths`` (and runs one call on each)."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, json.dumps([str(p) for p in paths]), str(threads), json.dumps([str(a) for a in adapters or []])],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def run_options(path: Path):
    """RunOptions with the adapter at ``path`` active, and the adapter (keep it alive while the options are used)."""
    import onnxruntime as ort

    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="multi-task adapter (a run's best/)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-multitask")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--switches", type=int, default=15)
    args = parser.parse_args()

    bundle, merged, build_times = build(args.adapter, args.work)
    info = read_bundle(bundle)
    tasks = info["tasks"]
    records = {r["task"]: r for r in task_records(bundle, info)}
    vocab = json.loads((bundle / "base" / "config.json").read_text())["vocab_size"]
    factored = make_session(bundle / TASK_GRAPH, CPU, args.threads)
    adapter_graph = make_session(bundle / ADAPTER_GRAPH, CPU, args.threads)
    sessions = {t: make_session(merged[t], CPU, args.threads) for t in tasks}
    results: dict = {
        "model": info["base_model"],
        "tasks": tasks,
        "threads": args.threads,
        "seq": args.seq,
        "provider": "CPUExecutionProvider",
        "build": build_times,
        "machine": {"cpus": os.cpu_count(), "load_average_1min_start": os.getloadavg()[0]},
    }

    def fac(feed, ids):
        return factored.run(["logits"], {**feed, "task_ids": np.asarray(ids, dtype=np.int64)})[0]

    # ---- 4. latency at batch 1 and 32
    latency = []
    for batch in (1, 32):
        feed = inputs(batch, args.seq, vocab)
        times = time_round_robin(
            {
                "factored": lambda f=feed, b=batch: fac(f, [0] * b),
                "merged": lambda f=feed: sessions[tasks[0]].run(["logits"], f),
            },
            warmup=2,
            repeats=args.repeats if batch == 1 else max(4, args.repeats // 3),
            rounds=3,
        )
        f, m = summarize(times["factored"]), summarize(times["merged"])
        latency.append(
            {
                "batch": batch,
                "seq": args.seq,
                "factored_p50_ms": f["p50_ms"],
                "merged_p50_ms": m["p50_ms"],
                "factored/merged": f["p50_ms"] / m["p50_ms"],
            }
        )
        print("latency", latency[-1], flush=True)
    results["latency"] = latency

    # ---- 1. task switch: every switch is timed next to a call that stays on the same task, in the
    # same state (right after a task-0 call), so machine drift cancels in the difference
    one = inputs(1, args.seq, vocab, seed=1)
    options0, adapter0 = run_options(bundle / TASKS_DIR / records[tasks[0]]["files"]["onnx_adapter"]["file"])

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000

    def adapter_switch(task: str) -> None:
        options, _adapter = run_options(bundle / TASKS_DIR / records[task]["files"]["onnx_adapter"]["file"])
        adapter_graph.run(["logits"], one, options)

    def fresh_session(task: str) -> None:
        make_session(merged[task], CPU, args.threads).run(["logits"], one)

    same_a, switch_a, same_b, switch_b, same_m, fresh = [], [], [], [], [], []
    for _ in range(2):  # warm-up
        fac(one, [0])
        adapter_graph.run(["logits"], one, options0)
        sessions[tasks[0]].run(["logits"], one)
    for k in range(args.switches):
        new = tasks[(k % (len(tasks) - 1)) + 1]  # alternate away from task 0
        fac(one, [0])
        same_a.append(timed(lambda: fac(one, [0])))
        fac(one, [0])
        switch_a.append(timed(lambda: fac(one, [tasks.index(new)])))  # noqa: B023 (run before `new` changes)
        adapter_graph.run(["logits"], one, options0)
        same_b.append(timed(lambda: adapter_graph.run(["logits"], one, options0)))
        adapter_graph.run(["logits"], one, options0)
        switch_b.append(timed(lambda: adapter_switch(new)))  # noqa: B023
        sessions[tasks[0]].run(["logits"], one)
        same_m.append(timed(lambda: sessions[tasks[0]].run(["logits"], one)))
        fresh.append(timed(lambda: fresh_session(new)))  # noqa: B023
    steady, steady_b, steady_m = (float(np.median(v)) for v in (same_a, same_b, same_m))
    fa, fb, fm = float(np.median(switch_a)), float(np.median(switch_b)), float(np.median(fresh))
    results["switch"] = {
        "batch": 1,
        "seq": args.seq,
        "factored_task_ids_first_call_ms": fa,
        "factored_task_ids_steady_ms": steady,
        "factored_adapter_first_call_ms": fb,
        "factored_adapter_steady_ms": steady_b,
        "merged_fresh_session_plus_first_call_ms": fm,
        "merged_steady_ms": steady_m,
        "overhead_task_ids_ms": fa - steady,
        "overhead_adapter_ms": fb - steady_b,
        "overhead_merged_ms": fm - steady_m,
        "first_call_ratio_task_ids": fa / fm,
        "first_call_ratio_adapter": fb / fm,
        "overhead_ratio_task_ids": max(0.0, fa - steady) / (fm - steady_m),
        "overhead_ratio_adapter": max(0.0, fb - steady_b) / (fm - steady_m),
    }
    print("switch", results["switch"], flush=True)

    # ---- 2. mixed batch of K tasks
    k_tasks = len(tasks)
    batch = 32
    feed = inputs(batch, args.seq, vocab, seed=2)
    ids = [i % k_tasks for i in range(batch)]
    groups = {t: [i for i in range(batch) if ids[i] == t] for t in range(k_tasks)}

    def merged_calls():
        for t, rows in groups.items():
            sessions[tasks[t]].run(["logits"], {k: v[rows] for k, v in feed.items()})

    times = time_round_robin(
        {"factored": lambda: fac(feed, ids), "merged": merged_calls}, warmup=1, repeats=max(4, args.repeats // 3), rounds=2
    )
    f, m = summarize(times["factored"]), summarize(times["merged"])
    results["mixed"] = {
        "batch": batch,
        "tasks": k_tasks,
        "seq": args.seq,
        "factored_one_call_p50_ms": f["p50_ms"],
        "merged_k_calls_p50_ms": m["p50_ms"],
        "factored/merged": f["p50_ms"] / m["p50_ms"],
    }
    print("mixed", results["mixed"], flush=True)
    # check the mixed call is right while at it: each row equals its merged model's logits
    out = fac(feed, ids)
    worst = 0.0
    for t, rows in groups.items():
        ref = sessions[tasks[t]].run(["logits"], {k: v[rows] for k, v in feed.items()})[0]
        worst = max(worst, float(np.abs(out[rows, : ref.shape[1]] - ref).max()))
    results["mixed"]["max_abs_logit_diff_vs_merged"] = worst

    # ---- 3. disk and memory
    task_files = [p for p in (bundle / TASKS_DIR).iterdir()]
    serve_a = (bundle / TASK_GRAPH).stat().st_size + sum(p.stat().st_size for p in task_files if p.suffix in (".json", ".safetensors"))
    serve_b = (bundle / ADAPTER_GRAPH).stat().st_size + sum(p.stat().st_size for p in task_files if p.suffix in (".json", ".onnx_adapter"))
    merged_bytes = sum(merged[t].stat().st_size for t in tasks)
    per_task = {t: sum(p.stat().st_size for p in task_files if p.stem == t) for t in tasks}
    adapters = [bundle / TASKS_DIR / records[t]["files"]["onnx_adapter"]["file"] for t in tasks]
    results["footprint"] = {
        "tasks": len(tasks),
        "disk_factored_task_graph_and_task_files_mib": serve_a / 2**20,
        "disk_factored_adapter_graph_and_adapters_mib": serve_b / 2**20,
        "disk_whole_bundle_mib": dir_bytes(bundle) / 2**20,
        "disk_merged_onnx_total_mib": merged_bytes / 2**20,
        "disk_per_task_files_kib": {t: b / 1024 for t, b in per_task.items()},
        "rss_factored_task_graph_mib": resident([bundle / TASK_GRAPH], args.threads),
        "rss_factored_adapter_graph_mib": resident([bundle / ADAPTER_GRAPH], args.threads, adapters),
        "rss_merged_all_tasks_mib": resident([merged[t] for t in tasks], args.threads),
    }
    print("footprint", results["footprint"], flush=True)
    results["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    write_report(results, args.docs)


def write_report(r: dict, docs: Path) -> None:
    import matplotlib.pyplot as plt

    s, m, fp = r["switch"], r["mixed"], r["footprint"]
    lines = [
        "# Multi-task serving: factored bundle vs merged models\n",
        f"Written by `tools/bench_multitask.py`. Model `{r['model']}` with {len(r['tasks'])} tasks "
        f"({', '.join(r['tasks'])}); ONNX Runtime {r['provider']}, {r['threads']} intra-op thread(s), random token ids "
        f"of length {r['seq']} (fixed shapes). Merged = optimum's plain fp32 export of each task's merged model; "
        "factored = `model_tasks.onnx` (task ids as an input) unless noted. Neither side uses ONNX Runtime's "
        f"transformer fusions. Machine: {r['machine']['cpus']} CPUs, 1-minute load average "
        f"{r['machine']['load_average_1min_start']:.1f} at the start and {r['machine']['load_average_1min_end']:.1f} at the "
        "end (other jobs may share it); medians of round-robin blocks, so ratios matter more than absolute numbers.\n",
        "\n## Latency (p50)\n\n" + markdown_table(r["latency"], floatfmt=".3f"),
        "\n## Task switch (batch 1)\n\n"
        + markdown_table(
            [
                {
                    "how": "factored, task ids (another id in the next call)",
                    "first call after switch ms": s["factored_task_ids_first_call_ms"],
                    "steady call ms": s["factored_task_ids_steady_ms"],
                    "switch overhead ms": s["overhead_task_ids_ms"],
                },
                {
                    "how": "factored, adapter graph (load the task's .onnx_adapter + call)",
                    "first call after switch ms": s["factored_adapter_first_call_ms"],
                    "steady call ms": s["factored_adapter_steady_ms"],
                    "switch overhead ms": s["overhead_adapter_ms"],
                },
                {
                    "how": "merged (fresh session of the new task's model + call)",
                    "first call after switch ms": s["merged_fresh_session_plus_first_call_ms"],
                    "steady call ms": s["merged_steady_ms"],
                    "switch overhead ms": s["overhead_merged_ms"],
                },
            ],
            floatfmt=".2f",
        ),
        f"\nFirst call after a switch relative to loading the merged model: task ids {100 * s['first_call_ratio_task_ids']:.2f}%, "
        f"adapter graph {100 * s['first_call_ratio_adapter']:.2f}% (target < 1%). Switch overhead relative to the merged "
        f"switch overhead: task ids {100 * s['overhead_ratio_task_ids']:.2f}%, adapter graph {100 * s['overhead_ratio_adapter']:.2f}%.\n",
        f"\n## Mixed batch ({m['batch']} rows, {m['tasks']} tasks)\n\n" + markdown_table([m], floatfmt=".3f"),
        f"\n## Footprint for {fp['tasks']} tasks\n\n"
        + markdown_table(
            [
                {
                    "what": "factored: model_tasks.onnx + task files",
                    "disk MiB": fp["disk_factored_task_graph_and_task_files_mib"],
                    "resident MiB": fp["rss_factored_task_graph_mib"],
                },
                {
                    "what": "factored: model_adapter.onnx + .onnx_adapter files",
                    "disk MiB": fp["disk_factored_adapter_graph_and_adapters_mib"],
                    "resident MiB": fp["rss_factored_adapter_graph_mib"],
                },
                {
                    "what": f"merged: {fp['tasks']} ONNX models",
                    "disk MiB": fp["disk_merged_onnx_total_mib"],
                    "resident MiB": fp["rss_merged_all_tasks_mib"],
                },
                {
                    "what": "whole bundle folder (base/ for PyTorch, both graphs, task files)",
                    "disk MiB": fp["disk_whole_bundle_mib"],
                    "resident MiB": None,
                },
            ],
            floatfmt=".1f",
        ),
        "\nPer-task files (KiB: safetensors + JSON + .onnx_adapter): "
        + ", ".join(f"{t} {v:.1f}" for t, v in fp["disk_per_task_files_kib"].items())
        + "\n",
        "\nResident memory: RSS growth of a fresh process that creates the session(s) and runs one call each.\n",
    ]
    atomic_write_text(docs / "multitask-bench.md", "\n".join(lines))
    atomic_write_json(docs / "multitask-bench.json", r)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    lat = r["latency"]
    x = np.arange(len(lat))
    axes[0].bar(x - 0.2, [row["factored_p50_ms"] for row in lat], 0.4, label="factored")
    axes[0].bar(x + 0.2, [row["merged_p50_ms"] for row in lat], 0.4, label="merged")
    axes[0].set(
        xticks=x, xticklabels=[f"batch {row['batch']}" for row in lat], ylabel="ms (p50)", title=f"latency, seq {r['seq']}", yscale="log"
    )
    axes[0].legend()
    axes[1].bar(
        ["task ids", "adapter", "merged"],
        [s["factored_task_ids_first_call_ms"], s["factored_adapter_first_call_ms"], s["merged_fresh_session_plus_first_call_ms"]],
        color=["C0", "C2", "C1"],
    )
    axes[1].set(ylabel="ms", title="first call after a task switch", yscale="log")
    axes[2].bar(
        ["factored\n1 call", f"merged\n{m['tasks']} calls"], [m["factored_one_call_p50_ms"], m["merged_k_calls_p50_ms"]], color=["C0", "C1"]
    )
    axes[2].set(ylabel="ms (p50)", title=f"mixed batch of {m['tasks']} tasks")
    axes[3].bar(x - 0.2, [fp["disk_factored_task_graph_and_task_files_mib"], fp["rss_factored_task_graph_mib"]], 0.4, label="factored")
    axes[3].bar(x + 0.2, [fp["disk_merged_onnx_total_mib"], fp["rss_merged_all_tasks_mib"]], 0.4, label="merged")
    axes[3].set(xticks=x, xticklabels=["disk", "resident"], ylabel="MiB", title=f"{fp['tasks']} tasks")
    axes[3].legend()
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, docs / "multitask-bench.png")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
