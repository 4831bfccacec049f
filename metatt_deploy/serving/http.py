"""What every HTTP front of the model shares (the FastAPI server and the Ray Serve deployment).

The engine protocol, the server settings, the request checks (served task, size limits), the
response built from logits, and the error handlers that turn every failure into
``{"error": "one line"}`` with its status code: malformed JSON 400, wrong fields or types 422
(naming the field), unknown route 404, a body not sent as JSON 415, too large 413; anything
unexpected a 500 whose traceback goes to the log and never into the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.serving.runtime import scored
from metatt_deploy.serving.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse, Prediction

log = logging.getLogger("metatt_deploy.serving")


class Engine(Protocol):
    """What a server needs from a model: `Runtime` is one."""

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


def engine_id(engine: Any) -> str:
    """The served model's identity: a factored bundle's id, else what the engine calls itself, else the export's name."""
    info = getattr(engine, "info", None) or {}
    return str(info.get("bundle_id") or getattr(engine, "model_id", None) or info.get("name") or "model")


def checked_task(engine: Engine, body: ClassifyRequest, settings: ServeSettings, hidden: set[str] | frozenset[str] = frozenset()) -> str:
    """The request's task, once it is served (404) and the request is within the limits (413)."""
    if body.task not in engine.tasks or body.task in hidden:
        served = ", ".join(t for t in engine.tasks if t not in hidden)
        raise ApiError(404, f"unknown task '{body.task}'; this server has tasks: {served}")
    if len(body.texts) > settings.max_texts:
        raise ApiError(413, f"{len(body.texts)} texts in one request; at most {settings.max_texts} (--max-texts)")
    longest = max(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in body.texts)
    if longest > settings.max_chars:
        raise ApiError(413, f"a text of {longest} characters; at most {settings.max_chars} per text (--max-chars)")
    return body.task


def classify_response(engine: Engine, task: str, labels: list[str], rows: Sequence[np.ndarray], with_logits: bool) -> ClassifyResponse:
    predictions = []
    for row in rows:
        answer = scored(task, row, labels)
        del answer["task"]
        predictions.append(Prediction(**answer, logits=row.tolist() if with_logits else None))
    return ClassifyResponse(task=task, model_id=engine_id(engine), predictions=predictions)


def error(code: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=code, headers=headers)


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


def limit_requests(app: FastAPI, settings: ServeSettings) -> None:
    """413 for a declared body over the limit, 415 for a POST to /v1 not sent as JSON (before any parsing)."""

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error(413, f"request body over {settings.max_body_bytes} bytes; send fewer or shorter texts")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and request.url.path.startswith("/v1/") and kind != "application/json":
            return error(415, f"content type '{kind or 'none'}'; send the body as JSON with 'Content-Type: application/json'")
        return await call_next(request)
