"""Prometheus metrics of the server: what an operator graphs and alerts on.

Per task: requests, errors (by status code) and latency; per model call: rows, distinct tasks
and seconds; the queue depth and the number of tasks served. Task labels are only ever names of
tasks the server knows (anything else counts under ``-``), so a client cannot blow up the
series count by sending random task names. Each app has its own registry (tests build many);
with several worker processes (``--workers``), ``PROMETHEUS_MULTIPROC_DIR`` is set and a scrape
of any worker aggregates all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

UNKNOWN_TASK = "-"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("metatt_requests", "Classify requests answered, by task.", ["task"], registry=r)
        self.errors = Counter(
            "metatt_request_errors", "Classify requests answered with an error, by task and status code.", ["task", "code"], registry=r
        )
        self.latency = Histogram(
            "metatt_request_latency_seconds",
            "Classify latency in the server (queue + batch + model), by task.",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram("metatt_batch_rows", "Rows per model call.", buckets=ROW_BUCKETS, registry=r)
        self.batch_tasks = Histogram("metatt_batch_tasks", "Distinct tasks per model call.", buckets=(1, 2, 3, 4, 6, 8, 16), registry=r)
        self.batch_seconds = Histogram(
            "metatt_batch_seconds", "Seconds per model call (tokenize + ONNX Runtime).", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("metatt_queue_depth", "Rows waiting for a model call.", registry=r, multiprocess_mode="livesum")
        self.tasks = Gauge("metatt_tasks_served", "Tasks the server answers.", registry=r, multiprocess_mode="liveall")

    def observe_batch(self, rows: int, tasks: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_tasks.observe(tasks)
        self.batch_seconds.observe(seconds)

    def observe_request(self, task: str, code: int, seconds: float) -> None:
        self.requests.labels(task).inc()
        self.latency.labels(task).observe(seconds)
        if code >= 400:
            self.errors.labels(task, str(code)).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric (of every worker process in multiprocess mode)."""
        return exposition(self.registry)


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text format of ``registry`` (of every worker process's metrics in multiprocess mode)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


class LLMMetrics:
    """The generation server's metrics: per task requests and tokens, time to first token, inter-token latency, the scheduler."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "metatt_llm_requests", "Completion requests answered, by task (model) and status code.", ["task", "code"], registry=r
        )
        self.prompt_tokens = Counter("metatt_llm_prompt_tokens", "Prompt tokens of admitted requests, by task.", ["task"], registry=r)
        self.generated_tokens = Counter("metatt_llm_generated_tokens", "Tokens generated, by task.", ["task"], registry=r)
        self.ttft = Histogram(
            "metatt_llm_time_to_first_token_seconds",
            "From admission to the first token, by task.",
            ["task"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "metatt_llm_inter_token_seconds",
            "Between consecutive tokens of a sequence, by task.",
            ["task"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("metatt_llm_running_sequences", "Sequences decoding or prefilling.", registry=r, multiprocess_mode="livesum")
        self.waiting = Gauge("metatt_llm_waiting_sequences", "Sequences queued for a slot.", registry=r, multiprocess_mode="livesum")
        self.step_rows = Histogram(
            "metatt_llm_step_rows", "Rows decoded per step (one ONNX Runtime call per lane).", buckets=ROW_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "metatt_llm_step_seconds", "Seconds per scheduler step (decode + prefill chunk).", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tasks = Gauge("metatt_tasks_served", "Tasks (models) the server answers.", registry=r, multiprocess_mode="liveall")

    def exposition(self) -> tuple[bytes, str]:
        return exposition(self.registry)
