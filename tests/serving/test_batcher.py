"""The dynamic batcher on a fake model: rows of different tasks share a call (or not, per task),
the wait is bounded, the queue is bounded, errors reach every caller, and close drains."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from metatt_deploy.serving.batcher import Batcher, Closed, QueueFull, answer_rows


class Fake:
    """A model that answers [len(text), task number] per row and records every call."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[list[str]] = []
        self.gate = gate

    def __call__(self, texts, tasks):
        if self.gate is not None:
            assert self.gate.wait(10)
        self.calls.append(list(tasks))
        return [np.array([len(t), ord(task[0])], dtype=np.float32) for t, task in zip(texts, tasks)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.mark.parametrize("cross", [True, False])
def test_rows_of_different_tasks_share_a_call_only_across_tasks(cross: bool) -> None:
    fake = Fake()

    async def main():
        b = Batcher(fake, max_batch=6, max_wait_ms=300, cross_task=cross)
        b.start()
        requests = [("a", ["x", "yy"]), ("b", ["zzz"]), ("c", ["1234", "12345", "123456"])]
        answers = await asyncio.gather(*(b.submit(texts, task) for task, texts in requests))
        await b.close()
        return requests, answers

    requests, answers = run(main())
    for (task, texts), rows in zip(requests, answers):  # every caller gets its own rows back, in order
        assert [(int(r[0]), chr(int(r[1]))) for r in rows] == [(len(t), task) for t in texts]
    if cross:
        assert fake.calls == [["a", "a", "b", "c", "c", "c"]]  # full at 6 rows: one call, no waiting
    else:
        assert sorted(map(tuple, fake.calls)) == [("a", "a"), ("b",), ("c", "c", "c")]


def test_wait_is_bounded_and_batches_are_capped() -> None:
    fake = Fake()

    async def main():
        b = Batcher(fake, max_batch=4, max_wait_ms=50)
        b.start()
        started = time.perf_counter()
        await b.submit(["one"], "a")  # alone: waits max_wait for company, then runs
        alone = time.perf_counter() - started
        await asyncio.gather(*(b.submit(["r"], "a") for _ in range(10)))
        await b.close()
        return alone

    alone = run(main())
    assert 0.045 <= alone < 2.0
    assert fake.calls[0] == ["a"] and all(len(c) <= 4 for c in fake.calls) and sum(map(len, fake.calls)) == 11


def test_full_queue_refuses_at_once_and_errors_reach_every_caller() -> None:
    gate = threading.Event()
    fake = Fake(gate)

    async def main():
        b = Batcher(fake, max_batch=2, max_wait_ms=0, max_queue=3)
        b.start()
        first = asyncio.ensure_future(b.submit(["a", "b"], "t"))  # taken into a call that blocks on the gate
        while b.depth or b.pending("t") != 2:  # until the call has taken both rows
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(b.submit(["c", "d", "e"], "u"))
        await asyncio.sleep(0.01)
        assert b.depth == 3 and b.pending("u") == 3 and b.pending("t") == 2
        with pytest.raises(QueueFull, match="3 of 3"):
            await b.submit(["f"], "t")
        gate.set()
        await asyncio.gather(first, queued)
        assert b.pending("t") == b.pending("u") == 0

        def broken(texts, tasks):
            raise ValueError("boom")

        b.run = broken
        results = await asyncio.gather(b.submit(["x"], "t"), b.submit(["y"], "u"), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        b.run = fake  # the worker survived the error
        assert len(await b.submit(["z"], "t")) == 1
        await b.close()

    run(main())


def test_close_drains_queued_rows_then_refuses() -> None:
    fake = Fake()

    async def main():
        b = Batcher(fake, max_batch=4, max_wait_ms=5000)  # rows would wait 5 s for a full batch
        b.start()
        pending = [asyncio.ensure_future(b.submit([f"r{i}"], "abc"[i % 3])) for i in range(7)]
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        await b.close()  # does not wait out max_wait: closing runs what is queued now
        assert time.perf_counter() - started < 2.0
        assert all(len(rows) == 1 for rows in await asyncio.wait_for(asyncio.gather(*pending), 1))
        assert not b.accepting
        with pytest.raises(Closed):
            await b.submit(["late"], "a")

    run(main())
    assert sum(map(len, fake.calls)) == 7


def test_answer_rows_gives_each_failing_row_its_own_exception_and_the_others_their_logits() -> None:
    """The rule both batchers (ours and Ray's @serve.batch) apply: one call; if it raises, each row alone."""
    fake = Fake()

    def poisoned(texts, tasks):
        if "poison" in texts:
            raise ValueError("poison")
        return fake(texts, tasks)

    answers = answer_rows(poisoned, ["ab", "poison", "abc"], ["t", "u", "t"])
    assert isinstance(answers[1], ValueError)
    assert [a.tolist() for a in (answers[0], answers[2])] == [[2, ord("t")], [3, ord("t")]]
    assert fake.calls == [["t"], ["t"]]  # the failed shared call, then each row alone (the poisoned one failed again)
    short = answer_rows(lambda texts, tasks: fake(texts, tasks)[:1], ["a", "b"], ["t", "t"])  # a model answering too few rows
    assert [type(a) for a in short] == [np.ndarray, np.ndarray]  # alone, each row is answered
    assert isinstance(answer_rows(lambda texts, tasks: [], ["a"], ["t"])[0], RuntimeError)
