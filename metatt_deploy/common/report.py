"""Results people compare, written as files a person can open: markdown tables and PNG plots."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from metatt_deploy.common.files import atomic_write_bytes, atomic_write_text  # noqa: E402

LINE_INTERVAL_S = 30.0  # off a terminal: at most one progress line per this many seconds


class Progress:
    """Progress of a long loop that keeps logs one event per line.

    On a terminal (stderr a TTY) it is a tqdm bar that redraws in place. Anywhere else (a file,
    a pipe, CI, nohup, accelerate launch) a bar's carriage returns would glue redraws and log
    lines together, so it prints plain whole lines instead: one at the start, one at most every
    ``LINE_INTERVAL_S`` seconds, one at the end. ``write`` prints a log line (to stdout) between
    redraws, so an epoch summary never lands on the bar's line. A disabled progress (not the
    main process) prints nothing, ``write`` included.
    """

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True, unit: str = "it"):
        self.total, self.n, self.desc, self.unit, self.enabled = total, initial, desc, unit, enabled
        self.postfix: dict[str, object] = {}
        self.interactive = sys.stderr.isatty()
        self._bar = None
        if enabled and self.interactive:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=0.1, maxinterval=10.0, dynamic_ncols=True)
        self._start = self._last = time.monotonic()
        self._printed_n: int | None = None
        if enabled and self._bar is None:
            self._line()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= LINE_INTERVAL_S:
            self._line()

    def set_postfix(self, refresh: bool = False, **values: object) -> None:
        """Values shown after the count (loss, epoch, ...); they ride along with the next redraw."""
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(refresh=refresh, **values)

    def write(self, message: str) -> None:
        """A log line on stdout, never glued to the progress display."""
        if not self.enabled:
            return
        if self._bar is not None:
            tqdm.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._printed_n != self.n:
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self._start
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{percent}, {elapsed:.0f} s{extra}", file=sys.stderr, flush=True)
        self._last = time.monotonic()
        self._printed_n = self.n


def progress_bar(total: int, initial: int, desc: str, enabled: bool = True, unit: str = "it") -> Progress:
    """A `Progress` for training and validation loops (a bar on a terminal, whole lines elsewhere)."""
    return Progress(total, initial, desc, enabled, unit)


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4f") -> str:
    """A GitHub markdown table of ``rows`` (dicts), numbers formatted with ``floatfmt``."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v) -> str:
        return format(v, floatfmt) if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig, path: str | Path) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# per-epoch fields of a run's history that describe the training, not the validation metrics
NOT_VALIDATION = ("epoch", "step", "trainable", "ranks", "grad_norm_mean", "clipped_share")


def write_training_report(run: Path, result: dict) -> None:
    """metrics.md (per-epoch table, best, test) and curves.png (validation metrics per epoch)."""
    history = result["history"]
    text = [f"# {result['method']} on {result['task']}\n", f"model: `{result['model']}`\n"]
    counts = result["trainable_parameters"]
    text.append(f"trainable parameters: {counts['adapter']:,} adapter + {counts['head']:,} head\n")
    if result.get("step_time_median_s"):
        text.append(f"median step time: {result['step_time_median_s'] * 1000:.1f} ms\n")
    text.append("\n## Validation per epoch\n\n" + markdown_table(history))
    if "test" in result:
        text.append("\n## Test (best epoch's adapter)\n\n" + markdown_table([result["test"]]))
    atomic_write_text(run / "metrics.md", "\n".join(text))
    if history:
        fig, ax = plt.subplots(figsize=(6, 4))
        metrics = [k for k in history[0] if k not in NOT_VALIDATION]
        for k in metrics:
            ax.plot([h["epoch"] for h in history], [h[k] for h in history], marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation")
        ax.set_title(f"{result['method']} on {result['task']}")
        ax.legend()
        ax.grid(alpha=0.3)
        save_figure(fig, run / "curves.png")
