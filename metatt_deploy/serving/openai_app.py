"""The OpenAI-compatible HTTP API of a decoder export or factored decoder bundle: every task is a model.

    app = create_openai_app(lambda: Generator("bundle/", form="auto"), LLMSettings())   # uvicorn serves it

Endpoints (docs/serving-llm.md):

    GET    /v1/models              one model id per task (a single-task export: its one id)
    POST   /v1/chat/completions    messages -> the assistant's answer (chat template), streamed or not
    POST   /v1/completions         prompt (a text or a list of texts) -> its continuation, streamed or not
    GET    /healthz, /readyz       liveness; loaded, warm and not draining
    GET    /metrics                Prometheus text format
    POST   /admin/tasks/{name}     serve a task file added to the bundle (bearer token)
    DELETE /admin/tasks/{name}     stop serving a task, after its sequences finish

Requests of every task share the continuous-batching scheduler (llm_engine.py). Clients, SDKs and
evaluation harnesses speak this API, so errors take OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with its status codes: 400 for a bad field
or a prompt that does not fit the context (with the numbers), 404 for an unknown model, 413 for
a body over the cap, 415 for a body not sent as JSON, 429 + Retry-After when the queue is full,
503 + Retry-After while loading or draining; a 500 carries one line and its traceback goes to the
log only. Fields this server does not implement with a non-default value (``n`` > 1,
``logprobs``, ``echo``, penalties, tools) are refused with one line rather than ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.decode import Decoding, SamplingParams, Step
from metatt_deploy.serving.batcher import Closed, QueueFull
from metatt_deploy.serving.generate import DecodingBackend
from metatt_deploy.serving.http import (
    ApiError,
    BodyLimit,
    JsonHttpProtocol,
    ServeSettings,
    load_warm,
    log,
    one_line,
    printable,
    service_app,
    status_routes,
)
from metatt_deploy.serving.llm_engine import Event, LLMEngine, Scheduler, Seq, StepStats
from metatt_deploy.serving.metrics import UNKNOWN_TASK, LLMMetrics
from metatt_deploy.serving.schemas import AdminResponse

OWNER = "metatt-deploy"
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


@dataclass
class LLMSettings:
    """Scheduling, limits and admin access of the generation server (the options of `metatt-deploy serve` on a decoder)."""

    max_running: int = 16  # sequences decoding together (slots); a step's rows
    max_tokens_per_step: int = 256  # prompt tokens prefilled per step (longer prompts are spread over steps; docs/serving-llm.md)
    max_queue: int = 256  # requests waiting for a slot; beyond that 429
    max_body_bytes: int = 1 << 20  # request body, however it is framed (413 beyond)
    body_timeout_s: float = 10.0  # the whole body must arrive within this (408 beyond): a trickling client holds no connection
    admin_token: str | None = None
    docs: bool = False  # /docs and /redoc load their scripts from a CDN: off unless asked for (serve --docs)
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0  # how long removing a task waits for its sequences

    def check(self) -> LLMSettings:
        for name in ("max_running", "max_tokens_per_step", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise MetaTTError(f"--{name.replace('_', '-')} must be at least 1")
        return self


def with_server_settings(llm: LLMSettings, settings: ServeSettings) -> LLMSettings:
    """``llm`` with what every server shares taken from ``settings`` (serve's options): the admin token, /docs, the body limits."""
    return replace(
        llm,
        admin_token=settings.admin_token,
        docs=settings.docs,
        body_timeout_s=settings.body_timeout_s,
        max_body_bytes=settings.max_body_bytes,
    )


# ---------------------------------------------------------------- request and response bodies


class _Request(BaseModel):
    """Fields both endpoints take; unknown fields are refused (a typo is a 400 naming it, not an option silently ignored)."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(description="A task of the served bundle (GET /v1/models lists them).")
    max_tokens: StrictInt | None = Field(default=None, ge=1, description="New tokens at most.")
    temperature: float = Field(default=1.0, ge=0, le=2, description="0: greedy; above: sampling (OpenAI's default 1).")
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=0, description="Seeds the request's own sampler: the same seed gives the same text.")
    stop: StrictStr | list[StrictStr] | None = Field(default=None, description="Up to 4 strings; generation ends before the first.")
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt = Field(default=1, description="Choices per prompt: only 1.")
    user: StrictStr | None = None
    # accepted at their defaults only (clients send them); anything else is refused by `unsupported`
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr] = Field(description="A text, or a list of texts (one choice each).")
    max_tokens: StrictInt | None = Field(default=16, ge=1, description="New tokens at most (OpenAI's default 16).")
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, description="The newer name of max_tokens.")
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = OWNER


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def unsupported(body: _Request) -> None:
    """400 for a field this server does not implement, set to other than its default."""
    if body.n != 1:
        raise ApiError(400, f"n={body.n}: this server returns one choice per prompt; send n separate requests (with different seeds)")
    checks: list[tuple[str, bool]] = [
        ("logprobs", body.logprobs not in (None, False, 0)),
        ("frequency_penalty", body.frequency_penalty != 0),
        ("presence_penalty", body.presence_penalty != 0),
        ("logit_bias", bool(body.logit_bias)),
    ]
    if isinstance(body, CompletionRequest):
        checks += [("echo", body.echo), ("suffix", body.suffix is not None), ("best_of", body.best_of not in (None, 1))]
    if isinstance(body, ChatRequest):
        checks += [("tools", bool(body.tools)), ("response_format", (body.response_format or {}).get("type", "text") != "text")]
    for name, used in checks:
        if used:
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: at most 4 non-empty strings")


# ---------------------------------------------------------------- errors in OpenAI's shape


def openai_error(code: int, message: str, headers: dict[str, str] | None = None, err_code: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(code, "invalid_request_error")
    body = {"error": {"message": printable(message), "type": kind, "param": None, "code": err_code}}  # echoed input may hold surrogates
    return JSONResponse(body, status_code=code, headers=headers)


class OpenAIError(ApiError):
    """An `ApiError` with OpenAI's machine-readable ``code`` (model_not_found, context_length_exceeded, ...)."""

    def __init__(self, code: int, reason: str, err_code: str, headers: dict[str, str] | None = None):
        super().__init__(code, reason, headers)
        self.err_code = err_code


def install_openai_errors(app: FastAPI, settings: LLMSettings, on_refused: Callable[[int], None]) -> None:
    """Every error in OpenAI's shape; body size and content type are checked before any parsing."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return openai_error(exc.code, exc.reason, exc.headers, getattr(exc, "err_code", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        _, reason = one_line(exc)  # OpenAI answers 400 for malformed JSON and for a wrong field alike
        on_refused(400)
        return openai_error(400, reason)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return openai_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return openai_error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    def refused(code: int, reason: str) -> JSONResponse:
        on_refused(code)
        return openai_error(code, reason, err_code="request_too_large" if code == 413 else None)

    # counts bytes as they arrive (a chunked body too), with a deadline for the whole body; 415 before any is read
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s, shape=refused)


class OpenAIHttpProtocol(JsonHttpProtocol):
    """`JsonHttpProtocol` whose 400 for an unparsable request (bad framing, request line or header) is in OpenAI's error shape."""

    malformed = {"error": {"message": JsonHttpProtocol.malformed["error"], "type": "invalid_request_error", "param": None, "code": None}}


# ---------------------------------------------------------------- the server


class LLMServer:
    """The generator (once loaded), its scheduler and metrics, and readiness."""

    def __init__(self, factory: Callable[[], DecodingBackend], settings: LLMSettings, background_load: bool = True):
        self.factory = factory
        self.background_load = background_load
        self.settings = settings
        self.metrics = LLMMetrics()
        self.generator: DecodingBackend | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.removing: set[str] = set()
        self.admin_lock = asyncio.Lock()
        self.created = int(time.time())
        self._loader: asyncio.Task | None = None
        self._draining = False

    async def start(self) -> None:
        """Load in the background (/healthz answers meanwhile), or, where the host routes only to started apps (Ray), before returning."""
        if self.background_load:
            self._loader = asyncio.get_running_loop().create_task(self._load())
            return
        await self._load()
        if self.load_error is not None:
            raise MetaTTError(f"the model did not load: {self.load_error}")

    def warm_every_task(self, generator: DecodingBackend) -> None:
        for task in self.served(generator):  # every graph and adapter runs before /readyz says ready
            warm(generator, task)

    async def _load(self) -> None:
        started = time.perf_counter()
        generator, self.load_error = await load_warm(self.factory, self.warm_every_task)
        if generator is None:
            return
        engine = LLMEngine(max_running=self.settings.max_running, max_tokens_per_step=self.settings.max_tokens_per_step)
        self.scheduler = Scheduler(engine, max_queue=self.settings.max_queue, on_step=self._on_step, on_event=self._on_event)
        self.scheduler.start()
        self.generator = generator
        self.metrics.tasks.set(len(generator.tasks) or 1)
        log.info("ready: %d model id(s) in %.1f s", len(self.served(generator)), time.perf_counter() - started)

    async def stop(self) -> None:
        self._draining = True
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loader
        if self.scheduler is not None:
            await self.scheduler.close()

    def served(self, generator: DecodingBackend) -> list[str | None]:
        """The tasks to warm: a bundle's tasks, or the single export's one (None)."""
        return list(generator.tasks) or [None]

    def model_ids(self, generator: DecodingBackend) -> list[str]:
        """The ids /v1/models lists: a bundle's task names, or the export's one name."""
        return [t for t in generator.tasks if t not in self.removing] if generator.tasks else [export_id(generator)]

    # ------------------------------------------------------------ metrics hooks

    def _on_step(self, stats: StepStats, seconds: float) -> None:
        if stats.decoded_rows:
            self.metrics.step_rows.observe(stats.decoded_rows)
        self.metrics.step_seconds.observe(seconds)
        assert self.scheduler is not None
        self.metrics.running.set(self.scheduler.engine.running)
        self.metrics.waiting.set(self.scheduler.waiting)

    def _on_event(self, seq: Seq, step: Step) -> None:
        if step.token_id is None:
            return
        now = time.monotonic()
        self.metrics.generated_tokens.labels(seq.task).inc()
        if seq.last_token is None:
            self.metrics.ttft.labels(seq.task).observe(now - seq.created)
        else:
            self.metrics.inter_token.labels(seq.task).observe(now - seq.last_token)

    # ------------------------------------------------------------ checks used by the endpoints

    def ready(self) -> tuple[DecodingBackend, Scheduler]:
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.load_error is not None:
            raise ApiError(503, f"the model did not load: {self.load_error}")
        if self._draining or (self.scheduler is not None and not self.scheduler.accepting):
            raise ApiError(503, "the server is shutting down; retry on another replica", retry)
        if self.generator is None or self.scheduler is None:
            raise ApiError(503, "the model is still loading", retry)
        return self.generator, self.scheduler

    def task_of(self, generator: DecodingBackend, model: str) -> str | None:
        """The task a request's ``model`` names (None for a single-task export), else 404 listing the served ids."""
        ids = self.model_ids(generator)
        if model not in ids:
            raise OpenAIError(404, f"The model '{model}' does not exist; this server has: {', '.join(ids)}", "model_not_found")
        return model if generator.tasks else None

    def check_admin(self, request: Request) -> None:
        token = self.settings.admin_token
        if not token:
            raise ApiError(403, "admin endpoints are off; start the server with METATT_ADMIN_TOKEN or --admin-token-file to use them")
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "admin endpoints need the header 'Authorization: Bearer <admin token>'")


def warm(generator: DecodingBackend, task: str | None) -> None:
    """Two tokens of ``task``: its graph and adapter are loaded and run before the first request."""
    for _ in generator.steps(generator.encode("warm-up", raw=True), SamplingParams(max_tokens=2), task):
        pass


def export_id(generator: DecodingBackend) -> str:
    """A single-task export's model id: its folder's name."""
    return generator.bundle.resolve().name


def sampling(body: _Request, prompt_tokens: int, context: int | None, default_max: int | None) -> SamplingParams:
    """The request's sampling parameters, once its prompt and max_tokens fit the context (else 400 with the numbers)."""
    wanted = body.max_completion_tokens if isinstance(body, ChatRequest) and body.max_completion_tokens else body.max_tokens
    max_tokens = wanted or default_max or 16
    if context and prompt_tokens + max_tokens > context:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested {prompt_tokens + max_tokens} tokens "
            f"({prompt_tokens} in the prompt, {max_tokens} for the completion). Shorten the prompt or lower max_tokens.",
            "context_length_exceeded",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop)
    except MetaTTError as e:
        raise ApiError(400, str(e)) from None


def message_text(message: Message) -> dict[str, str]:
    content = message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)
    return {"role": "system" if message.role == "developer" else message.role, "content": content}


@dataclass
class Choice:
    """One choice being answered: its sequence and what it has said so far."""

    seq: Seq
    text: str = ""
    finish_reason: str | None = None


def create_openai_app(
    factory: Callable[[], DecodingBackend], settings: LLMSettings | None = None, *, background_load: bool = True
) -> FastAPI:
    """The FastAPI app over a decoder: ``factory`` loads its `DecodingBackend` (a `Generator`), in the background or, without ``background_load``, at start-up."""
    settings = (settings or LLMSettings()).check()
    app = service_app(
        lambda: LLMServer(factory, settings, background_load),
        title="metatt-deploy (OpenAI-compatible)",
        summary="Generation for many tasks on one small LLM (a MetaTT factored bundle), each task a model, batched continuously.",
        docs=settings.docs,
    )

    install_openai_errors(app, settings, lambda code: app.state.server.metrics.requests.labels(UNKNOWN_TASK, str(code)).inc())
    completion_routes(app)
    status_routes(app, readiness, exposition)
    admin_routes(app)
    return app


def server_of(request: Request) -> LLMServer:
    return request.app.state.server


async def complete(request: Request, body: _Request, kind: str) -> Response:
    """Both completion endpoints: checks, the request's sequences submitted to the scheduler, the answer (streamed or whole)."""
    server = server_of(request)
    settings = server.settings
    task_label = UNKNOWN_TASK
    code = 500
    try:
        generator, scheduler = server.ready()
        unsupported(body)
        task = server.task_of(generator, body.model)
        task_label = body.model
        prompts = await asyncio.to_thread(encode_prompts, generator, body)
        default_max = None if isinstance(body, CompletionRequest) else (generator.context or 0) - max(map(len, prompts))
        params = sampling(body, max(map(len, prompts)), generator.context, default_max if default_max and default_max > 0 else None)
        binding = generator.binding(task)
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        choices = [
            Choice(Seq(body.model, ids, params, binding, Decoding(params, generator.eos_ids, generator.tokenizer), _put(queue, i), i))
            for i, ids in enumerate(prompts)
        ]
        try:
            scheduler.submit([c.seq for c in choices])
        except QueueFull as e:
            raise OpenAIError(429, f"{e}; retry later", "queue_full", {"Retry-After": str(settings.retry_after_s)}) from None
        except Closed as e:
            raise ApiError(503, f"{e}; retry on another replica", {"Retry-After": str(settings.retry_after_s)}) from None
        server.metrics.prompt_tokens.labels(body.model).inc(sum(map(len, prompts)))
        answer = Answer(kind, body.model, choices, queue)
        if body.stream:
            code = 200
            return StreamingResponse(answer.sse(request, server), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        code, result = await answer.collect(request)
        return JSONResponse(result, status_code=code)
    except ApiError as e:
        code = e.code
        raise
    finally:
        server.metrics.requests.labels(task_label, str(code)).inc()


def completion_routes(app: FastAPI) -> None:
    """GET /v1/models, POST /v1/chat/completions and /v1/completions."""

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        """Every model id this server answers: one per task of a factored bundle."""
        server = server_of(request)
        generator, _ = server.ready()
        return ModelList(data=[ModelCard(id=m, created=server.created) for m in server.model_ids(generator)])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        """The assistant's answer to ``messages``, in the model's chat template; streamed as server-sent events with ``stream``."""
        return await complete(request, body, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """The continuation of ``prompt`` (as is, no chat template); streamed as server-sent events with ``stream``."""
        return await complete(request, body, "text")


def readiness(request: Request) -> str:
    """/readyz's detail: how many models (tasks) are served."""
    server = server_of(request)
    generator, _ = server.ready()
    return f"{len(server.model_ids(generator))} model(s)"


def exposition(request: Request) -> tuple[bytes, str]:
    server = server_of(request)
    if server.scheduler is not None:
        server.metrics.running.set(server.scheduler.engine.running)
        server.metrics.waiting.set(server.scheduler.waiting)
    return server.metrics.exposition()


def admin_routes(app: FastAPI) -> None:
    """POST and DELETE /admin/tasks/{name}: hot add and remove of a factored bundle's tasks (bearer token)."""

    @app.post("/admin/tasks/{name}", response_model=AdminResponse, status_code=201)
    async def add_task(name: str, request: Request) -> AdminResponse:
        """Serve a task file added to the bundle after start (merge --factored --task NAME -o BUNDLE), without a restart."""
        server = server_of(request)
        server.check_admin(request)
        generator, _ = server.ready()
        async with server.admin_lock:
            if name in generator.tasks:
                raise ApiError(409, f"task '{name}' is already served; DELETE it first to replace it")
            try:
                await asyncio.to_thread(generator.add_task, name)
            except MetaTTError as e:
                raise ApiError(422 if generator.tasks else 409, str(e)) from None
            server.metrics.tasks.set(len(generator.tasks))
        log.info("task %s added", name)
        return AdminResponse(task=name, action="added", tasks=list(generator.tasks))

    @app.delete("/admin/tasks/{name}", response_model=AdminResponse)
    async def remove_task(name: str, request: Request) -> AdminResponse:
        """Stop serving a task: new requests for it get 404 at once, its running sequences finish first."""
        server = server_of(request)
        server.check_admin(request)
        generator, scheduler = server.ready()
        if not generator.tasks:
            raise ApiError(409, "this model serves a fixed set of tasks (not a factored bundle)")
        async with server.admin_lock:
            if name not in generator.tasks or name in server.removing:
                raise OpenAIError(404, f"unknown task '{name}'; this server has tasks: {', '.join(generator.tasks)}", "model_not_found")
            server.removing.add(name)
            try:
                deadline = time.monotonic() + server.settings.drain_timeout_s
                while scheduler.engine.pending(name) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                if scheduler.engine.pending(name):
                    raise ApiError(
                        503, f"task '{name}' still has sequences after {server.settings.drain_timeout_s:g} s; retry", {"Retry-After": "1"}
                    )
                generator.remove_task(name)
            finally:
                server.removing.discard(name)
            server.metrics.tasks.set(len(generator.tasks))
        log.info("task %s removed", name)
        return AdminResponse(task=name, action="removed", tasks=list(generator.tasks))


def _put(queue: asyncio.Queue, index: int) -> Callable[[Event], None]:
    return lambda event: queue.put_nowait((index, event))


def encode_prompts(generator: DecodingBackend, body: _Request) -> list[list[int]]:
    """The token ids of each prompt: chat messages through the chat template, completion prompts as they are (user text as data)."""
    if isinstance(body, ChatRequest):
        if not generator.tokenizer.chat_template:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions with a prompt")
        try:
            return [generator.tokenizer.chat_ids([message_text(m) for m in body.messages])]
        except MetaTTError as e:
            raise ApiError(400, f"the messages do not fit the chat template: {e}") from None
    assert isinstance(body, CompletionRequest)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or any(not p for p in prompts):
        raise ApiError(400, "prompt: give a non-empty text (or a list of them)")
    try:  # as `generate --raw` encodes them: special-token strings in a prompt are text, never control tokens
        return [generator.encode(p, raw=True) for p in prompts]
    except MetaTTError as e:
        raise ApiError(400, f"prompt: {e}") from None


class Answer:
    """The events of a request's sequences, turned into OpenAI's response (``collect``) or its chunks (``sse``)."""

    def __init__(self, kind: str, model: str, choices: list[Choice], queue: asyncio.Queue):
        self.kind = kind
        self.model = model
        self.choices = choices
        self.queue = queue
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self) -> dict[str, int]:
        prompt = sum(len(c.seq.prompt) for c in self.choices)
        completion = sum(c.seq.generated for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def cancel(self) -> None:
        for c in self.choices:
            c.seq.cancelled = True

    async def events(self) -> AsyncIterator[tuple[Choice, Step]]:
        """Each choice's steps as they come, until every choice has finished; an engine error ends it."""
        while any(c.finish_reason is None for c in self.choices):
            index, event = await self.queue.get()
            if isinstance(event, Exception):
                raise event
            choice = self.choices[index]
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
            yield choice, event

    async def collect(self, request: Request) -> tuple[int, dict]:
        """The whole answer; a client that disconnects meanwhile cancels its sequences (freed at the next step)."""

        async def gather() -> None:
            async for choice, step in self.events():
                choice.text += step.text

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(disconnected(request))
        done: set[asyncio.Future] = set()
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                self.cancel()
                work.cancel()
        if work not in done:
            return 499, {}  # nobody is listening; the status is for the log and the metrics
        error = work.exception()
        if isinstance(error, Closed):
            raise ApiError(503, f"{error}; retry", {"Retry-After": "1"})
        if error is not None:
            raise error
        return 200, {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self.final(c) for c in self.choices],
            "usage": self.usage(),
        }

    def final(self, c: Choice) -> dict[str, Any]:
        if self.kind == "chat":
            return {
                "index": c.seq.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
        return {"index": c.seq.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}

    def chunk(self, c: Choice, text: str | None, finish_reason: str | None, usage: dict | None = None) -> str:
        if self.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if text == "" and finish_reason is None:
                delta = {"role": "assistant", "content": ""}
            choice: dict[str, Any] = {"index": c.seq.index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": c.seq.index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def sse(self, request: Request, server: LLMServer) -> AsyncIterator[str]:
        """Server-sent events: a role chunk (chat), a chunk per piece of text, the finishing chunk (with usage), ``data: [DONE]``.

        Starlette cancels this generator when the client disconnects; the ``finally`` then cancels
        the sequences, which leave the batch at the next step.
        """
        try:
            if self.kind == "chat":
                for c in self.choices:
                    yield self.chunk(c, "", None)
            async for choice, step in self.events():
                if step.finish_reason is None:
                    if step.text:
                        yield self.chunk(choice, step.text, None)
                    continue
                if step.text:
                    yield self.chunk(choice, step.text, None)
                last = all(c.finish_reason is not None for c in self.choices)
                yield self.chunk(choice, None, step.finish_reason, self.usage() if last else None)
            yield "data: [DONE]\n\n"
        except Exception as e:  # headers are sent: say it in the stream, in OpenAI's error shape
            log.error("a stream ended with an error", exc_info=e)
            message = str(e) if isinstance(e, Closed) else f"internal error ({type(e).__name__}); the server log has the details"
            yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
        finally:
            self.cancel()


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
