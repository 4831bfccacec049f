"""The HTTP API: many tasks on one model, requests of any task batched together.

    app = create_app(lambda: Runtime("bundle/"), ServeSettings(max_batch=32))   # uvicorn serves it

Endpoints (OpenAPI at /docs and /openapi.json; docs/serving.md):

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
draining); an unexpected failure is a 500 with one line, its traceback goes to the server log
only. On shutdown, uvicorn stops accepting connections and waits for open requests; the
lifespan then drains the batcher, so every accepted request is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.serving.batcher import Batcher, Closed, QueueFull
from metatt_deploy.serving.metrics import UNKNOWN_TASK, ServerMetrics
from metatt_deploy.serving.runtime import scored
from metatt_deploy.serving.schemas import (
    AdminResponse,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    Prediction,
    Status,
    TaskInfo,
    TasksResponse,
)

log = logging.getLogger("metatt_deploy.serving")


class Engine(Protocol):
    """What the server needs from a model: `Runtime` is one (a factored bundle or an export)."""

    tasks: list[str]

    def labels(self, task: str) -> list[str]: ...

    def logits(self, texts: list[Any], task: str | None = None, tasks: list[str] | None = None) -> list[np.ndarray]: ...


@dataclass
class ServeSettings:
    """Batching, limits and admin access (the options of `metatt-deploy serve`)."""

    max_batch: int = 32  # rows per model call
    max_wait_ms: float = 5.0  # the longest a row waits for others to fill its batch
    max_queue: int = 1024  # rows waiting; beyond that requests get 429
    max_texts: int = 64  # texts per request (413 beyond)
    max_chars: int = 4096  # characters per text (413 beyond); the tokenizer truncates long texts anyway
    max_body_bytes: int = 1 << 20  # request body (413 beyond)
    cross_task: bool = True  # batch rows of different tasks together (False: one task per batch)
    admin_token: str | None = None  # bearer token for /admin; None turns /admin off
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0  # how long removing a task waits for its queued rows

    def check(self) -> ServeSettings:
        for name in ("max_batch", "max_queue", "max_texts", "max_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise MetaTTError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0:
            raise MetaTTError("--max-wait-ms must be 0 or more")
        if self.max_queue < self.max_texts:
            raise MetaTTError(f"--max-queue ({self.max_queue}) must hold at least one full request (--max-texts {self.max_texts})")
        return self


class ApiError(Exception):
    """An answer other than 200: status code, one-line reason, optional headers."""

    def __init__(self, code: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.headers = headers


def engine_id(engine: Any) -> str:
    """The served model's identity: a factored bundle's id, else what the engine calls itself."""
    info = getattr(engine, "info", None) or {}
    return str(info.get("bundle_id") or getattr(engine, "model_id", None) or "model")


class ServerState:
    """The engine (once loaded), its batcher and metrics, and the readiness of the server."""

    def __init__(self, engine: Engine | Callable[[], Engine], settings: ServeSettings):
        self.settings = settings
        self.factory = engine if callable(engine) and not hasattr(engine, "logits") else (lambda: engine)
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
        try:
            engine = await asyncio.to_thread(self.factory)
            for task in list(engine.tasks):  # warm every graph and adapter before saying ready
                await asyncio.to_thread(engine.logits, ["warm-up"], tasks=[task])
        except MetaTTError as e:
            self.load_error = str(e)
            log.error("the model did not load: %s", e)
            return
        except Exception as e:  # a bug: keep the process up, unready, and say why in /readyz
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("the model did not load")
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

    def served_task(self, engine: Engine, task: str) -> str:
        if task not in engine.tasks or task in self.removing:
            raise ApiError(
                404, f"unknown task '{task}'; this server has tasks: {', '.join(t for t in engine.tasks if t not in self.removing)}"
            )
        return task

    def check_admin(self, request: Request) -> None:
        token = self.settings.admin_token
        if not token:
            raise ApiError(403, "admin endpoints are off; start the server with --admin-token (or METATT_ADMIN_TOKEN) to use them")
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "admin endpoints need the header 'Authorization: Bearer <admin token>'")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Malformed JSON."),
        (404, "Unknown task."),
        (413, "Too many texts, a text too long, or a body too large."),
        (415, "The body is not sent as application/json."),
        (422, "Wrong fields or types (the reason names the field)."),
        (429, "The queue is full; retry after Retry-After seconds."),
        (503, "Loading, or shutting down; retry after Retry-After seconds."),
    )
}


def _one_line(exc: RequestValidationError) -> tuple[int, str]:
    """(status, reason) for a validation error: 400 for malformed JSON, else 422 naming the field."""
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return 400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return 422, f"{where}: {first['msg']}{more}".replace("\n", " ")


def _error(code: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=code, headers=headers)


def create_app(engine: Engine | Callable[[], Engine], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app over ``engine`` (or a function that loads it, called in the background)."""
    settings = (settings or ServeSettings()).check()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(engine, settings)
        app.state.server = state
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="metatt-deploy",
        summary="Text classification for many tasks on one model (a MetaTT factored bundle), with dynamic batching across tasks.",
        version="1",
        lifespan=lifespan,
    )

    def state_of(request: Request) -> ServerState:
        return request.app.state.server

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return _error(413, f"request body over {settings.max_body_bytes} bytes; send fewer or shorter texts")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and request.url.path.startswith("/v1/") and kind != "application/json":
            return _error(415, f"content type '{kind or 'none'}'; send the body as JSON with 'Content-Type: application/json'")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.code, exc.reason, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        code, reason = _one_line(exc)
        if request.url.path == "/v1/classify":
            state_of(request).metrics.observe_request(UNKNOWN_TASK, code, 0.0)
        return _error(code, reason)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True, responses=ERRORS)
    async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
        """Classify texts (or sentence pairs) with one task. Concurrent requests, of any task, share model calls."""
        state = state_of(request)
        started = time.perf_counter()
        task = UNKNOWN_TASK
        code = 500
        try:
            engine = state.ready_engine()
            task = state.served_task(engine, body.task)
            if len(body.texts) > settings.max_texts:
                raise ApiError(413, f"{len(body.texts)} texts in one request; at most {settings.max_texts} (--max-texts)")
            longest = max(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in body.texts)
            if longest > settings.max_chars:
                raise ApiError(413, f"a text of {longest} characters; at most {settings.max_chars} per text (--max-chars)")
            labels = engine.labels(task)  # now: a removal may complete while the rows are in flight
            try:
                rows = await state.batcher.submit(list(body.texts), task)
            except QueueFull as e:
                raise ApiError(429, f"{e}; retry later", {"Retry-After": str(settings.retry_after_s)}) from None
            except Closed as e:
                raise ApiError(503, f"{e}; retry on another replica", {"Retry-After": str(settings.retry_after_s)}) from None
            except MetaTTError as e:
                raise ApiError(422, str(e)) from None
            predictions = []
            for row in rows:
                answer = scored(task, row, labels)
                del answer["task"]
                predictions.append(Prediction(**answer, logits=row.tolist() if body.return_logits else None))
            code = 200
            return ClassifyResponse(task=task, model_id=engine_id(engine), predictions=predictions)
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

    @app.get("/healthz", response_model=Status)
    async def healthz() -> Status:
        """Liveness: the process and its event loop answer."""
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses={503: {"model": Status}})
    async def readyz(request: Request) -> Response:
        """Readiness: loaded, warm and accepting requests (route traffic here only while this is 200)."""
        try:
            engine = state_of(request).ready_engine()
        except ApiError as e:
            return JSONResponse(Status(status="unready", detail=e.reason).model_dump(), status_code=503, headers=e.headers)
        return JSONResponse(Status(status="ready", detail=f"{len(engine.tasks)} task(s)").model_dump())

    @app.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (text format)."""
        state = state_of(request)
        state.metrics.queue_depth.set(state.batcher.depth)
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/admin/tasks/{name}", response_model=AdminResponse, status_code=201, responses=ERRORS)
    async def add_task(name: str, request: Request) -> AdminResponse:
        """Serve a task file added to the bundle after start (merge --factored --task NAME -o BUNDLE), without a restart.

        The task file must belong to this bundle (bundle id) and match its recorded sha256; else 422.
        """
        state = state_of(request)
        state.check_admin(request)
        engine = state.ready_engine()
        add = getattr(engine, "add_task", None)
        if add is None:
            raise ApiError(409, "this model serves a fixed set of tasks (not a factored bundle)")
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
        remove = getattr(engine, "remove_task", None)
        if remove is None:
            raise ApiError(409, "this model serves a fixed set of tasks (not a factored bundle)")
        async with state.admin_lock:
            state.served_task(engine, name)
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

    return app
