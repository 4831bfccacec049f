"""Round-robin timing: every function gets its calls, warm-ups and a summary in milliseconds."""

from __future__ import annotations

from metatt_deploy.common.timing import summarize, time_round_robin


def test_round_robin_timing_and_summary():
    calls = {"a": 0, "b": 0}

    def make(key):
        def fn():
            calls[key] += 1

        return fn

    times = time_round_robin({"a": make("a"), "b": make("b")}, warmup=2, repeats=7, rounds=3)
    assert [len(times["a"]), len(times["b"])] == [7, 7]
    assert calls == {"a": 7 + 2 + 1 + 1, "b": 7 + 2 + 1 + 1}  # warm-up 2 on the first round, 1 after
    s = summarize([0.001, 0.002, 0.003])
    assert s["p50_ms"] == 2.0 and s["repeats"] == 3 and s["p95_ms"] <= 3.0
