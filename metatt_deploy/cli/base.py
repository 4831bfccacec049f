"""What every verb shares: the one-line error contract, option parsing helpers, the --force option.

Nothing here imports the training stack, so the runtime verbs (predict, generate, serve) start
as fast as ONNX Runtime does; the training verbs load theirs in their own modules.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from metatt_deploy.common.errors import MetaTTError

# Help is click's plain formatter, wrapped to the terminal (or HELP_WIDTH columns when stdout is
# not a terminal): it wraps long option names, defaults and syntax instead of cutting them with
# an ellipsis as rich's tables do in narrow columns, so --help is complete in any terminal or pipe.
HELP_WIDTH = 120
CONTEXT_SETTINGS: dict[str, Any] = {"max_content_width": HELP_WIDTH, "terminal_width": None if sys.stdout.isatty() else HELP_WIDTH}
TRAIN_EXTRA_HINT = "pip install 'metatt-deploy[train]'"

Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
F = TypeVar("F", bound=Callable[..., Any])


def verb_app() -> typer.Typer:
    """The Typer app a verb module registers its verbs on (`metatt_deploy.cli` picks them up by name)."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def close_progress_bars() -> None:
    """Close every open tqdm bar, so the error printed next starts on its own line.

    A run that stops with an error (a diverged loss) leaves its bar open mid-line otherwise. Only
    an imported tqdm can have bars open, so this never imports it.
    """
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", [])):
        bar.close()


def user_errors(fn: F) -> F:
    """Turn MetaTTError into a one-line message and exit status 2 (anything else is a bug and keeps its traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            return fn(*args, **kwargs)
        except MetaTTError as e:
            close_progress_bars()
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def stdin_text() -> str:
    """Standard input as text, refused in one line when it is not UTF-8 (a bare read would end in a traceback)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MetaTTError(f"standard input is not UTF-8 text (byte {e.start}); send UTF-8") from None


def split_list(values: list[str] | None) -> list[str] | None:
    """Accept both repeated options and comma-separated lists."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def int_list(value: str, option: str, example: str) -> list[int]:
    """Comma-separated integers of an option such as --batch-sizes (one line naming the option otherwise)."""
    try:
        return [int(n) for n in split_list([value]) or []]
    except ValueError:
        raise MetaTTError(f"{option} '{value}' must be comma-separated integers, e.g. {example}") from None


def check_number(value: float | int | None, option: str, *, low: float | None = None, high: float | None = None) -> None:
    """A numeric option must be finite and in range (NaN compares false with everything, so it is caught first)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise MetaTTError(f"{option} must be a finite number, got {value}")
    if low is not None and value < low:
        raise MetaTTError(f"{option} must be at least {low:g}, got {value:g}")
    if high is not None and value > high:
        raise MetaTTError(f"{option} must be at most {high:g}, got {value:g}")
