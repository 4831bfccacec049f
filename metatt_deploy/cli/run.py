"""`metatt-deploy predict`, `generate` and `serve`: answer with any export, on the runtime floor alone.

These verbs need only the base install (onnxruntime, tokenizers, numpy, jinja2 and the server
stack): nothing here, or below, imports torch or transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from metatt_deploy.cli.base import CONTEXT_SETTINGS, Force, user_errors
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_text, check_separate, check_writable
from metatt_deploy.inference.formats import is_decoder_model
from metatt_deploy.serving.genai import GenAIGenerator
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.http import ServeSettings
from metatt_deploy.serving.openai_app import LLMSettings
from metatt_deploy.serving.ray_app import run as run_ray
from metatt_deploy.serving.runtime import Runtime, read_inputs
from metatt_deploy.serving.server import ADMIN_TOKEN_ENV, ServeConfig
from metatt_deploy.serving.server import serve as run_server

RUNTIMES = ("onnxruntime", "genai")  # generate --runtime

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(context_settings=CONTEXT_SETTINGS)
@user_errors
def predict(
    bundle: Annotated[
        Path,
        typer.Argument(
            help="Any export: a single-task ONNX export (metatt-deploy export: exported/NAME) or a factored bundle (merge --factored)."
        ),
    ],
    text: Annotated[
        list[str] | None, typer.Option("--text", help="Input text (repeatable). A sentence pair: join the two with ' ||| '.")
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help="Input file ('-': standard input). JSONL (a .jsonl/.json file, or lines starting with '{'): one object per line with 'text' (and 'text_pair') or the task's own columns (premise/hypothesis, sentence1/sentence2, ...), optional 'task' and 'id'. Otherwise one text per line. Without --text and --input, texts are read from standard input.",
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Task for every input (default: the export's only task; rows of a JSONL file may name their own 'task')."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the JSONL results here (default: standard output).")] = None,
    form: Annotated[
        str, typer.Option(help="Factored bundles: auto (task-id graph for baked tasks, adapter graph for added ones), tasks or adapter.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Rows per ONNX Runtime call.")] = 32,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per input (longer inputs are truncated); default: the bundle's, else 128 as in training.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads (default: every available CPU).")] = None,
    force: Force = False,
) -> None:
    """Predict labels with any export: one JSON line per input (task, label, label_id, score, scores)."""
    if batch_size < 1:
        raise MetaTTError("--batch-size must be at least 1")
    if max_length is not None and max_length < 2:
        raise MetaTTError("--max-length must be at least 2")
    if output is not None:
        check_separate(output, [bundle, input_file])
        check_writable(output, force, kind="file")
    stdin = None
    if not text and input_file is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise MetaTTError(
                "give inputs with --text, --input FILE, or on standard input (e.g. cat texts.txt | metatt-deploy predict ...)"
            )
        stdin = sys.stdin
    runtime = Runtime(bundle, form=form, threads=threads, max_length=max_length)
    default_task = task or (runtime.tasks[0] if len(runtime.tasks) == 1 else None)
    texts, tasks, ids = read_inputs(text, input_file, default_task, stdin=stdin)
    results = runtime.predict(texts, tasks=tasks, batch_size=batch_size)
    lines = "".join(json.dumps({**({"id": i} if i is not None else {}), **r}) + "\n" for i, r in zip(ids, results))
    if output is None:
        typer.echo(lines, nl=False)
        return

    check_writable(output, force, kind="file")
    atomic_write_text(output, lines)
    typer.echo(f"wrote {len(results)} predictions to {output}", err=True)


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
    max_running: Annotated[int, typer.Option(help="Decoder: sequences decoding together, one row each in every step's model call.")] = 16,
    max_tokens_per_step: Annotated[
        int, typer.Option(help="Decoder: prompt tokens prefilled per step; a longer prompt is prefilled over several steps.")
    ] = 128,
    max_texts: Annotated[int, typer.Option(help="Texts per request (413 beyond).")] = 64,
    max_chars: Annotated[int, typer.Option(help="Characters per text (413 beyond).")] = 4096,
    batch_across_tasks: Annotated[
        bool,
        typer.Option("--batch-across-tasks/--batch-per-task", help="Batch rows of different tasks together, or one task per model call."),
    ] = True,
    admin_token: Annotated[
        str | None,
        typer.Option(envvar=ADMIN_TOKEN_ENV, help="Bearer token for /admin (add/remove tasks while running); without it /admin is off."),
    ] = None,
    graceful_seconds: Annotated[
        int, typer.Option(help="On SIGTERM, how long to wait for open requests (a decoder's running sequences) before closing.")
    ] = 30,
    form: Annotated[str, typer.Option(help="auto, tasks or adapter (which factored graph serves the tasks; see predict).")] = "auto",
    ray_replicas: Annotated[
        int,
        typer.Option(
            help="Serve with Ray Serve instead of uvicorn: this many replicas, Ray's batching (needs the 'ray' extra; RAY_ADDRESS joins a cluster)."
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
        cross_task=batch_across_tasks,
        admin_token=admin_token,
    )
    if ray_replicas and model.exists() and is_decoder_model(model):
        raise MetaTTError("--ray-replicas serves classifiers; serve a decoder with uvicorn (drop --ray-replicas, scale with --workers)")
    if ray_replicas:
        run_ray(str(model), replicas=ray_replicas, host=host, port=port, settings=settings, threads=threads, form=form)
        return
    llm = LLMSettings(
        max_running=max_running,
        max_tokens_per_step=max_tokens_per_step,
        max_queue=max_queue or LLMSettings.max_queue,
    )
    config = ServeConfig(model=str(model), settings=settings, threads=threads, form=form, llm=llm)
    run_server(config, host=host, port=port, workers=workers, graceful_s=graceful_seconds)


@app.command(context_settings=CONTEXT_SETTINGS)
@user_errors
def generate(
    bundle: Annotated[
        Path,
        typer.Argument(
            help="Decoder bundle written by metatt-deploy export (a causal LM with a KV cache), or a factored bundle of a multi-task causal LM (merge --factored; pick the task with --task)."
        ),
    ],
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts; none (or '-'): one prompt per line of standard input.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens (EOS stops earlier).")] = 128,
    raw: Annotated[bool, typer.Option("--raw", help="Feed prompts as they are, without the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="A system message for the chat template.")] = None,
    temperature: Annotated[float, typer.Option(help="0: greedy (the default); above 0: sampling at this temperature.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sampling: keep the smallest set of tokens whose probability reaches this (1: all).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sampling: keep the k most likely tokens (0: all).")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop before this text (repeatable); it is not printed.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads.")] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Factored bundle: the task (name or index) every prompt is answered with. See docs/multitask-decoders.md."),
    ] = None,
    form: Annotated[
        str,
        typer.Option(
            help="Factored bundle: adapter (model_adapter.onnx + the task's .onnx_adapter) or tasks (model_tasks.onnx, task ids)."
        ),
    ] = "adapter",
    runtime: Annotated[
        str,
        typer.Option(
            help="onnxruntime (the numpy decode loop over ONNX Runtime), or genai: ONNX Runtime GenAI on a factored bundle made ready with export --genai."
        ),
    ] = "onnxruntime",
) -> None:
    """Generate answers from an exported decoder on ONNX Runtime (or ONNX Runtime GenAI), streaming tokens as they come."""
    if not prompts or prompts == ["-"]:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not prompts:
            raise MetaTTError("no prompts: pass them as arguments or one per line on standard input")
    if runtime not in RUNTIMES:
        raise MetaTTError(f"unknown --runtime '{runtime}'; use {' or '.join(RUNTIMES)}")
    if runtime == "genai" and form != "adapter":
        raise MetaTTError("--runtime genai serves model_adapter.onnx (one task per call); drop --form")
    if runtime == "genai" and (top_p != 1.0 or top_k or stop):
        raise MetaTTError("--runtime genai samples with its own settings; drop --top-p, --top-k and --stop")
    generator: Generator | GenAIGenerator
    options: dict[str, Any] = {}
    if runtime == "onnxruntime":
        generator = Generator(bundle, threads=threads, form=form)
        options = {"top_p": top_p, "top_k": top_k, "stop": stop or ()}
    else:
        generator = GenAIGenerator(bundle, threads=threads)
    if task is not None:
        generator.use(task)
    for prompt in prompts:
        for piece in generator.stream(
            prompt, max_new_tokens=max_new_tokens, raw=raw, system=system, temperature=temperature, seed=seed, **options
        ):
            typer.echo(piece, nl=False)
            sys.stdout.flush()
        typer.echo("")
