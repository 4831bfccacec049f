"""What every HTTP front of a model shares (the classifier server, the Ray Serve deployment, and
any other server on uvicorn, such as a decoder server).

The engine protocol, the server settings, the request checks (served task, size limits, rows the
engine refuses), the response built from logits, and the error handlers that turn every failure
into ``{"error": "one line"}`` with its status code: malformed JSON or malformed HTTP 400, wrong
fields or types 422 (naming the field), unknown route 404, a body not sent as JSON 415, too large
413, a body not sent in time 408; anything unexpected a 500 whose traceback goes to the log and
never into the answer.

Pieces any server reuses, whatever its routes:

- `BodyLimit`: ASGI middleware that reads the body before the app, counting bytes as they
  arrive, so the limit holds for ``Transfer-Encoding: chunked`` as for ``Content-Length``, and a
  body that trickles in is cut off after ``body_timeout_s``.
- `JsonHttpProtocol`: uvicorn's HTTP/1.1 protocol (h11) whose answer to a request it cannot
  parse (a malformed ``Content-Length``, a bad request line) is the JSON error shape, and which
  closes a connection that starts no request within the keep-alive time.
- `bind`: the listening socket, opened before the model loads, so a port in use, a port out of
  range or a host that does not resolve is one `MetaTTError` line at start-up.
- `check_admin_token` / `bearer_matches`: the admin token's rules and its comparison as UTF-8 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import h11
import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.serving.runtime import scored
from metatt_deploy.serving.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse, Prediction, Status

log = logging.getLogger("metatt_deploy.serving")


class Engine(Protocol):
    """What a server needs from a model: `Runtime` is one."""

    @property
    def tasks(self) -> list[str]: ...  # read-only: `Runtime`'s come from its task table, changed only by add_task / remove_task

    def labels(self, task: str) -> list[str]: ...

    def logits(self, texts: list[Any], task: str | None = None, tasks: list[str] | None = None) -> list[np.ndarray]: ...

    def check(self, texts: Sequence[Any], task: str) -> None:
        """Raise MetaTTError naming the first row ``task`` cannot take (answered 422 before the rows are queued)."""


def check_number(option: str, value: float, low: float, high: float) -> None:
    """A numeric setting must be finite and within [low, high]: NaN and infinities are refused first (NaN compares false)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MetaTTError(f"{option} must be a finite number, got {value}")
    if not low <= value <= high:
        raise MetaTTError(f"{option} must be between {low:g} and {high:g}, got {value:g}")


def check_admin_token(token: str | None) -> None:
    """An admin token must be sendable in an HTTP header: not empty, no spaces or control characters.

    Non-ASCII tokens are allowed: clients send them as UTF-8 and `bearer_matches` compares bytes.
    """
    if token is None:
        return
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise MetaTTError("the admin token must be non-empty without spaces or control characters; set another one")
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:
        raise MetaTTError("the admin token is not valid UTF-8 text; set another one") from None


def bearer_matches(request: Request, token: str) -> bool:
    """Whether the request's Authorization header is ``Bearer <token>``, compared as UTF-8 bytes in constant time.

    The raw header bytes are compared: Starlette decodes header values as latin-1, so comparing
    decoded text would never match a UTF-8 client's non-ASCII token.
    """
    given = next((v for k, v in request.headers.raw if k.lower() == b"authorization"), b"")
    return secrets.compare_digest(given, b"Bearer " + token.encode("utf-8"))


# setting -> (the serve option that sets it, lowest, highest): a NaN, an infinity or a value out of range is a start-up error
SETTING_RANGES: dict[str, tuple[str, float, float]] = {
    "max_batch": ("--max-batch", 1, 1 << 16),
    "max_wait_ms": ("--max-wait-ms", 0, 60_000),
    "max_queue": ("--max-queue", 1, 1 << 24),
    "max_texts": ("--max-texts", 1, 1 << 16),
    "max_chars": ("--max-chars", 1, 1 << 24),
    "max_body_bytes": ("max_body_bytes", 1, 1 << 30),
    "body_timeout_s": ("--body-timeout-seconds", 0.001, 3600),
    "keep_alive_s": ("--keep-alive-seconds", 0.001, 3600),
    "retry_after_s": ("retry_after_s", 0, 3600),
    "drain_timeout_s": ("drain_timeout_s", 0, 3600),
}


@dataclass
class ServeSettings:
    """Batching, limits, timeouts and admin access (the options of `metatt-deploy serve`)."""

    max_batch: int = 32  # rows per model call
    max_wait_ms: float = 5.0  # the longest a row waits for others to fill its batch
    max_queue: int = 1024  # rows waiting; beyond that requests get 429
    max_texts: int = 64  # texts per request (413 beyond)
    max_chars: int = 4096  # characters per text (413 beyond); the tokenizer truncates long texts anyway
    max_body_bytes: int = 1 << 20  # request body, however it is framed (413 beyond)
    body_timeout_s: float = 10.0  # the whole body must arrive within this (408 beyond)
    keep_alive_s: float = 5.0  # an idle connection, or one that starts no request, is closed after this
    cross_task: bool = True  # batch rows of different tasks together (False: one task per batch)
    admin_token: str | None = None  # bearer token for /admin; None turns /admin off
    docs: bool = False  # serve /docs (Swagger UI, loaded from a CDN by the browser); /openapi.json is always there
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0  # how long removing a task waits for its queued rows

    def check(self) -> ServeSettings:
        """Every number finite and in range, the queue large enough for one request, the admin token sendable."""
        for name, (option, low, high) in SETTING_RANGES.items():
            check_number(option, getattr(self, name), low, high)
        if self.max_queue < self.max_texts:
            raise MetaTTError(f"--max-queue ({self.max_queue}) must hold at least one full request (--max-texts {self.max_texts})")
        check_admin_token(self.admin_token)
        return self


class ApiError(Exception):
    """An answer other than 200: status code, one-line reason, optional headers."""

    def __init__(self, code: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.headers = headers


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Malformed JSON."),
        (404, "Unknown task."),
        (408, "The body did not arrive within the server's body timeout."),
        (413, "Too many texts, a text too long, or a body too large."),
        (415, "The body is not sent as application/json."),
        (422, "Wrong fields or types (the reason names the field)."),
        (429, "The queue is full; retry after Retry-After seconds."),
        (503, "Loading, or shutting down; retry after Retry-After seconds."),
    )
}


def engine_id(engine: Any) -> str:
    """The served model's identity: a factored bundle's id, else what the engine calls itself, else the export's name."""
    info = getattr(engine, "info", None) or {}
    return str(info.get("bundle_id") or getattr(engine, "model_id", None) or info.get("name") or "model")


def checked_task(engine: Engine, body: ClassifyRequest, settings: ServeSettings, hidden: set[str] | frozenset[str] = frozenset()) -> str:
    """The request's task, once it is served (404), the request is within the limits (413) and the engine takes every row (422).

    Every row is checked here, at the edge, so a row the model cannot take is refused with its
    own request and never joins a batch with other clients' rows.
    """
    if body.task not in engine.tasks or body.task in hidden:
        served = ", ".join(t for t in engine.tasks if t not in hidden)
        raise ApiError(404, f"unknown task '{printable(body.task, 80)}'; this server has tasks: {served}")
    if len(body.texts) > settings.max_texts:
        raise ApiError(413, f"{len(body.texts)} texts in one request; at most {settings.max_texts} (--max-texts)")
    longest = max(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in body.texts)
    if longest > settings.max_chars:
        raise ApiError(413, f"a text of {longest} characters; at most {settings.max_chars} per text (--max-chars)")
    try:
        engine.check(body.texts, body.task)
    except MetaTTError as e:
        raise ApiError(422, str(e)) from None
    return body.task


def classify_response(engine: Engine, task: str, labels: list[str], rows: Sequence[np.ndarray], with_logits: bool) -> ClassifyResponse:
    predictions = []
    for row in rows:
        answer = scored(task, row, labels)
        del answer["task"]
        predictions.append(Prediction(**answer, logits=row.tolist() if with_logits else None))
    return ClassifyResponse(task=task, model_id=engine_id(engine), predictions=predictions)


def printable(text: str, limit: int | None = None) -> str:
    """``text`` (at most ``limit`` characters) with anything UTF-8 cannot encode (lone surrogates) as backslash escapes.

    Reasons echo user input (a task name, a field name); JSON bodies are UTF-8, so an echoed lone
    surrogate would make the error answer itself fail.
    """
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def error(code: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape: ``{"error": "one line"}`` with ``code``."""
    return JSONResponse({"error": printable(reason)}, status_code=code, headers=headers)


def one_line(exc: RequestValidationError) -> tuple[int, str]:
    """(status, reason) for a validation error: 400 for malformed JSON, else 422 naming the field."""
    errors = list(exc.errors())
    first: dict[str, Any] = dict(errors[0]) if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return 400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return 422, f"{where}: {first['msg']}{more}".replace("\n", " ")


def install_error_handlers(app: FastAPI, on_invalid: Callable[[Request, int], None] | None = None) -> None:
    """Every error as one line of JSON; ``on_invalid(request, code)`` sees refused request bodies (for metrics)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.code, exc.reason, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        code, reason = one_line(exc)
        if on_invalid is not None:
            on_invalid(request, code)
        return error(code, reason)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")


class BodyLimit:
    """ASGI middleware: the whole request body, at most ``max_bytes``, read within ``timeout_s`` before the app sees it.

    Bytes are counted as they arrive, so the limit holds however the body is framed
    (``Content-Length`` or ``Transfer-Encoding: chunked``): the answer is 413 as soon as the count
    passes the limit, and the rest is never read (the connection is closed). A body that has not
    fully arrived after ``timeout_s`` (a client trickling bytes) is answered 408. A POST to /v1/
    not sent as JSON is 415 before any of its body is read. The app then reads the buffered body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, shape: Callable[[int, str], JSONResponse] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.error = shape or error  # the server's error shape: the classify API's, or OpenAI's (openai_app.py)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
        if scope["method"] == "POST" and scope["path"].startswith("/v1/") and kind != "application/json":
            answer = self.error(415, f"content type '{kind or 'none'}'; send the body as JSON with 'Content-Type: application/json'")
            return await self._close_with(answer, scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():  # h11 refuses these first; other servers (Ray's proxy) may not
            return await self._close_with(self.error(400, "malformed Content-Length; send the body's size in bytes"), scope, receive, send)
        if length is not None and int(length) > self.max_bytes:
            return await self._close_with(self._too_large(), scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.timeout_s
        more = True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                answer = self.error(408, f"the request body did not arrive within {self.timeout_s:g} s; send it at once")
                return await self._close_with(answer, scope, receive, send)
            if message["type"] == "http.disconnect":
                return  # the client went away: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._close_with(self._too_large(), scope, receive, send)
            more = message.get("more_body", False)
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> JSONResponse:
        return self.error(413, f"request body over {self.max_bytes} bytes; send a smaller request (fewer or shorter texts or messages)")

    @staticmethod
    async def _close_with(answer: JSONResponse, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer before the body is read, and close the connection: the unread rest of the body cannot start another request."""
        answer.headers["connection"] = "close"
        await answer(scope, receive, send)


def limit_requests(app: FastAPI, settings: ServeSettings) -> None:
    """Install `BodyLimit` with the settings' body size and time (before routing and any parsing)."""
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)


SHUTDOWN_GRACE_S = 0.5  # on shutdown, how long an idle connection stays open for a request already on its way


class JsonHttpProtocol(H11Protocol):
    """uvicorn's h11 protocol, with the JSON error shape for unparsable requests, a deadline for starting a request, and a gentler shutdown.

    - A request h11 cannot parse (a malformed or repeated ``Content-Length``, a bad request line
      or header) is answered 400 ``{"error": ...}`` instead of uvicorn's plain text.
    - A connection must start its next request (all its headers) within the keep-alive time after
      it opens or after its last answer; uvicorn's own timer covers only an idle connection, and a
      client that trickles header bytes, or opens a connection and sends nothing, would otherwise
      hold it forever. The body has its own deadline (`BodyLimit`).
    - On shutdown uvicorn closes idle keep-alive connections at once, which resets a request the
      client sent a moment before (it is in the socket, not yet read). Here an idle connection
      stays open ``SHUTDOWN_GRACE_S`` longer: a request that arrives is answered (with
      ``Connection: close``), then the connection closes.

    h11 is uvicorn's reference parser; this server uses it (not httptools) so that one class
    carries these rules. Pass it as ``uvicorn.Config(http=JsonHttpProtocol)``.
    """

    _draining = False  # shutdown has begun: every request from now on is the connection's last
    malformed: dict[str, Any] = {
        "error": "malformed HTTP request (request line, headers or body framing such as Content-Length); send valid HTTP/1.1"
    }

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_deadline()

    def shutdown(self) -> None:
        """Called by uvicorn's shutdown: an idle connection gets ``SHUTDOWN_GRACE_S`` for a request on its way, a busy one closes after its answer."""
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(SHUTDOWN_GRACE_S, self._no_request_started, self.cycle)
        else:
            self.cycle.keep_alive = False

    def handle_events(self) -> None:
        super().handle_events()
        if self._draining and self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a request that arrived during the shutdown grace: answer it, then close

    def _start_deadline(self) -> None:
        self.loop.call_later(self.timeout_keep_alive, self._no_request_started, self.cycle)

    def _no_request_started(self, cycle: Any) -> None:
        """Close the connection if it began no request since the deadline was set (the same cycle, and it is answered)."""
        if self.cycle is cycle and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(self.malformed).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which accepts the connections the kernel has already completed before it closes the listener.

    Closing a listening socket resets every connection in its accept queue: clients that
    connected and sent a request just before SIGTERM would see a reset. Waiting
    ``SHUTDOWN_GRACE_S`` first lets the event loop accept them; their requests are answered
    (`JsonHttpProtocol` closes each connection after its answer from then on).
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await asyncio.sleep(SHUTDOWN_GRACE_S)
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """The listening TCP socket for ``host``:``port``, or one MetaTTError line (port out of range, in use, host unknown).

    Opened before the model loads, so a server that could never listen says so at once instead
    of after loading (uvicorn's own bind failure is a log line and exit status 3).
    """
    check_number("--port", port, 1, 65535)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise MetaTTError(f"--host '{printable(host, 80)}' does not resolve ({e}); pass an address such as 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise MetaTTError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port, or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def service_app(make_state: Callable[[], Any], *, title: str, summary: str, docs: bool) -> FastAPI:
    """A FastAPI app whose lifespan starts the state ``make_state()`` builds (``app.state.server``) and stops it on shutdown.

    Both servers (classifiers: app.py, decoders: openai_app.py) are built on it. /docs and /redoc
    exist only when asked for: Swagger UI and ReDoc load their scripts from a CDN.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state = make_state()
        app.state.server = state
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    return FastAPI(
        title=title,
        summary=summary,
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )


def status_routes(app: FastAPI, ready: Callable[[Request], str], exposition: Callable[[Request], tuple[bytes, str]]) -> None:
    """GET /healthz, /readyz and /metrics, as both servers answer them.

    ``ready(request)`` is the ready server's one-line detail, or raises `ApiError` while it is not
    (503, with its Retry-After); ``exposition(request)`` is the Prometheus text and its media type.
    """

    @app.get("/healthz", response_model=Status)
    async def healthz() -> Status:
        """Liveness: the process and its event loop answer."""
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses={503: {"model": Status}})
    async def readyz(request: Request) -> Response:
        """Readiness: loaded, warm and accepting requests (route traffic here only while this is 200)."""
        try:
            detail = ready(request)
        except ApiError as e:
            return JSONResponse(Status(status="unready", detail=e.reason).model_dump(), status_code=503, headers=e.headers)
        return JSONResponse(Status(status="ready", detail=printable(detail)).model_dump())

    @app.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (text format)."""
        body, content_type = exposition(request)
        return Response(body, media_type=content_type)


async def load_warm(factory: Callable[[], Any], warm: Callable[[Any], None]) -> tuple[Any, str | None]:
    """Both servers' start-up: build the model on a thread, warm it there; ``(model, None)`` or ``(None, why)``.

    A model that cannot load is logged and its reason returned for /readyz: a user's error
    (`MetaTTError`) as its one line, anything else (a bug) with its type and a logged traceback.
    The process stays up, unready, either way; `server.py` turns this into exit 2 at start-up.
    """
    try:
        model = await asyncio.to_thread(factory)
        await asyncio.to_thread(warm, model)
    except MetaTTError as e:
        log.error("the model did not load: %s", e)
        return None, str(e)
    except Exception as e:
        log.exception("the model did not load")
        return None, f"{type(e).__name__}: {e}"
    return model, None
