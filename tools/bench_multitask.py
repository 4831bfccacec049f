"""Benchmark serving T tasks from one factored bundle against T merged ONNX models.

    python tools/bench_multitask.py --adapter runs/multitask-3/best [--work runs/bench-mt] [--threads 1,2]

Measures, on ONNX Runtime's CPU execution provider (fixed-shape random token ids):

1. task switch: the first factored call after switching task (form a: a different task id;
   form b: a task whose .onnx_adapter is loaded for the first time) against loading the merged
   model of the new task into a fresh session plus its first call; the switch *overhead* is
   that first call minus a steady-state call;
2. a mixed batch of K tasks: one factored call against K calls to K merged sessions;
3. disk and resident memory for T tasks: one bundle against T merged models (RSS measured in a
   fresh subprocess per configuration);
4. latency at batch 1 (each of --seqs) and 32 (seq --seq): factored (model_tasks.onnx) against
   merged (optimum's plain fp32 export, no transformer fusions on either side), and the mixed
   batch of 2., at every thread count of --threads, all timed in one round robin
   (common/timing.time_round_robin), so the ratios at 1 and 2 threads are measured side by side;
5. where the time goes: ONNX Runtime's profiler (SessionOptions.enable_profiling) on both graphs
   at batch 1, per operator type, per call (--profile-calls calls, 1 thread).

Sections 1 and 3 use the first thread count of --threads.

Writes docs/reports/multitask-bench.md, docs/reports/multitask-bench.json and docs/reports/multitask-bench.png.

Internals (what this measures lies below the public API, docs/api.md):

- metatt_deploy.common.threads: the session options `serve` uses, applied to the profiled sessions.
- metatt_deploy.common.timing: validate's round-robin timer and summary, so these figures are measured as validate measures them.
- metatt_deploy.inference.formats: the bundle's file names and task records: the benchmark opens each graph of the bundle by itself.
- metatt_deploy.inference.sessions: a bare ONNX Runtime session per graph, timed without a `Runtime`'s tokenizing.
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

from metatt_deploy import export_onnx, merge_adapter, write_bundle  # noqa: E402
from metatt_deploy.common.files import atomic_write_json, atomic_write_text  # noqa: E402
from metatt_deploy.common.report import markdown_table, save_figure  # noqa: E402
from metatt_deploy.common.timing import summarize, time_round_robin  # noqa: E402
from metatt_deploy.inference.formats import ADAPTER_GRAPH, TASK_GRAPH, TASKS_DIR, read_bundle, task_records  # noqa: E402
from metatt_deploy.inference.sessions import make_session  # noqa: E402

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


def profile(path: Path, feed: dict[str, np.ndarray], threads: int, calls: int, work: Path) -> dict:
    """ONNX Runtime's profiler over ``calls`` calls: per-call microseconds and node count by operator type."""
    import onnxruntime as ort

    from metatt_deploy.common.threads import session_options_record

    record = session_options_record(threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, record["graph_optimization_level"])
    options.intra_op_num_threads, options.inter_op_num_threads = record["intra_op_num_threads"], record["inter_op_num_threads"]
    options.enable_profiling = True
    options.profile_file_prefix = str(work / f"profile-{path.stem}")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=CPU)
    names = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    for _ in range(3 + calls):  # 3 warm-up calls, whose events are dropped below
        session.run(None, feed)
    profile_file = Path(session.end_profiling())
    events = json.loads(profile_file.read_text())
    profile_file.unlink()
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[3:]
    first = runs[0]["ts"]
    by_op: dict[str, float] = {}
    nodes: dict[str, set] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < first:
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"] / calls
        nodes.setdefault(op, set()).add(e["name"])
    return {
        "run_us": float(np.median([e["dur"] for e in runs])),
        "kernel_us": sum(by_op.values()),
        "nodes": sum(len(v) for v in nodes.values()),
        "by_op": {op: {"us": by_op[op], "nodes": len(nodes[op])} for op in sorted(by_op, key=by_op.get, reverse=True)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="multi-task adapter (a run's best/)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-multitask")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "reports")
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts, measured side by side")
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the batch-32, mixed and switch measurements")
    parser.add_argument("--seqs", default="32,128", help="sequence lengths of the batch-1 latency")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--switches", type=int, default=15)
    parser.add_argument("--profile-calls", type=int, default=20, help="profiled calls per graph (0: no profile)")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    threads = thread_counts[0]

    bundle, merged, build_times = build(args.adapter, args.work)
    info = read_bundle(bundle)
    tasks = info["tasks"]
    records = {r["task"]: r for r in task_records(bundle, info)}
    vocab = json.loads((bundle / "base" / "config.json").read_text())["vocab_size"]
    factored_by = {t: make_session(bundle / TASK_GRAPH, CPU, t) for t in thread_counts}
    merged_by = {t: {task: make_session(merged[task], CPU, t) for task in tasks} for t in thread_counts}
    sessions = merged_by[threads]
    adapter_graph = make_session(bundle / ADAPTER_GRAPH, CPU, threads)
    results: dict = {
        "model": info["base_model"],
        "tasks": tasks,
        "threads": thread_counts,
        "seq": args.seq,
        "provider": "CPUExecutionProvider",
        "build": build_times,
        "machine": {"cpus": os.cpu_count(), "load_average_1min_start": os.getloadavg()[0]},
    }

    def fac(feed, ids, t=threads):
        return factored_by[t].run(["logits"], {**feed, "task_ids": np.asarray(ids, dtype=np.int64)})[0]

    # ---- 4. latency at batch 1 (each seq) and 32, and the mixed batch of K tasks (2.), every thread count side by side
    k_tasks = len(tasks)
    mixed_batch = 32
    mixed_feed = inputs(mixed_batch, args.seq, vocab, seed=2)
    ids = [i % k_tasks for i in range(mixed_batch)]
    groups = {t: [i for i in range(mixed_batch) if ids[i] == t] for t in range(k_tasks)}

    def merged_calls(t):
        for task, rows in groups.items():
            merged_by[t][tasks[task]].run(["logits"], {k: v[rows] for k, v in mixed_feed.items()})

    # at 1 thread ONNX Runtime computes on the calling thread, so its CPU time (time.thread_time) is
    # the call's cost without the waits a loaded machine adds to wall time: reported beside p50
    cpu: dict = {}

    def cpu_timed(key, fn):
        if key[1] != 1:
            return fn

        def call():
            start = time.thread_time()
            fn()
            cpu.setdefault(key, []).append(time.thread_time() - start)

        return call

    def with_cpu(row: dict, t: int, f_key, m_key) -> dict:
        if t == 1:
            f_cpu, m_cpu = (1000 * float(np.median(cpu.pop(k))) for k in (f_key, m_key))
            row.update({"factored_cpu_ms": f_cpu, "merged_cpu_ms": m_cpu, "cpu factored/merged": f_cpu / m_cpu})
        return row

    shapes = [(1, int(q)) for q in args.seqs.split(",")] + [(32, args.seq)]
    latency = []
    for batch, seq in shapes:
        feed = inputs(batch, seq, vocab)
        fns = {}
        for t in thread_counts:
            fns[("factored", t)] = lambda f=feed, b=batch, t=t: fac(f, [0] * b, t)
            fns[("merged", t)] = lambda f=feed, t=t: merged_by[t][tasks[0]].run(["logits"], f)
        fns = {k: cpu_timed(k, fn) for k, fn in fns.items()}
        times = time_round_robin(fns, warmup=2, repeats=args.repeats if batch == 1 else max(4, args.repeats // 3), rounds=3)
        for t in thread_counts:
            f, m = summarize(times[("factored", t)]), summarize(times[("merged", t)])
            latency.append(
                with_cpu(
                    {
                        "batch": batch,
                        "seq": seq,
                        "threads": t,
                        "factored_p50_ms": f["p50_ms"],
                        "merged_p50_ms": m["p50_ms"],
                        "factored/merged": f["p50_ms"] / m["p50_ms"],
                    },
                    t,
                    ("factored", t),
                    ("merged", t),
                )
            )
            print("latency", latency[-1], flush=True)
    results["latency"] = latency

    fns = {}
    for t in thread_counts:
        fns[("factored", t)] = lambda t=t: fac(mixed_feed, ids, t)
        fns[("merged", t)] = lambda t=t: merged_calls(t)
    fns = {k: cpu_timed(k, fn) for k, fn in fns.items()}
    times = time_round_robin(fns, warmup=1, repeats=max(6, args.repeats // 2), rounds=3)
    mixed = []
    for t in thread_counts:
        f, m = summarize(times[("factored", t)]), summarize(times[("merged", t)])
        mixed.append(
            with_cpu(
                {
                    "batch": mixed_batch,
                    "tasks": k_tasks,
                    "seq": args.seq,
                    "threads": t,
                    "factored_one_call_p50_ms": f["p50_ms"],
                    "merged_k_calls_p50_ms": m["p50_ms"],
                    "factored/merged": f["p50_ms"] / m["p50_ms"],
                },
                t,
                ("factored", t),
                ("merged", t),
            )
        )
        print("mixed", mixed[-1], flush=True)
    # check the mixed call is right while at it: each row equals its merged model's logits
    out = fac(mixed_feed, ids)
    worst = 0.0
    for task, rows in groups.items():
        ref = sessions[tasks[task]].run(["logits"], {k: v[rows] for k, v in mixed_feed.items()})[0]
        worst = max(worst, float(np.abs(out[rows, : ref.shape[1]] - ref).max()))
    for row in mixed:
        row["max_abs_logit_diff_vs_merged"] = worst
    results["mixed"] = mixed

    # ---- 5. profile (1 thread: operator times add up to the call)
    if args.profile_calls > 0:
        results["profile"] = {}
        for seq in [int(q) for q in args.seqs.split(",")]:
            feed = {**inputs(1, seq, vocab, seed=3), "task_ids": np.zeros(1, dtype=np.int64)}
            results["profile"][seq] = {
                "factored": profile(bundle / TASK_GRAPH, feed, 1, args.profile_calls, args.work),
                "merged": profile(merged[tasks[0]], feed, 1, args.profile_calls, args.work),
            }
            print("profile", seq, {k: (v["run_us"], v["nodes"]) for k, v in results["profile"][seq].items()}, flush=True)

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
        make_session(merged[task], CPU, threads).run(["logits"], one)

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
        "threads": threads,
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
        "rss_factored_task_graph_mib": resident([bundle / TASK_GRAPH], threads),
        "rss_factored_adapter_graph_mib": resident([bundle / ADAPTER_GRAPH], threads, adapters),
        "rss_merged_all_tasks_mib": resident([merged[t] for t in tasks], threads),
    }
    print("footprint", results["footprint"], flush=True)
    results["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    write_report(results, args.docs)


def profile_lines(prof: dict | None) -> list[str]:
    """The profiler section: per-call operator time of both graphs at batch 1, by operator type."""
    if not prof:
        return []
    lines = [
        "\n## Where the time goes (ONNX Runtime profiler, batch 1, 1 thread)\n",
        "Per call: medians of the profiled `model_run` events; operator times are means of the kernel events "
        "(so they add up to less than the run: the rest is the executor's own work between kernels).\n",
    ]
    for seq, both in prof.items():
        f, m = both["factored"], both["merged"]
        lines.append(
            f"\nSeq {seq}: run {f['run_us']:.0f} us factored vs {m['run_us']:.0f} us merged ({f['run_us'] / m['run_us']:.3f}x); "
            f"kernels {f['kernel_us']:.0f} vs {m['kernel_us']:.0f} us; {f['nodes']} vs {m['nodes']} nodes.\n"
        )
        ops = sorted(
            set(f["by_op"]) | set(m["by_op"]), key=lambda o: -abs(f["by_op"].get(o, {}).get("us", 0) - m["by_op"].get(o, {}).get("us", 0))
        )
        rows = []
        for op in ops[:12]:
            fo, mo = f["by_op"].get(op, {"us": 0.0, "nodes": 0}), m["by_op"].get(op, {"us": 0.0, "nodes": 0})
            rows.append(
                {
                    "operator": op,
                    "factored us": fo["us"],
                    "factored nodes": fo["nodes"],
                    "merged us": mo["us"],
                    "merged nodes": mo["nodes"],
                    "difference us": fo["us"] - mo["us"],
                }
            )
        lines.append(markdown_table(rows, floatfmt=".1f"))
    return lines


def write_report(r: dict, docs: Path) -> None:
    import matplotlib.pyplot as plt

    s, m, fp = r["switch"], r["mixed"], r["footprint"]
    lines = [
        "# Multi-task serving: factored bundle vs merged models\n",
        f"Written by `tools/bench_multitask.py`. Model `{r['model']}` with {len(r['tasks'])} tasks "
        f"({', '.join(r['tasks'])}); ONNX Runtime {r['provider']}, {' and '.join(map(str, r['threads']))} intra-op thread(s) "
        f"(timed side by side in one round robin; the task switch and footprint at {r['threads'][0]}), random token ids "
        f"(fixed shapes; the batch-32, mixed and switch rows at length {r['seq']}). Merged = optimum's plain fp32 export of each task's merged model; "
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
        f"\n## Mixed batch ({m[0]['batch']} rows, {m[0]['tasks']} tasks)\n\n" + markdown_table(m, floatfmt=".3f"),
        *profile_lines(r.get("profile")),
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
    xl = np.arange(len(lat))
    axes[0].bar(xl - 0.2, [row["factored_p50_ms"] for row in lat], 0.4, label="factored")
    axes[0].bar(xl + 0.2, [row["merged_p50_ms"] for row in lat], 0.4, label="merged")
    axes[0].set(
        xticks=xl,
        xticklabels=[f"b{row['batch']} s{row['seq']}\n{row['threads']}t" for row in lat],
        ylabel="ms (p50)",
        title="latency",
        yscale="log",
    )
    axes[0].tick_params(axis="x", labelsize=7)
    axes[0].legend()
    axes[1].bar(
        ["task ids", "adapter", "merged"],
        [s["factored_task_ids_first_call_ms"], s["factored_adapter_first_call_ms"], s["merged_fresh_session_plus_first_call_ms"]],
        color=["C0", "C2", "C1"],
    )
    axes[1].set(ylabel="ms", title="first call after a task switch", yscale="log")
    xm = np.arange(len(m))
    axes[2].bar(xm - 0.2, [row["factored_one_call_p50_ms"] for row in m], 0.4, label="factored, 1 call")
    axes[2].bar(xm + 0.2, [row["merged_k_calls_p50_ms"] for row in m], 0.4, label=f"merged, {m[0]['tasks']} calls")
    axes[2].set(xticks=xm, xticklabels=[f"{row['threads']} thread(s)" for row in m], ylabel="ms (p50)")
    axes[2].set_title(f"mixed batch of {m[0]['tasks']} tasks")
    axes[2].legend()
    x = np.arange(2)
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
