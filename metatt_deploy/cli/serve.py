"""`metatt-deploy serve`: an export behind HTTP (FastAPI + uvicorn, or Ray Serve replicas).

Its own module so that predict and generate never import the HTTP stack; needs only the base install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metatt_deploy.cli.base import CONTEXT_SETTINGS, user_errors, verb_app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.serving.http import ServeSettings
from metatt_deploy.serving.openai_app import LLMSettings
from metatt_deploy.serving.ray_app import run as run_ray
from metatt_deploy.serving.server import ADMIN_TOKEN_ENV, ServeConfig, read_admin_token
from metatt_deploy.serving.server import serve as run_server

app = verb_app()


@app.command(context_settings=CONTEXT_SETTINGS)
@user_errors
def serve(
    model: Annotated[
        Path,
        typer.Argument(
            help="Factored bundle (merge --factored; every task in it is served) or a single-task export (metatt-deploy export). A decoder's is served with the OpenAI API (docs/serving-llm.md)."
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface, e.g. in a container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes, each with its own copy of the model (scale further with replicas).")] = 1,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads per worker (default: ONNX Runtime's choice).")] = None,
    max_batch: Annotated[int, typer.Option(help="Rows per model call (rows of different tasks share a call).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="The longest a row waits for others to fill its batch.")] = 5.0,
    max_queue: Annotated[
        int | None,
        typer.Option(
            help="Rows (classifier; default 1024) or requests (decoder; default 256) allowed to wait; beyond that 429 with Retry-After."
        ),
    ] = None,
    max_running: Annotated[
        int, typer.Option(help="Decoder: sequences decoding together, one row each in every step's model call.")
    ] = LLMSettings.max_running,
    max_tokens_per_step: Annotated[
        int, typer.Option(help="Decoder: prompt tokens prefilled per step; a longer prompt is prefilled over several steps.")
    ] = LLMSettings.max_tokens_per_step,
    max_texts: Annotated[int, typer.Option(help="Texts per request (413 beyond).")] = 64,
    max_chars: Annotated[int, typer.Option(help="Characters per text (413 beyond).")] = 4096,
    batch_across_tasks: Annotated[
        bool,
        typer.Option("--batch-across-tasks/--batch-per-task", help="Batch rows of different tasks together, or one task per model call."),
    ] = True,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            help=f"File holding the bearer token for /admin (add/remove tasks while running); or set {ADMIN_TOKEN_ENV}. Never on the command line, where ps shows it. Without a token /admin is off."
        ),
    ] = None,
    body_timeout_seconds: Annotated[float, typer.Option(help="A request body must arrive within this (408 beyond).")] = 10.0,
    keep_alive_seconds: Annotated[
        float, typer.Option(help="Close a connection idle for this long, or one that starts no request within it.")
    ] = 5.0,
    docs: Annotated[bool, typer.Option("--docs/--no-docs", help="Serve /docs (Swagger UI; the browser loads it from a CDN).")] = False,
    graceful_seconds: Annotated[
        int, typer.Option(help="On SIGTERM, how long to wait for open requests (a decoder's running sequences) before closing.")
    ] = 30,
    form: Annotated[str, typer.Option(help="auto, tasks or adapter (which factored graph serves the tasks; see predict).")] = "auto",
    ray_replicas: Annotated[
        int,
        typer.Option(
            help="Serve with Ray Serve instead of uvicorn: this many replicas (a classifier batched by Ray, a decoder by each replica's scheduler; needs the 'ray' extra; RAY_ADDRESS joins a cluster)."
        ),
    ] = 0,
) -> None:
    """Serve a model over HTTP: classify texts for any task (docs/serving.md), or generate with a decoder through the OpenAI API
    (docs/serving-llm.md), batching concurrent requests across tasks."""
    settings = ServeSettings(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue or ServeSettings.max_queue,
        max_texts=max_texts,
        max_chars=max_chars,
        body_timeout_s=body_timeout_seconds,
        keep_alive_s=keep_alive_seconds,
        cross_task=batch_across_tasks,
        admin_token=read_admin_token(admin_token_file),
        docs=docs,
    )
    llm = LLMSettings(max_running=max_running, max_tokens_per_step=max_tokens_per_step, max_queue=max_queue or LLMSettings.max_queue)
    if ray_replicas:
        if not model.exists():
            raise MetaTTError(f"model {model} not found; pass a factored bundle (merge --factored) or an export (metatt-deploy export)")
        run_ray(str(model), replicas=ray_replicas, host=host, port=port, settings=settings, threads=threads, form=form, llm=llm)
        return
    config = ServeConfig(model=str(model), settings=settings, threads=threads, form=form, llm=llm)
    run_server(config, host=host, port=port, workers=workers, graceful_s=graceful_seconds)
