"""`metatt-deploy serve`: the app on uvicorn, in one process or several worker processes.

The model decides the app, once: a decoder export or factored decoder bundle gets the
OpenAI-compatible generation API (openai_app.py), a classifier the classify API (app.py).

uvicorn starts worker processes from an import string, so the options travel to each worker in
one environment variable (JSON) and `app_from_env` builds the app there; every worker loads its
own copy of the model (ONNX Runtime sessions cannot be shared between processes). With several
workers, a Prometheus multiprocess directory is set up so /metrics of any worker reports all.
On SIGTERM/SIGINT uvicorn stops accepting, waits up to ``graceful_s`` for open requests, then
the app drains its queue (see app.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import is_decoder_model
from metatt_deploy.serving.app import create_app
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.http import ServeSettings
from metatt_deploy.serving.metrics import MULTIPROC_ENV
from metatt_deploy.serving.openai_app import LLMSettings, create_openai_app
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


def build_app(config: ServeConfig) -> FastAPI:
    if is_decoder_model(config.model):
        llm = replace(config.llm, admin_token=config.settings.admin_token)
        return create_openai_app(lambda: Generator(config.model, form=config.form, threads=config.threads), llm)
    return create_app(lambda: Runtime(config.model, form=config.form, threads=config.threads), config.settings)


def app_from_env() -> FastAPI:
    """uvicorn's factory in each worker process (the admin token comes from its own variable, never the JSON)."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise MetaTTError(f"{CONFIG_ENV} is not set; start the server with metatt-deploy serve")
    return build_app(ServeConfig.from_json(text))


def serve(
    config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, graceful_s: int = 30, log_level: str = "info"
) -> None:
    """Run uvicorn until SIGTERM/SIGINT (then drain and exit)."""
    import uvicorn

    if not Path(config.model).exists():
        raise MetaTTError(f"model {config.model} not found; pass a factored bundle (merge --factored) or an export (metatt-deploy export)")
    if workers < 1:
        raise MetaTTError("--workers must be at least 1")
    if config.threads is not None and config.threads < 1:
        raise MetaTTError("--threads must be at least 1")
    config.settings.check()
    config.llm.check()
    os.environ[CONFIG_ENV] = config.to_json()
    if config.settings.admin_token:
        os.environ[ADMIN_TOKEN_ENV] = config.settings.admin_token
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="metatt-metrics-")
    uvicorn.run(
        "metatt_deploy.serving.server:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_graceful_shutdown=graceful_s,
        log_level=log_level,
        access_log=False,
    )
