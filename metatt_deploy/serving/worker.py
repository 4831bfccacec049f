"""The life cycle both schedulers share: one asyncio task drives a loop, model calls run on one thread of their own.

The classifier `batcher.Batcher` and the decoder `llm_engine.Scheduler` each own a `Worker`:
requests are queued on the event loop and `notify` wakes the loop; the loop runs each model call
on the worker's single inference thread (`call`), so ONNX Runtime never runs two calls at once
and the event loop keeps answering; `stop` wakes the loop so it can see ``closing``, waits for it
to return (it drains what its owner says must be drained) and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Worker:
    """One loop task, its inference thread and its wake-up event; ``closing`` tells the loop to finish."""

    def __init__(self, thread_name: str):
        self.thread_name = thread_name
        self.closing = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    def start(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``loop()`` on the running event loop (once; a second start is a no-op)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
            self._task = asyncio.get_running_loop().create_task(loop())

    @property
    def accepting(self) -> bool:
        """Started and not closing: new work may be queued."""
        return self._task is not None and not self.closing

    def notify(self) -> None:
        """Wake the loop: work was queued, or it should close."""
        if self._wake is not None:
            self._wake.set()

    async def wait(self, timeout: float | None = None) -> None:
        """Sleep until the next `notify` (or ``timeout`` seconds; returns either way)."""
        assert self._wake is not None
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the inference thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def stop(self) -> None:
        """Set ``closing``, wake the loop, wait until it returns, then join the inference thread."""
        self.closing = True
        if self._task is not None:
            self.notify()
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
