"""`metatt-deploy serve`: the app on uvicorn, in one process or several worker processes.

The model decides the app, once: `BACKENDS`, keyed by the export's task type
(`inference.formats.model_task_type`), gives a decoder export or factored decoder bundle the
OpenAI-compatible generation API (openai_app.py) and a classifier the classify API (app.py).

Start-up fails fast: every option is checked, the port is bound and the model is loaded and
warmed once before uvicorn starts, so a server that cannot serve (a file or folder that is no
export, an unknown form, a port in use, a host that does not resolve) exits with status 2 and
one ``error:`` line, which an orchestrator shows as a crash loop, instead of running unready
forever. With one worker that loaded model is the one served; with several, each worker process
loads its own copy (ONNX Runtime sessions cannot be shared between processes): uvicorn starts
them from an import string, so the options travel in one environment variable (JSON) and
`app_from_env` builds the app there. A Prometheus multiprocess directory is set up so /metrics
of any worker reports all. On SIGTERM/SIGINT uvicorn stops accepting, waits up to
``graceful_s`` for open requests, then the app drains its queue (see app.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.supervisors import Multiprocess

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import CAUSAL_LM, CLASSIFICATION, model_task_type
from metatt_deploy.serving.app import create_app
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.http import DrainingServer, JsonHttpProtocol, ServeSettings, bind, check_number, log
from metatt_deploy.serving.metrics import MULTIPROC_ENV
from metatt_deploy.serving.openai_app import LLMSettings, OpenAIHttpProtocol, create_openai_app, with_server_settings
from metatt_deploy.serving.runtime import Runtime

CONFIG_ENV = "METATT_SERVE_CONFIG"
ADMIN_TOKEN_ENV = "METATT_ADMIN_TOKEN"


@dataclass
class ServeConfig:
    model: str  # a factored bundle, or a single-task export
    settings: ServeSettings = field(default_factory=ServeSettings)
    threads: int | None = None  # ONNX Runtime intra-op threads per worker
    form: str = "auto"
    llm: LLMSettings = field(default_factory=LLMSettings)  # a decoder's scheduling and limits (its admin token: settings')

    def to_json(self) -> str:
        secretless = {name: {k: v for k, v in asdict(getattr(self, name)).items() if k != "admin_token"} for name in ("settings", "llm")}
        return json.dumps({**asdict(self), **secretless})

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        raw = json.loads(text)
        settings = ServeSettings(**raw.pop("settings"), admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None)
        return cls(settings=settings, llm=LLMSettings(**raw.pop("llm")), **raw)


def load_runtime(config: ServeConfig) -> Runtime:
    """The model, opened and warmed by one row per task (a MetaTTError if it cannot serve); broken task records are logged."""
    runtime = Runtime(config.model, form=config.form, threads=config.threads)
    for task in runtime.tasks:
        runtime.logits(["warm-up"], tasks=[task])
    for name, reason in runtime.skipped.items():
        log.warning("task record %s skipped, serving the other tasks: %s", name, reason)
    return runtime


def load_generator(config: ServeConfig) -> Generator:
    """The decoder, opened (a MetaTTError if it cannot serve); the app's scheduler warms every task before /readyz turns 200."""
    return Generator(config.model, form=config.form, threads=config.threads)


def classifier_app(runtime: Runtime | Callable[[], Runtime], config: ServeConfig) -> FastAPI:
    return create_app(runtime, config.settings)


def decoder_app(generator: Generator | Callable[[], Generator], config: ServeConfig) -> FastAPI:
    """The OpenAI-compatible app, with the server's admin token, /docs setting and body limits."""
    factory = generator if callable(generator) else lambda: generator
    return create_openai_app(factory, with_server_settings(config.llm, config.settings))


@dataclass(frozen=True)
class Backend:
    """How one task type is served: its model, loaded at start-up, and the app over it (or over a function that loads it)."""

    load: Callable[[ServeConfig], Any]
    app: Callable[[Any, ServeConfig], FastAPI]
    http: type[JsonHttpProtocol]  # uvicorn's protocol: its answer to malformed HTTP is in the app's error shape


BACKENDS: dict[str, Backend] = {
    CLASSIFICATION: Backend(load_runtime, classifier_app, JsonHttpProtocol),
    CAUSAL_LM: Backend(load_generator, decoder_app, OpenAIHttpProtocol),
}


def build_app(config: ServeConfig) -> FastAPI:
    """The app for ``config.model``, which it loads in the background (a worker process's start)."""
    backend = BACKENDS[model_task_type(config.model)]
    return backend.app(lambda: backend.load(config), config)


def app_from_env() -> FastAPI:
    """uvicorn's factory in each worker process (the admin token comes from its own variable, never the JSON)."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise MetaTTError(f"{CONFIG_ENV} is not set; start the server with metatt-deploy serve")
    return build_app(ServeConfig.from_json(text))


def uvicorn_config(
    app: Any, settings: ServeSettings, graceful_s: int, log_level: str, http: type[JsonHttpProtocol] = JsonHttpProtocol, **more: Any
) -> uvicorn.Config:
    """uvicorn's settings for a server on a socket bound by `bind`: the JSON-error protocol (``http``: OpenAIHttpProtocol for a
    decoder, whose errors are in OpenAI's shape) and the settings' keep-alive time."""
    return uvicorn.Config(
        app,
        http=http,
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # a float works (loop.call_later)
        timeout_graceful_shutdown=graceful_s,
        log_level=log_level,
        access_log=False,
        **more,
    )


def serve(
    config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, graceful_s: int = 30, log_level: str = "info"
) -> None:
    """Check everything, bind, load the model, then run uvicorn until SIGTERM/SIGINT (then drain and exit)."""
    check_number("--workers", workers, 1, 1024)
    check_number("--graceful-seconds", graceful_s, 0, 86_400)
    if config.threads is not None:
        check_number("--threads", config.threads, 1, 1024)
    config.settings.check()
    config.llm.check()
    if not Path(config.model).exists():
        raise MetaTTError(f"model {config.model} not found; pass a factored bundle (merge --factored) or an export (metatt-deploy export)")
    backend = BACKENDS[model_task_type(config.model)]
    sock = bind(host, port)
    try:
        model = backend.load(config)
        settings = config.settings
        if workers == 1:
            app = backend.app(model, config)
            DrainingServer(uvicorn_config(app, settings, graceful_s, log_level, backend.http)).run(sockets=[sock])
            return
        del model  # each worker loads its own
        os.environ[CONFIG_ENV] = config.to_json()
        if config.settings.admin_token:
            os.environ[ADMIN_TOKEN_ENV] = config.settings.admin_token
        if not os.environ.get(MULTIPROC_ENV):
            os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="metatt-metrics-")
        factory = "metatt_deploy.serving.server:app_from_env"
        Multiprocess(uvicorn_config(factory, settings, graceful_s, log_level, backend.http, factory=True, workers=workers), [sock]).run()
    finally:
        sock.close()


def read_admin_token(path: Path | None) -> str | None:
    """The admin token from ``path`` (one line; a trailing newline is dropped), else from METATT_ADMIN_TOKEN, else None.

    Never from a command-line value: every user of the machine can read a process's arguments
    (ps), while its environment and a file can be kept private (mode 0600, a mounted secret).
    """
    env = os.environ.get(ADMIN_TOKEN_ENV) or None
    if path is None:
        return env
    if env is not None:
        raise MetaTTError(f"the admin token is given twice ({ADMIN_TOKEN_ENV} and --admin-token-file); keep one")
    try:
        return path.read_bytes().decode("utf-8").rstrip("\r\n")
    except OSError as e:
        raise MetaTTError(f"cannot read the admin token file {path} ({e.strerror or e}); check the path") from None
    except UnicodeDecodeError:
        raise MetaTTError(f"the admin token file {path} is not UTF-8 text; write the token as UTF-8") from None
