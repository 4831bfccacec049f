"""The same model code as a Ray Serve application: replicas across machines, Ray's own batching.

    app = build_app("bundle/", replicas=2, max_batch=32, max_wait_ms=5)
    serve.run(app)                      # or: metatt-deploy serve bundle/ --ray-replicas 2

Each replica is a `Runtime` on the bundle behind the same FastAPI routes, request and response
schemas, limits and one-line errors as the uvicorn server (serving/http.py); rows of concurrent
requests, of any task, are gathered by ``@serve.batch`` into one `Runtime.logits` call with a
task per row. Ray's proxy spreads requests over the replicas (and over machines in a Ray
cluster), restarts failed replicas and drains them on shutdown; ``max_ongoing_requests`` lets
enough requests reach a replica to fill a batch. What the uvicorn server adds and this does
not: the bounded queue with 429 (Ray queues per replica, bounded by ``max_queued_requests``),
Prometheus metrics of our own (Ray exports its own serve_* metrics) and the admin endpoints (a
new task is rolled out by redeploying, which Ray does replica by replica without downtime).

``ray[serve]`` is an optional dependency (the ``ray`` extra): it is imported only here. (No
``from __future__ import annotations``: Ray's ingress re-creates the route methods and FastAPI
then cannot resolve string annotations, so the body would be taken for a query parameter.)
"""

import asyncio
import os
import signal
import socket
import threading
from typing import Any

from fastapi import FastAPI, Response

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.serving.http import (
    ERRORS,
    ServeSettings,
    checked_task,
    classify_response,
    engine_id,
    install_error_handlers,
    limit_requests,
)
from metatt_deploy.serving.runtime import Runtime
from metatt_deploy.serving.schemas import ClassifyRequest, ClassifyResponse, Status, TaskInfo, TasksResponse

REPLICA_HEADER = "x-metatt-replica"


def _ray_serve():
    try:
        from ray import serve
    except ImportError:
        raise MetaTTError("Ray Serve is not installed; pip install 'metatt-deploy[ray]' (or 'ray[serve]')") from None
    return serve


def build_app(
    model: str,
    *,
    replicas: int = 2,
    settings: ServeSettings | None = None,
    threads: int | None = None,
    cpus_per_replica: float = 1.0,
    form: str = "auto",
) -> Any:
    """A bound Ray Serve application of ``replicas`` replicas serving ``model`` (pass it to serve.run)."""
    serve = _ray_serve()
    limits = (settings or ServeSettings()).check()
    if replicas < 1:
        raise MetaTTError("--ray-replicas must be at least 1")
    api = FastAPI(title="metatt-deploy (Ray Serve)", summary="Text classification for many tasks on one model, on Ray Serve.", version="1")
    limit_requests(api, limits)
    install_error_handlers(api)

    @serve.deployment(
        num_replicas=replicas,
        max_ongoing_requests=max(2 * limits.max_batch, 8),  # enough in flight per replica to fill a batch
        max_queued_requests=limits.max_queue,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    @serve.ingress(api)
    class MetaTTReplica:
        def __init__(self) -> None:
            self.engine = Runtime(model, form=form, threads=threads)
            for task in self.engine.tasks:  # warm every graph before taking traffic
                self.engine.logits(["warm-up"], tasks=[task])
            self.replica = f"{socket.gethostname()}:{os.getpid()}"

        @serve.batch(max_batch_size=limits.max_batch, batch_wait_timeout_s=limits.max_wait_ms / 1000)
        async def rows(self, items: list[tuple[Any, str]]) -> list:
            """One model call for the rows of every request Ray gathered, a task per row."""
            return await asyncio.to_thread(self.engine.logits, [text for text, _ in items], tasks=[task for _, task in items])

        @api.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True, responses=ERRORS)
        async def classify(self, body: ClassifyRequest, response: Response) -> ClassifyResponse:
            """Classify texts (or sentence pairs) with one task; rows of concurrent requests share model calls."""
            task = checked_task(self.engine, body, limits)
            labels = self.engine.labels(task)
            rows = await asyncio.gather(*(self.rows((text, task)) for text in body.texts))
            response.headers[REPLICA_HEADER] = self.replica
            return classify_response(self.engine, task, labels, rows, body.return_logits)

        @api.get("/v1/tasks", response_model=TasksResponse)
        async def tasks(self) -> TasksResponse:
            return TasksResponse(
                model_id=engine_id(self.engine), tasks=[TaskInfo(name=t, labels=self.engine.labels(t)) for t in self.engine.tasks]
            )

        @api.get("/healthz", response_model=Status)
        async def healthz(self) -> Status:
            return Status(status="ok", detail=self.replica)

        @api.get("/readyz", response_model=Status)
        async def readyz(self) -> Status:  # a replica takes traffic only after __init__ (load + warm-up)
            return Status(status="ready", detail=f"{len(self.engine.tasks)} task(s)")

    return MetaTTReplica.bind()  # type: ignore[attr-defined]


def run(model: str, *, replicas: int, host: str, port: int, settings: ServeSettings, threads: int | None, form: str = "auto") -> None:
    """Start a local Ray instance (or join RAY_ADDRESS), serve until SIGTERM/SIGINT, then shut down gracefully."""
    import ray

    serve = _ray_serve()
    app = build_app(model, replicas=replicas, settings=settings, threads=threads, form=form)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="metatt", route_prefix="/")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        print(f"Ray Serve: {replicas} replica(s) of {model} on http://{host}:{port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()  # replicas finish their requests (graceful_shutdown_timeout_s), then stop
        ray.shutdown()
