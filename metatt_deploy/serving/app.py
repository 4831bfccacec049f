"""The HTTP API: many tasks on one model, requests of any task batched together.

    app = create_app(lambda: Runtime("bundle/"), ServeSettings(max_batch=32))   # uvicorn serves it

Endpoints (OpenAPI at /openapi.json, and Swagger UI at /docs when settings.docs is on; docs/serving.md):

    POST   /v1/classify          {"task", "texts", "return_logits"} -> one prediction per text
    GET    /v1/tasks             every task with its labels
    GET    /healthz              the process answers (liveness)
    GET    /readyz               the model is loaded and warm, and the server is not draining
    GET    /metrics              Prometheus text format
    POST   /admin/tasks/{name}   serve a task file added to the bundle (bearer token)
    DELETE /admin/tasks/{name}   stop serving a task, after its queued rows are answered

The model loads in the background, so /healthz answers at once and /readyz turns 200 once every
task has run one warm-up row. Every error is ``{"error": "one line"}`` with a 4xx code (413 for
size limits, 429 + Retry-After when the queue is full, 503 + Retry-After while loading or
draining); a row the model cannot take is a 422 for its own request only (checked before it is
queued, and a batch that fails anyway is re-run row by row); an unexpected failure is a 500 with
one line, its traceback goes to the server log only. On shutdown, uvicorn stops accepting connections and waits for open requests; the
lifespan then drains the batcher, so every accepted request is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
from fastapi import FastAPI, Request

from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.serving.batcher import Batcher, Closed, QueueFull
from metatt_deploy.serving.http import (
    ERRORS,
    ApiError,
    Engine,
    ServeSettings,
    bearer_matches,
    checked_task,
    classify_response,
    engine_id,
    install_error_handlers,
    limit_requests,
    load_warm,
    log,
    service_app,
    status_routes,
)
from metatt_deploy.serving.metrics import UNKNOWN_TASK, ServerMetrics
from metatt_deploy.serving.schemas import AdminResponse, ClassifyRequest, ClassifyResponse, TaskInfo, TasksResponse


def as_factory(engine: Engine | Callable[[], Engine]) -> Callable[[], Engine]:
    """A loaded engine, or a function that loads one, as a function (called in the background)."""
    if hasattr(engine, "logits"):
        return lambda: cast(Engine, engine)
    return cast(Callable[[], Engine], engine)


class ServerState:
    """The engine (once loaded), its batcher and metrics, and the readiness of the server."""

    def __init__(self, engine: Engine | Callable[[], Engine], settings: ServeSettings):
        self.settings = settings
        self.factory: Callable[[], Engine] = as_factory(engine)
        self.engine: Engine | None = None
        self.metrics = ServerMetrics()
        self.batcher = Batcher(
            self._run,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            cross_task=settings.cross_task,
            on_batch=self._on_batch,
        )
        self.load_error: str | None = None
        self.loaded = asyncio.Event()
        self.removing: set[str] = set()
        self.admin_lock = asyncio.Lock()
        self._loader: asyncio.Task | None = None

    def _run(self, texts: list[Any], tasks: list[str]) -> list[np.ndarray]:
        assert self.engine is not None
        return self.engine.logits(texts, tasks=tasks)

    def _on_batch(self, rows: int, tasks: int, seconds: float) -> None:
        self.metrics.observe_batch(rows, tasks, seconds)
        self.metrics.queue_depth.set(self.batcher.depth)

    async def start(self) -> None:
        self.batcher.start()
        self._loader = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        started = time.perf_counter()
        engine, self.load_error = await load_warm(self.factory, warm_every_task)
        if engine is None:
            return
        self.engine = engine
        self.metrics.tasks.set(len(engine.tasks))
        self.loaded.set()
        log.info("ready: %d task(s) in %.1f s", len(engine.tasks), time.perf_counter() - started)

    async def stop(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loader
        await self.batcher.close()

    # ------------------------------------------------------------ checks used by the endpoints

    def ready_engine(self) -> Engine:
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.load_error is not None:
            raise ApiError(503, f"the model did not load: {self.load_error}")
        if not self.batcher.accepting:
            raise ApiError(503, "the server is shutting down; retry on another replica", retry)
        if self.engine is None:
            raise ApiError(503, "the model is still loading", retry)
        return self.engine

    def check_admin(self, request: Request) -> None:
        token = self.settings.admin_token
        if not token:
            raise ApiError(403, "admin endpoints are off; start the server with METATT_ADMIN_TOKEN or --admin-token-file to use them")
        if not bearer_matches(request, token):
            raise ApiError(401, "admin endpoints need the header 'Authorization: Bearer <admin token>' (a non-ASCII token in UTF-8)")


def create_app(engine: Engine | Callable[[], Engine], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app over ``engine`` (or a function that loads it, called in the background)."""
    settings = (settings or ServeSettings()).check()
    app = service_app(
        lambda: ServerState(engine, settings),
        title="metatt-deploy",
        summary="Text classification for many tasks on one model (a MetaTT factored bundle), with dynamic batching across tasks.",
        docs=settings.docs,
    )

    limit_requests(app, settings)
    install_error_handlers(app, lambda request, code: state_of(request).metrics.observe_request(UNKNOWN_TASK, code, 0.0))
    classify_routes(app, settings)
    status_routes(app, readiness, exposition)
    admin_routes(app, settings)
    return app


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def classify_routes(app: FastAPI, settings: ServeSettings) -> None:
    """POST /v1/classify and GET /v1/tasks."""

    @app.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True, responses=ERRORS)
    async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
        """Classify texts (or sentence pairs) with one task. Concurrent requests, of any task, share model calls."""
        state = state_of(request)
        started = time.perf_counter()
        task = UNKNOWN_TASK
        code = 500
        try:
            engine = state.ready_engine()
            task = body.task if body.task in engine.tasks else UNKNOWN_TASK  # metric labels: known tasks only
            checked_task(engine, body, settings, state.removing)
            labels = engine.labels(task)  # now: a removal may complete while the rows are in flight
            try:
                rows = await state.batcher.submit(list(body.texts), task)
            except MetaTTError as e:  # a row the model refused though it passed the checks: this request alone fails
                raise ApiError(422, first_line(e)) from None
            except QueueFull as e:
                raise ApiError(429, f"{e}; retry later", {"Retry-After": str(settings.retry_after_s)}) from None
            except Closed as e:
                raise ApiError(503, f"{e}; retry on another replica", {"Retry-After": str(settings.retry_after_s)}) from None
            code = 200
            return classify_response(engine, task, labels, rows, body.return_logits)
        except ApiError as e:
            code = e.code
            raise
        finally:
            state.metrics.observe_request(task, code, time.perf_counter() - started)

    @app.get("/v1/tasks", response_model=TasksResponse, responses={503: ERRORS[503]})
    async def tasks(request: Request) -> TasksResponse:
        """Every task this server answers, with its labels (in the order of label_id)."""
        state = state_of(request)
        engine = state.ready_engine()
        served = [t for t in engine.tasks if t not in state.removing]
        return TasksResponse(model_id=engine_id(engine), tasks=[TaskInfo(name=t, labels=engine.labels(t)) for t in served])


def warm_every_task(engine: Engine) -> None:
    """One row of every task: its graph and adapter are loaded and run before /readyz says ready."""
    for task in list(engine.tasks):
        engine.logits(["warm-up"], tasks=[task])


def readiness(request: Request) -> str:
    """/readyz's detail: the tasks served, and any task record skipped at start-up with its reason."""
    engine = state_of(request).ready_engine()
    skipped = "".join(f"; skipped {name}: {reason}" for name, reason in getattr(engine, "skipped", {}).items())
    return f"{len(engine.tasks)} task(s){skipped}"


def exposition(request: Request) -> tuple[bytes, str]:
    state = state_of(request)
    state.metrics.queue_depth.set(state.batcher.depth)
    return state.metrics.exposition()


def admin_routes(app: FastAPI, settings: ServeSettings) -> None:
    """POST and DELETE /admin/tasks/{name}: hot add and remove of a factored bundle's tasks (bearer token)."""

    @app.post("/admin/tasks/{name}", response_model=AdminResponse, status_code=201, responses=ERRORS)
    async def add_task(name: str, request: Request) -> AdminResponse:
        """Serve a task file added to the bundle after start (merge --factored --task NAME -o BUNDLE), without a restart.

        The task file must belong to this bundle (bundle id) and match its recorded sha256; else 422.
        """
        state = state_of(request)
        state.check_admin(request)
        engine = state.ready_engine()
        add = admin_method(engine, "add_task")
        async with state.admin_lock:
            if name in engine.tasks:
                raise ApiError(409, f"task '{name}' is already served; DELETE it first to replace it")
            try:
                await asyncio.to_thread(add, name)
            except MetaTTError as e:
                raise ApiError(422, str(e)) from None
            state.metrics.tasks.set(len(engine.tasks))
        log.info("task %s added", name)
        return AdminResponse(task=name, action="added", tasks=list(engine.tasks))

    @app.delete("/admin/tasks/{name}", response_model=AdminResponse, responses=ERRORS)
    async def remove_task(name: str, request: Request) -> AdminResponse:
        """Stop serving a task: new requests for it get 404 at once, queued ones are answered first."""
        state = state_of(request)
        state.check_admin(request)
        engine = state.ready_engine()
        remove = admin_method(engine, "remove_task")
        async with state.admin_lock:
            if name not in engine.tasks or name in state.removing:
                raise ApiError(404, f"unknown task '{name}'; this server has tasks: {', '.join(engine.tasks)}")
            state.removing.add(name)
            try:
                deadline = time.monotonic() + settings.drain_timeout_s
                while state.batcher.pending(name) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                if state.batcher.pending(name):
                    raise ApiError(
                        503, f"task '{name}' still has queued rows after {settings.drain_timeout_s:g} s; retry", {"Retry-After": "1"}
                    )
                remove(name)
            finally:
                state.removing.discard(name)
            state.metrics.tasks.set(len(engine.tasks))
        log.info("task %s removed", name)
        return AdminResponse(task=name, action="removed", tasks=list(engine.tasks))


def admin_method(engine, name: str):
    """The engine's add_task / remove_task, or 409: only a factored bundle's task set can change."""
    method = getattr(engine, name, None)
    if method is None or getattr(engine, "kind", "factored") != "factored":
        raise ApiError(409, "this model serves a fixed set of tasks (not a factored bundle)")
    return method
