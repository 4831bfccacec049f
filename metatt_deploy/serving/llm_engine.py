"""Continuous (iteration-level) batching of generation requests of any task, on the numpy decode loop.

One worker thread runs `LLMEngine.step` again and again while there is work. A step is:

1. **leave**: sequences that ended, or whose client went away, leave their batch (`KVBatch.take`);
2. **decode**: every running sequence of a lane advances by one token in ONE ONNX Runtime call;
   a lane is the rows that can share a call (`Generator.binding`): every task baked into
   ``model_tasks.onnx`` is one lane (a task id per row), a task added later runs the adapter
   graph with its RunOptions, which are per call, so it is a lane of its own; a single-task
   export is one lane;
3. **prefill**: at most ``max_tokens_per_step`` prompt tokens of waiting requests. Requests are
   taken first-in first-out while a slot is free (``max_running``), grouped with the requests
   behind them of the same lane, and their prompts run as one left-padded batch, in chunks of
   columns so that no step prefills more than the budget: a long prompt is spread over several
   steps, and running sequences wait at most one chunk's time for their next token. When the
   last chunk is done, each new sequence picks its first token and joins its lane's batch
   (`KVBatch.extend`).

Every sequence keeps its own `Decoding` (seeded sampler, EOS/stop handling, text stream), and its
row of the batch computes what it would alone (left padding with mask 0, positions counted per
row), so a request's tokens do not depend on what else runs. The async side (`Scheduler`) takes
requests from the HTTP handlers into a bounded queue, runs the steps in a thread and hands each
request its events; a request whose client disconnects is cancelled and leaves at the next step.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.decode import Decoding, KVBatch, SamplingParams, Step
from metatt_deploy.serving.batcher import Closed, QueueFull
from metatt_deploy.serving.generate import Binding
from metatt_deploy.serving.http import log
from metatt_deploy.serving.worker import Worker

# Event a request receives: a Step of its decode loop, or the error that ended it
Event = Step | Exception


@dataclass(eq=False)
class Seq:
    """One sequence: a prompt of one task, how to pick its tokens, and where its events go."""

    task: str
    prompt: list[int]
    params: SamplingParams
    binding: Binding
    decoding: Decoding
    deliver: Callable[[Event], None]  # called on the event loop, in order
    index: int = 0  # the choice this sequence answers (several prompts in one request)
    cancelled: bool = False
    generated: int = 0
    created: float = field(default_factory=time.monotonic)
    last_token: float | None = None


@dataclass
class Lane:
    """The running rows that share one call per step, and their KV cache."""

    binding: Binding
    rows: list[Seq]
    batch: KVBatch


@dataclass
class Prefill:
    """A group of new sequences of one lane whose prompts run in chunks (left-padded to the longest)."""

    rows: list[Seq]
    ids: np.ndarray
    mask: np.ndarray
    batch: KVBatch
    done: int = 0  # columns run so far


@dataclass
class StepStats:
    decoded_rows: int = 0
    prefilled_tokens: int = 0
    calls: int = 0


def row_feeds(rows: Sequence[Seq]) -> dict[str, np.ndarray] | None:
    """The per-row inputs of a lane's rows (task ids), stacked in row order."""
    first = rows[0].binding.feeds
    if not first:
        return None
    return {name: np.concatenate([r.binding.feeds[name] for r in rows if r.binding.feeds]) for name in first}


class LLMEngine:
    """The scheduler's state and its step; runs on one thread (the `Scheduler`'s worker)."""

    def __init__(self, *, max_running: int, max_tokens_per_step: int):
        if max_running < 1 or max_tokens_per_step < 1:
            raise MetaTTError("--max-running and --max-tokens-per-step must be at least 1")
        self.max_running = max_running
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Seq] = deque()
        self.lanes: dict[str, Lane] = {}
        self.prefilling: Prefill | None = None

    @property
    def running(self) -> int:
        return sum(len(lane.rows) for lane in self.lanes.values()) + (len(self.prefilling.rows) if self.prefilling else 0)

    def busy(self) -> bool:
        return bool(self.waiting or self.lanes or self.prefilling)

    def pending(self, task: str) -> int:
        """Sequences of ``task`` waiting, prefilling or running (a task is removed only when this is 0)."""
        rows = [*self.waiting, *(self.prefilling.rows if self.prefilling else ()), *(r for lane in self.lanes.values() for r in lane.rows)]
        return sum(r.task == task for r in rows)

    def step(self) -> tuple[list[tuple[Seq, list[Step]]], StepStats]:
        """One iteration: cancelled rows leave, every lane decodes one token, then one prefill chunk runs."""
        events: list[tuple[Seq, list[Step]]] = []
        stats = StepStats()
        self._leave(lambda s: s.cancelled)
        for lane in list(self.lanes.values()):
            rows = lane.rows
            ids = np.array([[r.decoding.last] for r in rows], dtype=np.int64)
            logits = lane.batch.forward(ids, None, row_feeds(rows), lane.binding.run_options)
            stats.calls += 1
            stats.decoded_rows += len(rows)
            events.extend((r, r.decoding.advance(logits[i, -1])) for i, r in enumerate(rows))
        self._leave(lambda s: s.decoding.finish_reason is not None)
        if self.prefilling is None:
            self.prefilling = self._next_prefill()
        if self.prefilling is not None:
            stats.prefilled_tokens = self._prefill_chunk(self.prefilling, events)
            stats.calls += 1
        return events, stats

    def fail_all(self) -> list[Seq]:
        """Drop every running and prefilling sequence (after a failed model call); returns them to be told."""
        dropped = [r for lane in self.lanes.values() for r in lane.rows] + (self.prefilling.rows if self.prefilling else [])
        self.lanes.clear()
        self.prefilling = None
        return dropped

    # ------------------------------------------------------------ internals

    def _leave(self, gone: Callable[[Seq], bool]) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:  # in place: the event loop may append meanwhile
            self.waiting.remove(seq)
        for key, lane in list(self.lanes.items()):
            keep = [i for i, r in enumerate(lane.rows) if not gone(r)]
            if not keep:
                del self.lanes[key]
            elif len(keep) < len(lane.rows):
                lane.batch.take(keep)
                lane.rows = [lane.rows[i] for i in keep]

    def _next_prefill(self) -> Prefill | None:
        """The oldest waiting request, and those behind it of the same lane, as many as fit the free slots and the budget."""
        free = self.max_running - self.running
        if free < 1 or not self.waiting:
            return None
        lane = self.waiting[0].binding.lane
        group: list[Seq] = []
        longest = 0
        for seq in list(self.waiting):
            if len(group) == free:
                break
            if seq.binding.lane != lane:
                continue
            if group and (len(group) + 1) * max(longest, len(seq.prompt)) > self.max_tokens_per_step:
                break
            group.append(seq)
            longest = max(longest, len(seq.prompt))
        for seq in group:
            self.waiting.remove(seq)
        ids = np.zeros((len(group), longest), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, seq in enumerate(group):
            ids[i, longest - len(seq.prompt) :] = seq.prompt
            mask[i, longest - len(seq.prompt) :] = 1
        return Prefill(group, ids, mask, KVBatch(group[0].binding.graph, len(group)))

    def _prefill_chunk(self, job: Prefill, events: list[tuple[Seq, list[Step]]]) -> int:
        """Run the next columns of a prefill; after the last, pick first tokens and move the rows into their lane."""
        width = max(1, self.max_tokens_per_step // len(job.rows))
        cols = slice(job.done, min(job.done + width, job.ids.shape[1]))
        binding = job.rows[0].binding
        logits = job.batch.forward(job.ids[:, cols], job.mask[:, cols], row_feeds(job.rows), binding.run_options)
        job.done = cols.stop
        if job.done < job.ids.shape[1]:
            return (cols.stop - cols.start) * len(job.rows)
        self.prefilling = None
        events.extend((r, r.decoding.advance(logits[i, -1])) for i, r in enumerate(job.rows))
        keep = [i for i, r in enumerate(job.rows) if r.decoding.finish_reason is None and not r.cancelled]
        if keep:
            job.batch.take(keep)
            rows = [job.rows[i] for i in keep]
            lane = self.lanes.get(binding.lane)
            if lane is None:
                self.lanes[binding.lane] = Lane(binding, rows, job.batch)
            else:
                lane.batch.extend(job.batch)
                lane.rows.extend(rows)
        return (cols.stop - cols.start) * len(job.rows)


OnStep = Callable[[StepStats, float], None]  # (what a step did, its seconds)
OnToken = Callable[[Seq, Step], None]  # each event, on the event loop (metrics)


class Scheduler:
    """The async face of `LLMEngine`: a bounded queue of requests, steps run in a thread, events handed back on the loop."""

    def __init__(self, engine: LLMEngine, *, max_queue: int, on_step: OnStep | None = None, on_event: OnToken | None = None):
        if max_queue < 1:
            raise MetaTTError("--max-queue must be at least 1")
        self.engine = engine
        self.max_queue = max_queue
        self.on_step = on_step
        self.on_event = on_event
        self.worker = Worker("metatt-llm")

    def start(self) -> None:
        self.worker.start(self._loop)

    @property
    def accepting(self) -> bool:
        return self.worker.accepting

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting)

    def submit(self, seqs: Sequence[Seq]) -> None:
        """Queue the sequences of one request (all or none: `QueueFull` when they do not fit, `Closed` when draining)."""
        if not self.accepting:
            raise Closed("the server is shutting down")
        if len(self.engine.waiting) + len(seqs) > self.max_queue:
            raise QueueFull(f"queue full ({len(self.engine.waiting)} of {self.max_queue} requests waiting)")
        self.engine.waiting.extend(seqs)
        self.worker.notify()

    async def close(self, grace_s: float = 0.0) -> None:
        """Take no new requests, let running ones finish for up to ``grace_s``, then cancel the rest and stop the worker."""
        self.worker.closing = True
        deadline = time.monotonic() + grace_s
        while self.engine.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        engine = self.engine
        prefilling = engine.prefilling.rows if engine.prefilling else []
        for seq in [*engine.waiting, *prefilling, *(r for lane in engine.lanes.values() for r in lane.rows)]:
            seq.cancelled = True
            seq.deliver(Closed("the server shut down before this request finished"))
        await self.worker.stop()

    async def _loop(self) -> None:
        while True:
            while not self.engine.busy():
                if self.worker.closing:
                    return
                await self.worker.wait()
            started = time.perf_counter()
            try:
                events, stats = await self.worker.call(self.engine.step)
            except Exception as e:  # a model failure: every sequence in the batch is told; the worker keeps going
                log.exception("a decode step failed")
                for seq in self.engine.fail_all():
                    seq.deliver(e)
                continue
            now = time.monotonic()
            for seq, steps in events:
                for step in steps:
                    if self.on_event is not None:  # before last_token moves: it measures the gap since the previous token
                        self.on_event(seq, step)
                    if step.token_id is not None:
                        seq.generated += 1
                        seq.last_token = now
                    seq.deliver(step)
            if self.on_step is not None:
                self.on_step(stats, time.perf_counter() - started)
