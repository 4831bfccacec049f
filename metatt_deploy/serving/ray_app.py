"""The same model code as a Ray Serve application: replicas across machines.

    app = build_app("bundle/", replicas=2, max_batch=32, max_wait_ms=5)   # a classifier
    app = build_decoder_app("llm-bundle/", replicas=2)                      # a decoder
    serve.run(app)                      # or: metatt-deploy serve bundle/ --ray-replicas 2

**Classifiers.** Each replica is a `Runtime` on the bundle behind the same FastAPI routes,
request and response schemas, limits and one-line errors as the uvicorn server (serving/http.py);
rows of concurrent requests, of any task, are gathered by ``@serve.batch`` into one
`Runtime.logits` call with a task per row. A batch that fails is re-run row by row
(`batcher.answer_rows`), so a row the model cannot take fails only its own request (422), as in
the uvicorn server. What the uvicorn server adds and this does not: the bounded queue with 429
(Ray queues per replica, bounded by ``max_queued_requests``), Prometheus metrics of our own (Ray
exports its own serve_* metrics) and the admin endpoints (a new task is rolled out by
redeploying, which Ray does replica by replica without downtime).

**Decoders.** Each replica runs the OpenAI-compatible app itself (`openai_app.create_openai_app`:
the same routes, errors, limits, metrics, admin endpoints and continuous-batching scheduler as
``serve`` on uvicorn), built in the replica by Ray's late-bound ingress, and loads and warms its
`Generator` before Ray routes to it. Ray's proxy spreads requests (streamed or not) over the
replicas; each replica admits ``2 * max_running`` requests, so its scheduler always has the next
sequences waiting, and Ray queues the rest (``max_queued_requests`` = ``--max-queue``, 503
beyond, Ray's answer to back pressure).

Every answer names the replica that gave it (``x-metatt-replica: host:pid``). Ray's proxy
restarts failed replicas and drains them on shutdown; ``max_ongoing_requests`` lets enough
requests reach a replica to fill a batch.

``ray[serve]`` is an optional dependency (the ``ray`` extra): it is imported only here. (No
``from __future__ import annotations``: Ray's ingress re-creates the route methods and FastAPI
then cannot resolve string annotations, so the body would be taken for a query parameter.)
"""

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request

from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.inference.formats import CAUSAL_LM, CLASSIFICATION, model_task_type
from metatt_deploy.serving.batcher import answer_rows
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.http import (
    ERRORS,
    ApiError,
    Engine,
    ServeSettings,
    checked_task,
    classify_response,
    engine_id,
    install_error_handlers,
    limit_requests,
)
from metatt_deploy.serving.openai_app import LLMSettings, create_openai_app, with_server_settings
from metatt_deploy.serving.runtime import Runtime
from metatt_deploy.serving.schemas import ClassifyRequest, ClassifyResponse, Status, TaskInfo, TasksResponse

REPLICA_HEADER = "x-metatt-replica"


def _ray_serve():
    try:
        from ray import serve
    except ImportError:
        raise MetaTTError("Ray Serve is not installed; pip install 'metatt-deploy[ray]' (or 'ray[serve]')") from None
    return serve


def tag_replica(api: FastAPI) -> None:
    """Every answer of ``api`` names the replica process that gave it (host:pid), for clients, logs and tests.

    Call it before ``serve.ingress(api)``, which copies the app as it is then.
    """

    @api.middleware("http")
    async def named(request: Request, call_next):
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = f"{socket.gethostname()}:{os.getpid()}"
        return response


def build_app(
    model: str,
    *,
    replicas: int = 2,
    settings: ServeSettings | None = None,
    threads: int | None = None,
    cpus_per_replica: float = 1.0,
    form: str = "auto",
    load: Callable[[], Engine] | None = None,
) -> Any:
    """A bound Ray Serve application of ``replicas`` replicas classifying with ``model`` (pass it to serve.run).

    ``load`` builds each replica's engine (default: a `Runtime` on ``model``); it is pickled to the replicas.
    """
    serve = _ray_serve()
    limits = (settings or ServeSettings()).check()
    if replicas < 1:
        raise MetaTTError("--ray-replicas must be at least 1")
    make_engine = load or (lambda: Runtime(model, form=form, threads=threads))
    api = FastAPI(title="metatt-deploy (Ray Serve)", summary="Text classification for many tasks on one model, on Ray Serve.", version="1")
    limit_requests(api, limits)
    install_error_handlers(api)
    tag_replica(api)

    @serve.deployment(
        num_replicas=replicas,
        max_ongoing_requests=max(2 * limits.max_batch, 8),  # enough in flight per replica to fill a batch
        max_queued_requests=limits.max_queue,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    @serve.ingress(api)
    class MetaTTReplica:
        def __init__(self) -> None:
            self.engine = make_engine()
            for task in self.engine.tasks:  # warm every graph before taking traffic
                self.engine.logits(["warm-up"], tasks=[task])

        @serve.batch(max_batch_size=limits.max_batch, batch_wait_timeout_s=limits.max_wait_ms / 1000)
        async def rows(self, items: list[tuple[Any, str]]) -> list:
            """One model call for the rows of every request Ray gathered, a task per row; a row that fails alone answers its exception."""
            texts = [text for text, _ in items]
            tasks = [task for _, task in items]
            return await asyncio.to_thread(answer_rows, lambda t, k: self.engine.logits(t, tasks=k), texts, tasks)

        @api.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True, responses=ERRORS)
        async def classify(self, body: ClassifyRequest) -> ClassifyResponse:
            """Classify texts (or sentence pairs) with one task; rows of concurrent requests share model calls."""
            task = checked_task(self.engine, body, limits)
            labels = self.engine.labels(task)
            rows = await asyncio.gather(*(self.rows((text, task)) for text in body.texts))
            for row in rows:
                if isinstance(row, MetaTTError):  # a row the model refused though it passed the checks: this request alone fails
                    raise ApiError(422, first_line(row))
                if isinstance(row, Exception):
                    raise row  # a bug: a 500 for this request alone, its traceback in the replica's log
            return classify_response(self.engine, task, labels, rows, body.return_logits)

        @api.get("/v1/tasks", response_model=TasksResponse)
        async def tasks(self) -> TasksResponse:
            return TasksResponse(
                model_id=engine_id(self.engine), tasks=[TaskInfo(name=t, labels=self.engine.labels(t)) for t in self.engine.tasks]
            )

        @api.get("/healthz", response_model=Status)
        async def healthz(self) -> Status:
            return Status(status="ok")

        @api.get("/readyz", response_model=Status)
        async def readyz(self) -> Status:  # a replica takes traffic only after __init__ (load + warm-up)
            return Status(status="ready", detail=f"{len(self.engine.tasks)} task(s)")

    return MetaTTReplica.bind()  # type: ignore[attr-defined]


def build_decoder_app(
    model: str,
    *,
    replicas: int = 2,
    settings: LLMSettings | None = None,
    threads: int | None = None,
    cpus_per_replica: float = 1.0,
    form: str = "auto",
) -> Any:
    """A bound Ray Serve application of ``replicas`` replicas, each the OpenAI-compatible app over a decoder ``model``."""
    serve = _ray_serve()
    llm = (settings or LLMSettings()).check()
    if replicas < 1:
        raise MetaTTError("--ray-replicas must be at least 1")

    def openai_app() -> FastAPI:
        """Built in each replica: its own generator and scheduler, loaded and warm before the replica takes traffic."""
        api = create_openai_app(lambda: Generator(model, form=form, threads=threads), llm, background_load=False)
        tag_replica(api)
        return api

    replica = serve.deployment(
        serve.ingress(openai_app)(),
        name="MetaTTDecoderReplica",
        num_replicas=replicas,
        max_ongoing_requests=2 * llm.max_running,  # the running sequences and as many waiting for a free slot
        max_queued_requests=llm.max_queue,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    return replica.bind()


def run(
    model: str,
    *,
    replicas: int,
    host: str,
    port: int,
    settings: ServeSettings,
    threads: int | None,
    form: str = "auto",
    llm: LLMSettings | None = None,
) -> None:
    """Start a local Ray instance (or join RAY_ADDRESS), serve ``model`` (a classifier or a decoder) until SIGTERM/SIGINT, then shut down."""
    import ray

    serve = _ray_serve()
    decoder = with_server_settings(llm or LLMSettings(), settings)
    builders: dict[str, Callable[[], Any]] = {  # by the export's task type, as server.BACKENDS
        CLASSIFICATION: lambda: build_app(model, replicas=replicas, settings=settings, threads=threads, form=form),
        CAUSAL_LM: lambda: build_decoder_app(model, replicas=replicas, settings=decoder, threads=threads, form=form),
    }
    app = builders[model_task_type(model)]()
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
