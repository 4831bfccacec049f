"""The `metatt-deploy` command line: one verb, one function; user errors are one line and exit 2.

Every verb's module is imported when that verb runs (click's lazy-group pattern), so a verb pays
only for what it uses: predict and generate (`cli/run.py`) import ONNX Runtime and tokenizers,
serve (`cli/serve.py`) adds the HTTP stack, and the training verbs (train: `cli/train.py`; merge,
export, validate: `cli/export.py`) need the ``[train]`` extra: without it they print one line
naming it and exit 2.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import typer
from typer._click.exceptions import ClickException, UsageError
from typer.core import TyperGroup

from metatt_deploy import __version__
from metatt_deploy.cli.base import CONTEXT_SETTINGS, TRAIN_EXTRA_HINT, verb_app

# every verb, loaded when it runs: name -> (module, one-line help shown in `metatt-deploy --help`)
VERBS = {
    "train": ("metatt_deploy.cli.train", "Fine-tune a classifier or causal LM with a MetaTT adapter (or a PEFT baseline)."),
    "merge": ("metatt_deploy.cli.export", "Fold the adapter into the base weights, or write PEFT LoRA or a factored bundle."),
    "export": ("metatt_deploy.cli.export", "Export a merged model to ONNX and check its parity."),
    "validate": ("metatt_deploy.cli.export", "Compare an ONNX export with its unmerged adapter: parity, accuracy, latency."),
    "predict": ("metatt_deploy.cli.run", "Predict labels with any classifier export: one JSON line per input."),
    "generate": ("metatt_deploy.cli.run", "Generate answers from a decoder export or bundle, streaming tokens as they come."),
    "serve": ("metatt_deploy.cli.serve", "Serve an export over HTTP, batching requests across tasks."),
}
TRAINING_STACK = ("torch", "transformers", "datasets", "optimum", "peft", "accelerate", "safetensors", "matplotlib", "onnx")


def missing_extra(name: str, error: ImportError) -> Any:
    """A stand-in for a training verb when the training stack is not installed: one line, exit 2, whatever the arguments."""
    stub = verb_app()
    settings = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}

    @stub.command(name=name, context_settings=settings, help=f"{VERBS[name][1]} Needs {TRAIN_EXTRA_HINT}.")
    def refuse(ctx: typer.Context) -> None:
        typer.secho(
            f"error: '{name}' needs the training stack ({error.name or 'torch'} is not installed); {TRAIN_EXTRA_HINT}",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)

    return typer.main.get_command(stub)


class OneLineUsageError(ClickException):
    """A usage error shown the CLI's way: one ``error:`` line, exit 2 (click's own is three lines: usage, hint, error)."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        typer.secho(f"error: {self.format_message()}", fg=typer.colors.RED, err=True)


class LazyVerbs(TyperGroup):
    """The CLI's group: each verb's module is imported on first use.

    (Typer vendors its own click, so the overrides take its context and formatter untyped.)
    """

    def list_commands(self, ctx: Any) -> list[str]:
        return list(VERBS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in VERBS:
            return None
        try:
            module = importlib.import_module(VERBS[cmd_name][0])
        except ImportError as e:
            if (e.name or "").split(".")[0] not in TRAINING_STACK:
                raise
            return missing_extra(cmd_name, e)
        return typer.main.get_group(module.app).get_command(ctx, cmd_name)

    def invoke(self, ctx: Any) -> Any:
        """Run the verb; a value its options cannot parse (``--top-k 1e-9``) is one ``error:`` line and exit 2, as every user error."""
        try:
            return super().invoke(ctx)
        except UsageError as e:
            where = f"; see '{e.ctx.command_path} --help'" if e.ctx is not None else ""
            raise OneLineUsageError(f"{e.format_message().rstrip('.')}{where}") from None

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """The verb list without importing any verb (their one-line help is in VERBS)."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_line) for name, (_, help_line) in VERBS.items()])


app = typer.Typer(
    name="metatt-deploy",
    cls=LazyVerbs,
    help="Fine-tune transformers with MetaTT tensor-train adapters, merge them, export them to ONNX, validate and serve them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=CONTEXT_SETTINGS,
)


def version(value: bool) -> None:
    if value:
        typer.echo(f"metatt-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[bool, typer.Option("--version", callback=version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Fine-tune transformers with MetaTT tensor-train adapters, merge them, export them to ONNX, validate and serve them."""
