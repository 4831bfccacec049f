"""Results people compare, written as files a person can open: markdown tables and PNG plots."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from metatt_deploy.common.files import atomic_write_bytes, atomic_write_text  # noqa: E402


def progress_bar(total: int, initial: int, desc: str, enabled: bool = True) -> tqdm:
    """A training progress bar that keeps logs readable.

    On a terminal it redraws often; when stderr is a file or pipe (CI, nohup, accelerate
    launch) every redraw is a new line in the log, so it redraws at most every 30 seconds.
    Callers update the postfix with ``refresh=False`` so it rides along with those redraws.
    """
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        mininterval=0.1 if interactive else 30.0,
        maxinterval=10.0 if interactive else 60.0,
        dynamic_ncols=interactive,
    )


def close_progress_bars() -> None:
    """Close every open progress bar, so a message printed next starts on its own line.

    A run that stops with an error (a diverged loss) leaves its bar open mid-line otherwise,
    and the one-line error would be glued to the end of the bar.
    """
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


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
        metrics = [k for k in history[0] if k not in ("epoch", "step", "trainable")]
        for k in metrics:
            ax.plot([h["epoch"] for h in history], [h[k] for h in history], marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation")
        ax.set_title(f"{result['method']} on {result['task']}")
        ax.legend()
        ax.grid(alpha=0.3)
        save_figure(fig, run / "curves.png")
