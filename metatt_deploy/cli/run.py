"""`metatt-deploy predict` and `generate`: answer with any export, on the runtime floor alone.

These verbs need only the base install (onnxruntime, tokenizers, numpy, jinja2): nothing here, or
below, imports torch, transformers or the HTTP stack (`serve` lives in cli/serve.py).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from metatt_deploy.cli.base import CONTEXT_SETTINGS, Force, check_number, stdin_text, user_errors, verb_app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_text, check_separate, check_writable
from metatt_deploy.serving.genai import GenAIGenerator
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.runtime import Runtime, read_inputs

RUNTIMES = ("onnxruntime", "genai")  # generate --runtime

app = verb_app()


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
    check_number(batch_size, "--batch-size", low=1)
    check_number(max_length, "--max-length", low=2)
    check_number(threads, "--threads", low=1)
    if output is not None:
        check_separate(output, [bundle, input_file])
        check_writable(output, force, kind="file")
    stdin = None
    if not text and input_file is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise MetaTTError(
                "give inputs with --text, --input FILE, or on standard input (e.g. cat texts.txt | metatt-deploy predict ...)"
            )
        stdin = io.StringIO(stdin_text())
    elif input_file is not None and str(input_file) == "-":  # --input -: standard input, checked as UTF-8 here too
        input_file, stdin = None, io.StringIO(stdin_text())
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
        prompts = [line for line in stdin_text().splitlines() if line.strip()]
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
