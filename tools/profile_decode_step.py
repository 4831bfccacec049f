"""Where a decoder bundle's decode step spends its time: ONNX Runtime's profiler, summed per operator type.

One decode step at batch ``--rows`` (one new token per row after a KV cache of ``--past`` positions,
random cache contents: the work does not depend on them; a factored bundle's ``--graph
model_tasks.onnx`` gets task ids 0, 1, 2, ... per row, as a mixed-task server step does), run
``--steps`` times on the CPU with
``--threads`` intra-op threads. Prints the median wall time of a step and the kernel time per
step of the heaviest operator types, for each bundle in turn. This is what shows how much of a
step the weight MatMuls are (what int4 can speed up) and how much the rest of the graph is.

    python tools/profile_decode_step.py exported/smollm2-movie-sentiment exported/smollm2-movie-sentiment-int4
    python tools/profile_decode_step.py runs/llm-load/bundle --graph model_tasks.onnx --rows 8 --tasks 3
    python tools/profile_decode_step.py runs/llm-load/bundle --graph model_tasks.onnx --rows 4 --compare-tasks 1,3 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def decode_feeds(session: ort.InferenceSession, past: int, rows: int = 1, tasks: int = 1) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    feeds = {
        "input_ids": np.full((rows, 1), 123, dtype=np.int64),
        "attention_mask": np.ones((rows, past + 1), dtype=np.int64),
        "position_ids": np.full((rows, 1), past, dtype=np.int64),
    }
    if "task_ids" in names:
        feeds["task_ids"] = np.arange(rows, dtype=np.int64) % tasks
    rng = np.random.default_rng(0)
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            heads, head_dim = i.shape[1], i.shape[3]
            feeds[i.name] = rng.normal(size=(rows, heads, past, head_dim)).astype(np.float32)
    return {k: v for k, v in feeds.items() if k in names}


def profile(bundle: Path, steps: int, past: int, threads: int, top: int, graph: str = "model.onnx", rows: int = 1, tasks: int = 1) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="metatt-profile-") as tmp:
        options.profile_file_prefix = os.path.join(tmp, "decode")
        session = ort.InferenceSession(str(bundle / graph), options, providers=["CPUExecutionProvider"])
        feeds = decode_feeds(session, past, rows, tasks)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    print(
        f"{bundle / graph}, {rows} row(s): step {statistics.median(times) * 1000:.1f} ms (median of {steps}), kernels {total / 1000 / steps:.1f} ms/step"
    )
    for op, us in per_op.most_common(top):
        print(f"  {op}: {us / 1000 / steps:.2f} ms/step ({us / total:.0%})")


def compare_tasks(bundle: Path, graph: str, rows: int, past: int, threads: int, steps: int, counts: list[int]) -> None:
    """One session, one step per task count in turn (``steps`` rounds): the same batch with 1 task or several, side by side.

    Interleaving makes the machine's drifting load hit every count alike; CPU seconds of this
    process (``time.process_time``, all its threads) are printed beside wall time because a shared
    CPU blurs wall time (with 1 thread, CPU time is the step's own work).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    session = ort.InferenceSession(str(bundle / graph), options, providers=["CPUExecutionProvider"])
    feeds = {n: decode_feeds(session, past, rows, n) for n in counts}
    wall: dict[int, list[float]] = {n: [] for n in counts}
    cpu: dict[int, list[float]] = {n: [] for n in counts}
    for n in counts:  # warm-up
        session.run(None, feeds[n])
    for _ in range(steps):
        for n in counts:
            w, c = time.perf_counter(), time.process_time()
            session.run(None, feeds[n])
            wall[n].append(time.perf_counter() - w)
            cpu[n].append(time.process_time() - c)
    first = counts[0]
    for n in counts:
        ratio_w = statistics.median(wall[n]) / statistics.median(wall[first])
        ratio_c = statistics.median(cpu[n]) / statistics.median(cpu[first])
        print(
            f"{bundle / graph}, {rows} row(s), {n} task(s): step {statistics.median(wall[n]) * 1000:.1f} ms wall, "
            f"{statistics.median(cpu[n]) * 1000:.1f} ms CPU (median of {steps}); {ratio_w:.3f}x / {ratio_c:.3f}x {first} task(s)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path, help="decoder bundles written by metatt-deploy export")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--past", type=int, default=32, help="positions already in the KV cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--graph", default="model.onnx", help="the graph file in each folder (a factored bundle: model_tasks.onnx)")
    ap.add_argument("--rows", type=int, default=1, help="rows of the batch (a server step's running sequences)")
    ap.add_argument("--tasks", type=int, default=1, help="model_tasks.onnx: row i runs task i mod this")
    ap.add_argument(
        "--compare-tasks", default="", help="e.g. 1,3: no profile; steps with each task count interleaved in one session, wall and CPU"
    )
    args = ap.parse_args()
    for bundle in args.bundles:
        if args.compare_tasks:
            compare_tasks(
                bundle, args.graph, args.rows, args.past, args.threads, args.steps, [int(n) for n in args.compare_tasks.split(",")]
            )
        else:
            profile(bundle, args.steps, args.past, args.threads, args.top, args.graph, args.rows, args.tasks)


if __name__ == "__main__":
    main()
