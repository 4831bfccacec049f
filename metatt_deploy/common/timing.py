"""Timing several runtimes fairly on a shared machine, and summarizing the times.

Used by ``validate`` (export/validate.py, export/validate_lm.py) and the benchmark tools; torch-free,
so the runtime floor could time itself too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / mean in milliseconds of a list of durations in seconds."""
    ms = np.asarray(times_s, dtype=np.float64) * 1000.0
    return {
        "p50_ms": round(float(np.median(ms)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "repeats": int(ms.size),
    }


ROUNDS = 3
SETTLE_S = 0.05


def time_round_robin(
    fns: dict[Any, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 30,
    rounds: int = ROUNDS,
    max_seconds: float | None = None,
) -> dict[Any, list[float]]:
    """Time every function ``repeats`` times, in ``rounds`` interleaved blocks.

    Each function runs a block of consecutive calls per round, the functions taking turns, so
    background load on a shared machine falls on all of them alike and their ratios hold up.
    Blocks rather than single alternating calls: thread pools (ONNX Runtime's, OpenMP's)
    spin-wait for a while after a call, and a different runtime started right then would
    compete with those spinning threads; a short pause before each block lets them settle.
    Every block starts with ``warmup`` untimed calls on its first round (one afterwards).
    ``max_seconds`` caps each function's time per shape: every round gets an equal share, and a
    block (warm-up or timed calls) stops once its share is spent, after at least one call; so
    every function gets at least one timed call per round.
    """
    rounds = max(1, min(rounds, repeats))
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    budget = None if max_seconds is None else max_seconds / rounds
    times: dict[Any, list[float]] = {k: [] for k in fns}
    for r, count in enumerate(per_round):
        for key, fn in fns.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            for _ in range(warmup if r == 0 else min(1, warmup)):
                fn()
                if budget is not None and time.perf_counter() - start > budget:
                    break
            start = time.perf_counter()
            for _ in range(count):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
                if budget is not None and time.perf_counter() - start > budget:
                    break
    return times
