"""How many threads the computing verbs use, and the ONNX Runtime session options that follow.

Default: every CPU this process may run on (``os.sched_getaffinity``). Measured on the shared
2-core machine, 1 and 2 threads side by side in one run (docs/reports/latency.md, docs/reports/multitask-bench.md):
on the idle machine 2 threads won at every batch size and length, for ONNX Runtime and PyTorch
alike; under a load average of 3-10 (other jobs on both cores) 1 thread was 1.1-1.7x faster at
batch 1 and 8, the second thread waiting for a core, and at batch 32 either won (2 threads
1.25-1.6x faster in two runs, 1 thread 1.15-1.3x in a third). So the default is every CPU (it
wins idle and for batched work: training, validation, served micro-batches); ``--threads 1``
serves single sentences faster on a busy machine. More threads than CPUs only adds contention.
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
