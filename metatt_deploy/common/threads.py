"""How many threads the computing verbs use, and the ONNX Runtime session options that follow.

Default: every CPU this process may run on (``os.sched_getaffinity``). Measured on the 2-core
machine with MiniLM (docs/latency.md, tools/bench_multitask.py with ``--threads 1,2``): 2
intra-op threads beat 1 at every batch size and sequence length for ONNX Runtime and PyTorch
alike, so the default is all of them; more threads than CPUs only adds contention.
"""

from __future__ import annotations

import os

from metatt_deploy.common.errors import MetaTTError

GRAPH_OPTIMIZATION_LEVEL = "ORT_ENABLE_ALL"
INTER_OP_THREADS = 1  # sequential execution: one graph, its nodes in order; intra-op threads do the work


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(threads: int | None) -> int:
    """``threads`` checked, or the default (every available CPU)."""
    if threads is None:
        return available_cpus()
    if threads < 1:
        raise MetaTTError(f"--threads is {threads}; give at least 1 (default: {available_cpus()}, the CPUs available)")
    return int(threads)


def session_options_record(threads: int | None) -> dict:
    """The inference session options as the manifest records them."""
    return {
        "intra_op_num_threads": resolve_threads(threads),
        "inter_op_num_threads": INTER_OP_THREADS,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": GRAPH_OPTIMIZATION_LEVEL,
    }
