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
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
