"""The loop + inference thread both schedulers share: calls run on one thread of their own, notify wakes the loop,
wait is bounded by its timeout, and stop lets the loop finish its work before it returns."""

from __future__ import annotations

import asyncio
import threading
import time

from metatt_deploy.serving.worker import Worker


def test_a_worker_runs_calls_on_its_thread_and_stops_after_its_loop_drains() -> None:
    async def main():
        worker = Worker("metatt-test")
        queue: list[int] = []
        done: list[tuple[int, str]] = []

        async def loop() -> None:
            while True:
                while not queue:
                    if worker.closing:
                        return
                    await worker.wait()
                item = queue.pop(0)
                done.append(await worker.call(lambda x: (x * 2, threading.current_thread().name), item))

        assert not worker.accepting
        worker.start(loop)
        assert worker.accepting
        queue.extend([1, 2])
        worker.notify()
        while len(done) < 2:
            await asyncio.sleep(0.001)
        started = time.monotonic()
        await worker.wait(0.05)  # nobody notifies: returns after its timeout
        assert 0.04 <= time.monotonic() - started < 2
        queue.append(3)  # queued without a notify: stop's wake-up lets the loop take it before returning
        await worker.stop()
        assert not worker.accepting and [x for x, _ in done] == [2, 4, 6]
        names = {name for _, name in done}
        assert len(names) == 1 and names.pop().startswith("metatt-test") and threading.current_thread().name == "MainThread"

    asyncio.run(asyncio.wait_for(main(), 20))
