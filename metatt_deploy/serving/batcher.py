"""Dynamic batching: rows of concurrent requests, of any task, gathered into one model call.

A factored bundle routes each row to its own task inside one ONNX Runtime call, so the batcher
need not group by task: it takes rows first-in first-out from one queue, whatever their task,
until ``max_batch`` rows are waiting or the oldest has waited ``max_wait_ms``, runs them in one
call on a single inference thread, and resolves each row's future with its logits. Mixing tasks
mixes lengths; the engine runs a batch's rows in calls of similar length (`Runtime.logits`,
which alone knows the token counts), so a short row is not padded to a long one.
``cross_task=False`` batches only rows of the oldest row's task (what a server of one model per
task can do; kept to measure the difference). The queue is bounded in rows: a request that does
not fit is refused at once (`QueueFull`) instead of waiting without limit, and `close` drains
every queued row before it returns.

A failing call never fails the rows that did not cause it: when a batch of several rows raises,
each of its rows runs again alone, and only the rows that fail alone get the exception (a text
the tokenizer cannot take fails its own request, not the other clients' rows in its batch).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metatt_deploy.serving.worker import Worker

RunBatch = Callable[[list[Any], list[str]], Sequence[np.ndarray]]  # (texts, task per row) -> logits per row
OnBatch = Callable[[int, int, float], None]  # (rows, distinct tasks, seconds) after each call


def answer_rows(run: RunBatch, texts: list[Any], tasks: list[str]) -> list[np.ndarray | Exception]:
    """Each row's logits from one call of ``run``, or, when that call raises, from a call of its own.

    Only the rows that fail alone get an exception (as their answer, not raised), so one row the
    model cannot take never fails the other clients' rows it shared a call with. Both batchers use
    it: this module's and Ray Serve's ``@serve.batch`` (ray_app.py).
    """
    try:
        out: list[np.ndarray | Exception] = list(run(texts, tasks))
        if len(out) != len(texts):
            raise RuntimeError(f"the model answered {len(out)} rows for {len(texts)}")
        return out
    except Exception as e:
        if len(texts) == 1:
            return [e]
        return [answer_rows(run, [text], [task])[0] for text, task in zip(texts, tasks)]


class QueueFull(Exception):
    """The queue has no room for the request's rows: the client should retry later."""


class Closed(Exception):
    """The batcher is draining or stopped and takes no new rows."""


@dataclass
class _Row:
    text: Any
    task: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """Gather rows from concurrent callers into batched calls of ``run`` (one at a time, in a thread)."""

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        cross_task: bool = True,
        on_batch: OnBatch | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.cross_task = cross_task
        self.on_batch = on_batch
        self._rows: deque[_Row] = deque()
        self._running: dict[str, int] = {}  # task -> rows taken and not yet answered
        self.worker = Worker("metatt-infer")

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self.worker.start(self._loop)

    async def close(self) -> None:
        """Refuse new rows, answer every queued one, then stop the worker and its thread."""
        await self.worker.stop()

    @property
    def accepting(self) -> bool:
        return self.worker.accepting

    @property
    def depth(self) -> int:
        """Rows queued and not yet taken into a batch."""
        return len(self._rows)

    def pending(self, task: str) -> int:
        """Rows of ``task`` queued or running (a task is removed only when this is 0)."""
        return sum(r.task == task for r in self._rows) + self._running.get(task, 0)

    # ------------------------------------------------------------ callers

    async def submit(self, texts: Sequence[Any], task: str) -> list[np.ndarray]:
        """Queue one request's rows (all of ``task``); return their logits in order."""
        if not self.accepting:
            raise Closed("the server is shutting down")
        if len(self._rows) + len(texts) > self.max_queue:
            raise QueueFull(f"queue full ({len(self._rows)} of {self.max_queue} rows waiting)")
        loop = asyncio.get_running_loop()
        rows = [_Row(text, task, loop.create_future()) for text in texts]
        self._rows.extend(rows)
        self.worker.notify()
        return list(await asyncio.gather(*(r.future for r in rows)))

    # ------------------------------------------------------------ the worker

    def _ready(self) -> int:
        """Rows the next batch could take now."""
        if self.cross_task or not self._rows:
            return len(self._rows)
        task = self._rows[0].task
        return sum(r.task == task for r in self._rows)

    def _take(self) -> list[_Row]:
        self._rows = deque(r for r in self._rows if not r.future.done())  # callers that went away
        if not self._rows:
            return []
        if self.cross_task:
            return [self._rows.popleft() for _ in range(min(self.max_batch, len(self._rows)))]
        task = self._rows[0].task
        taken: list[_Row] = []
        kept: deque[_Row] = deque()
        for row in self._rows:
            (taken if row.task == task and len(taken) < self.max_batch else kept).append(row)
        self._rows = kept
        return taken

    async def _loop(self) -> None:
        while True:
            while not self._rows:
                if self.worker.closing:
                    return
                await self.worker.wait()
            # wait for a full batch, but never longer than max_wait after the oldest row arrived
            while self._ready() < self.max_batch and not self.worker.closing:
                remaining = self._rows[0].enqueued + self.max_wait - time.monotonic()
                if remaining <= 0:
                    break
                await self.worker.wait(remaining)
            batch = self._take()
            if not batch:
                continue
            for row in batch:
                self._running[row.task] = self._running.get(row.task, 0) + 1
            started = time.perf_counter()
            answers = await self.worker.call(answer_rows, self.run, [r.text for r in batch], [r.task for r in batch])
            for row, answer in zip(batch, answers):
                self._running[row.task] -= 1
                if row.future.done():  # the caller went away (cancelled)
                    continue
                if isinstance(answer, Exception):
                    row.future.set_exception(answer)
                else:
                    row.future.set_result(answer)
            if self.on_batch is not None:
                self.on_batch(len(batch), len({r.task for r in batch}), time.perf_counter() - started)
