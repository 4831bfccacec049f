"""Validate an ONNX export against its UNMERGED adapter: parity, agreement, accuracy, latency.

The reference is the PyTorch model exactly as trained (base + adapter, not merged), so one
check covers merging and exporting together. The adapter is a single-task MetaTT adapter, a
multi-task one (the export's task, or ``task``, through the multi-task model's own task routing:
`TaskView`), or a PEFT LoRA run's best/ (``peft.PeftModel``, unmerged). On held-out inputs
(every example of a file or split unless ``max_examples`` asks for a random subset, which the
console and the report then state) it reports:

- provenance first: the export's manifest must record this adapter's weights sha256 (and its
  architecture and task), or validation fails before any work;
- max |logit diff| ONNX vs PyTorch, enforced at 1e-4 for fp32 exports (plain or optimised), at
  1e-2 x max(1, max |logit|) for fp16 exports, reported only for int8 exports; NaN/Inf fails;
- the same difference relative to the adapter's own effect (|logits(adapter) - logits(base)|),
  failing an enforced variant that is closer to the base than to the adapter;
- agreement of the predicted labels, and the accuracy of each model when labels are present;
- with ``reference_onnx`` (the fp32 export of the same model): accuracy change and label
  agreement of this export vs the reference, and its speed-up;
- latency p50/p95 on fixed-shape batches for PyTorch eager and ONNX Runtime (CPU execution
  provider, plus CUDA when onnxruntime offers it), timed round-robin so machine load hits every
  runtime alike.

Results go NEXT TO the export bundle, ``exported/NAME.validation.json`` and ``.md`` (or to
``validation.json`` and ``validation.md`` in ``output``): the bundle itself keeps exactly the
files its manifest lists. A parity failure is written to the report first, then raised.
The reference and the provenance check are in reference.py, the held-out data reader in
held_out.py, the parity figures in parity.py, the timing in common/timing.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.adapters.lora import is_lora_adapter
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_json, atomic_write_text, check_separate, check_writable
from metatt_deploy.common.report import progress_bar
from metatt_deploy.common.timing import summarize, time_round_robin
from metatt_deploy.export.held_out import HeldOut, load_held_out
from metatt_deploy.export.onnx_classifier import FP16_RTOL, FP32_ATOL, model_max_tokens
from metatt_deploy.export.onnx_files import library_versions
from metatt_deploy.export.parity import max_abs_diff, parity_figures
from metatt_deploy.export.reference import Reference, adapter_disabled, check_provenance, load_reference, torch_threads
from metatt_deploy.inference.formats import ONNX_NAME, read_manifest
from metatt_deploy.inference.sessions import available_providers, make_session, onnx_feeds

REPORT_JSON = "validation.json"
REPORT_MD = "validation.md"
EVAL_BATCH = 16


# ---------------------------------------------------------------- validation


def validate_classifier(
    adapter_dir: str | Path,
    onnx_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    max_examples: int | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    seq_len: int = 128,
    repeats: int = 30,
    warmup: int = 3,
    max_seconds: float | None = 60.0,
    threads: int | None = None,
    reference_onnx: str | Path | None = None,
    base_model: str | None = None,
    task: str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    output: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Compare the ONNX export in ``onnx_dir`` with the unmerged adapter; write and return the report.

    ``data``: a builtin task name (e.g. movie-sentiment), a Hub data set, a CSV/TSV/JSONL/JSON
    file (labels optional), or None for built-in sample sentences; all of it unless
    ``max_examples`` asks for a random subset. ``adapter_dir``: a MetaTT adapter (``task`` picks
    the task of a multi-task one; default: the export's) or a LoRA run's best/. ``threads`` sets
    PyTorch's and ONNX Runtime's intra-op threads alike (default: each library's own default).
    ``max_seconds`` caps the timed seconds per runtime and batch size (at least 3 calls are
    always timed). ``log`` receives one-line notes for the console (the data used).
    """

    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    reference_manifest = read_manifest(reference_onnx) if reference_onnx is not None else None
    _check_timing(batch_sizes, seq_len, repeats, warmup)
    json_path, md_path = report_paths(onnx_dir, output)
    if output is not None:
        check_separate(output, [adapter_dir])
    for path in (json_path, md_path):
        check_writable(path, force)

    if not is_lora_adapter(adapter_dir):  # which task, before whose export: "serves several tasks; pass --task"
        MetaTTConfig.load(adapter_dir).task_index(task or manifest.get("task"))
    check_provenance(manifest, adapter_dir, onnx_dir, task)
    reference = load_reference(adapter_dir, task or manifest.get("task"), base_model)
    if manifest.get("model_type") not in (None, reference.model_type):
        raise MetaTTError(f"export {onnx_dir} is a {manifest.get('model_type')} model, the adapter a {reference.model_type} one")
    held = load_held_out(
        data, split=split, max_examples=max_examples, model_labels=reference.labels, text_columns=text_columns, label_column=label_column
    )
    if log is not None:
        log(f"data: {held.describe()}")
    seq_len = _capped_seq_len(reference, seq_len, log)

    with torch_threads(threads):
        report = _run(
            reference, held, onnx_dir, manifest, reference_onnx, Timing(tuple(batch_sizes), seq_len, repeats, warmup, max_seconds, threads)
        )
    report = {
        "adapter": str(Path(adapter_dir).resolve()),
        "onnx_dir": str(onnx_dir.resolve()),
        "reference_onnx": str(Path(reference_onnx).resolve()) if reference_onnx is not None else None,
        "task": reference.task,
        "method": reference.method,
        "variant": manifest.get("variant", {"dtype": "fp32", "optimize": False, "quantize": None}),
        "reference_variant": (reference_manifest or {}).get("variant") if reference_onnx is not None else None,
        "adapter_matches_manifest": True,  # check_provenance refused anything else
        **report,
        "versions": library_versions(),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, report)
    atomic_write_text(md_path, render_markdown(report))
    parity = report["parity"]
    if not parity["passed"]:
        raise MetaTTError(
            f"ONNX logits differ from the unmerged adapter: {parity['failure']} (report in {md_path}); re-merge and re-export the adapter"
        )
    return report


def _check_timing(batch_sizes: Sequence[int], seq_len: int, repeats: int, warmup: int) -> None:
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise MetaTTError(f"batch sizes {list(batch_sizes)} must be positive integers; pass e.g. --batch-sizes 1,8")
    if seq_len < 2 or repeats < 1 or warmup < 0:
        raise MetaTTError("--seq-len must be at least 2, --repeats at least 1 and --warmup at least 0; fix the option")


def _capped_seq_len(reference: Reference, seq_len: int, log: Callable[[str], None] | None) -> int:
    """``seq_len``, or the model's own length where that is shorter: a longer input would index past the position table."""
    longest = model_max_tokens(reference.model.config.to_dict(), reference.tokenizer)
    if longest is None or seq_len <= longest:
        return seq_len
    if log is not None:
        log(f"note: --seq-len {seq_len} exceeds the model's {longest} tokens; using {longest}")
    return longest


def report_paths(onnx_dir: str | Path, output: str | Path | None = None) -> tuple[Path, Path]:
    """(json, markdown) report paths: ``output``/validation.json|md, else beside the bundle.

    Beside, not inside: ``exported/NAME.validation.json`` and ``.md``, so the bundle holds
    exactly the files its manifest lists (and hashes).
    """
    return report_path(onnx_dir, output, REPORT_JSON), report_path(onnx_dir, output, REPORT_MD)


def report_path(onnx_dir: str | Path, output: str | Path | None, name: str) -> Path:
    """One report file: ``output``/``name``, else ``NAME.name`` beside the bundle ``NAME`` (see `report_paths`)."""
    if output is not None:
        return Path(output) / name
    bundle = Path(onnx_dir).resolve()
    return bundle.parent / f"{bundle.name}.{name}"


def _tolerance(variant: dict, max_logit: float) -> float | None:
    if variant.get("quantize"):
        return None
    if variant.get("dtype") == "fp16":
        return FP16_RTOL * max(1.0, max_logit)
    return FP32_ATOL


def _encode(tokenizer, held: HeldOut, rows, seq_len: int, fixed: bool) -> dict:
    return dict(
        tokenizer(
            *held.columns(rows),
            padding="max_length" if fixed else True,
            truncation=True,
            max_length=seq_len,
            return_tensors="pt",
        )
    )


@dataclass(frozen=True)
class Timing:
    """How the latency is measured (checked by validate before any work)."""

    batch_sizes: tuple[int, ...]
    seq_len: int
    repeats: int
    warmup: int
    max_seconds: float | None
    threads: int | None


def _run(
    reference: Reference,
    held: HeldOut,
    onnx_dir: Path,
    manifest: dict,
    reference_onnx,
    timing: Timing,
) -> dict:
    """Logits on every held-out example (parity, accuracy), then latency on fixed-shape batches."""
    import torch

    batch_sizes, seq_len, repeats, warmup, max_seconds, threads = dataclasses.astuple(timing)

    cpu = ["CPUExecutionProvider"]
    session = make_session(onnx_dir / ONNX_NAME, cpu, threads)
    ref_session = make_session(Path(reference_onnx) / ONNX_NAME, cpu, threads) if reference_onnx is not None else None
    pt, ox, base, ref = _held_out_logits(reference, held, session, ref_session, seq_len)
    parity, accuracy, versus_reference = _compare(pt, ox, base, ref, held, manifest.get("variant", {}), reference.description)
    runtimes = _runtimes(reference.model, session, ref_session, onnx_dir, reference_onnx)
    results, speedups = _latency(runtimes, reference.tokenizer, held, batch_sizes, seq_len, repeats, warmup, max_seconds)
    n = len(held.texts)
    return {
        "data": {
            "source": held.source,
            "split": held.split,
            "examples": n,
            "available": held.total,
            "subset": held.subset,
            "labelled": held.labels is not None,
            "max_length": seq_len,
        },
        "parity": parity,
        "accuracy": accuracy,
        "versus_reference": versus_reference,
        "latency": {
            "settings": {
                "warmup": warmup,
                "repeats": repeats,
                "max_seconds": max_seconds,
                "seq_len": seq_len,
                "batch_sizes": list(batch_sizes),
                "threads": threads or "library default",
                "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "timing": "round-robin, medians (p50) and p95 of single calls",
            },
            "results": results,
            "speedups": speedups,
        },
    }


def _held_out_logits(reference: Reference, held: HeldOut, session, ref_session, seq_len: int):
    """(adapter, export, base model, reference export or None) logits, in batches padded to their longest member."""
    import torch

    model, tokenizer = reference.model, reference.tokenizer
    pt_logits, onnx_logits, ref_logits, base_logits = [], [], [], []
    n = len(held.texts)
    progress = progress_bar(math.ceil(n / EVAL_BATCH), 0, "validate: logits", unit="batches")
    for start in range(0, n, EVAL_BATCH):
        enc = _encode(tokenizer, held, slice(start, start + EVAL_BATCH), seq_len, fixed=False)
        with torch.no_grad():
            pt_logits.append(model(**enc).logits.float().numpy())
            with adapter_disabled(model):
                base_logits.append(model(**enc).logits.float().numpy())
        onnx_logits.append(session.run(["logits"], onnx_feeds(session, enc))[0].astype(np.float32))
        if ref_session is not None:
            ref_logits.append(ref_session.run(["logits"], onnx_feeds(ref_session, enc))[0].astype(np.float32))
        progress.update(1)
    progress.close()
    pt, ox, base = np.concatenate(pt_logits), np.concatenate(onnx_logits), np.concatenate(base_logits)
    if pt.shape != ox.shape:
        raise MetaTTError(
            f"the export gives logits of shape {ox.shape[1:]}, the adapter {pt.shape[1:]}; validate the export of this adapter"
        )
    return pt, ox, base, np.concatenate(ref_logits) if ref_logits else None


def _compare(pt: np.ndarray, ox: np.ndarray, base: np.ndarray, ref: np.ndarray | None, held: HeldOut, variant: dict, description: str):
    """Parity with the adapter, accuracy where there are labels, and agreement with the reference export."""
    parity = parity_figures(pt, ox, base, _tolerance(variant, float(np.abs(pt).max())))
    parity["reference"] = f"PyTorch eager, {description}, float32, CPU"
    accuracy = None
    if held.labels is not None:
        labels = np.asarray(held.labels)
        accuracy = {"pytorch": float((pt.argmax(-1) == labels).mean()), "onnx": float((ox.argmax(-1) == labels).mean())}
        if ref is not None:
            accuracy["reference_onnx"] = float((ref.argmax(-1) == labels).mean())
            accuracy["change_vs_reference_points"] = round(100 * (accuracy["onnx"] - accuracy["reference_onnx"]), 3)
    versus_reference = None
    if ref is not None:
        versus_reference = {
            "label_agreement": float((ref.argmax(-1) == ox.argmax(-1)).mean()),
            "max_abs_logit_diff": max_abs_diff([ox], [ref]),
        }
    return parity, accuracy, versus_reference


def _runtimes(model, session, ref_session, onnx_dir: Path, reference_onnx) -> list[tuple[str, str, Callable[[dict], Callable[[], Any]]]]:
    """(runtime, provider, inputs -> a timed call) of everything latency compares: PyTorch and ONNX Runtime, CPU and CUDA."""
    import torch

    runtimes: list[tuple[str, str, Callable[[dict], Callable[[], Any]]]] = []

    def torch_runner(m):
        def bind(enc):
            def call():
                with torch.no_grad():
                    m(**enc)

            return call

        return bind

    def ort_runner(s):
        return lambda enc: (lambda feeds: lambda: s.run(["logits"], feeds))(onnx_feeds(s, enc))

    runtimes.append(("pytorch eager (adapter unmerged)", "cpu", torch_runner(model)))
    runtimes.append(("onnxruntime (this export)", "CPUExecutionProvider", ort_runner(session)))
    if ref_session is not None:
        runtimes.append(("onnxruntime (reference export)", "CPUExecutionProvider", ort_runner(ref_session)))
    if "CUDAExecutionProvider" in available_providers():
        gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        runtimes.append(("onnxruntime (this export)", "CUDAExecutionProvider", ort_runner(make_session(onnx_dir / ONNX_NAME, gpu))))
        if reference_onnx is not None:
            runtimes.append(
                ("onnxruntime (reference export)", "CUDAExecutionProvider", ort_runner(make_session(Path(reference_onnx) / ONNX_NAME, gpu)))
            )
    if torch.cuda.is_available():
        import copy

        cuda_model = copy.deepcopy(model).cuda()

        def cuda_bind(enc):
            enc = {k: v.cuda() for k, v in enc.items()}

            def call():
                with torch.no_grad():
                    cuda_model(**enc)
                torch.cuda.synchronize()

            return call

        runtimes.append(("pytorch eager (adapter unmerged)", "cuda", cuda_bind))
    return runtimes


def _latency(runtimes, tokenizer, held: HeldOut, batch_sizes, seq_len: int, repeats: int, warmup: int, max_seconds) -> tuple[list, list]:
    """Latency on fixed-shape batches (seq_len tokens, padded), the same inputs for every runtime; and the speed-ups."""
    n = len(held.texts)
    results, speedups = [], []
    progress = progress_bar(len(batch_sizes), 0, "validate: latency", unit="batch sizes")
    for batch in batch_sizes:
        rows = [i % n for i in range(batch)]
        enc = _encode(tokenizer, held, rows, seq_len, fixed=True)
        fns = {(name, provider): bind(enc) for name, provider, bind in runtimes}
        times = time_round_robin(fns, warmup=warmup, repeats=repeats, max_seconds=max_seconds)
        p50 = {}
        for (name, provider), t in times.items():
            stats = summarize(t)
            p50[(name, provider)] = stats["p50_ms"]
            results.append({"runtime": name, "provider": provider, "batch": batch, "seq_len": seq_len, **stats})
        torch_p50 = p50[("pytorch eager (adapter unmerged)", "cpu")]
        for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            this = p50.get(("onnxruntime (this export)", provider))
            if this is None:
                continue
            entry = {"batch": batch, "seq_len": seq_len, "provider": provider, "onnx_vs_pytorch_cpu": round(torch_p50 / this, 3)}
            reference_p50 = p50.get(("onnxruntime (reference export)", provider))
            if reference_p50 is not None:
                entry["onnx_vs_reference"] = round(reference_p50 / this, 3)
            speedups.append(entry)
        progress.update(1)
    progress.close()
    return results, speedups


# ---------------------------------------------------------------- report


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}g}"
    return str(value)


def render_markdown(report: dict) -> str:
    p, v = report["parity"], report["variant"]
    variant = ", ".join(filter(None, [v.get("dtype", "fp32"), "optimised" if v.get("optimize") else None, v.get("quantize")]))
    lines = [
        "# ONNX validation",
        "",
        f"- adapter: `{report['adapter']}` (task `{report['task']}`)",
        f"- ONNX export: `{report['onnx_dir']}` ({variant})",
        f"- data: {report['data']['source']}"
        + (f", split `{report['data']['split']}`" if report["data"]["split"] else "")
        + (
            f", a random {report['data']['examples']} of {report['data']['available']} examples (--max-examples)"
            if report["data"].get("subset")
            else f", all {report['data']['examples']} examples"
        )
        + f", max {report['data']['max_length']} tokens",
    ]
    if report.get("reference_onnx"):
        lines.append(f"- reference export: `{report['reference_onnx']}`")
    lines += [
        "",
        f"## Parity (ONNX vs PyTorch, {report['method'] if report['method'] == 'lora' else 'MetaTT'} adapter unmerged)",
        "",
        "| check | value |",
        "|---|---|",
        f"| max abs logit diff | {_fmt(p['max_abs_logit_diff'])} |",
        f"| adapter's own effect (max abs logit change vs base) | {_fmt(p.get('adapter_effect_max_abs'))} |",
        f"| diff relative to the adapter's effect | {_fmt(p.get('relative_to_adapter_effect'))} |",
        f"| tolerance | {_fmt(p['tolerance']) if p['enforced'] else 'reported only (int8)'} |",
        f"| passed | {_fmt(p['passed'])} |",
        f"| predicted-label agreement | {_fmt(p['label_agreement'])} |",
    ]
    acc = report.get("accuracy")
    if acc:
        lines += [f"| accuracy, PyTorch | {_fmt(acc['pytorch'])} |", f"| accuracy, ONNX | {_fmt(acc['onnx'])} |"]
        if "reference_onnx" in acc:
            lines += [
                f"| accuracy, reference export | {_fmt(acc['reference_onnx'])} |",
                f"| accuracy change vs reference (points) | {_fmt(acc['change_vs_reference_points'])} |",
            ]
    if report.get("versus_reference"):
        lines.append(f"| label agreement with reference export | {_fmt(report['versus_reference']['label_agreement'])} |")
    lat = report["latency"]
    lines += [
        "",
        "## Latency",
        "",
        f"Fixed-shape batches of {lat['settings']['seq_len']} tokens; {lat['settings']['warmup']} warm-up calls, "
        f"up to {lat['settings']['repeats']} timed calls per runtime (capped at {lat['settings']['max_seconds']} s), "
        f"in interleaved blocks; threads: {lat['settings']['threads']}.",
        "",
        "| runtime | device | batch | p50 ms | p95 ms |",
        "|---|---|---:|---:|---:|",
    ]
    for r in lat["results"]:
        lines.append(f"| {r['runtime']} | {r['provider']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} |")
    if lat["speedups"]:
        lines += ["", "| batch | provider | ONNX vs PyTorch eager (CPU) | vs reference export |", "|---:|---|---:|---:|"]
        for s in lat["speedups"]:
            lines.append(
                f"| {s['batch']} | {s['provider']} | {s['onnx_vs_pytorch_cpu']:.2f}x | "
                + (f"{s['onnx_vs_reference']:.2f}x" if "onnx_vs_reference" in s else "n/a")
                + " |"
            )
    return "\n".join(lines) + "\n"


def summary_lines(report: dict, markdown: Path) -> list[str]:
    """The lines a person reads after validating a classifier: parity, accuracy, speed-ups, where the report is."""
    parity = report["parity"]
    tolerance = f"tolerance {parity['tolerance']:.0e}" if parity["enforced"] else "reported only"
    lines = [
        f"max |logit diff| ONNX vs unmerged adapter {parity['max_abs_logit_diff']:.2e} ({tolerance}); "
        f"label agreement {parity['label_agreement']:.4f}"
    ]
    if report["accuracy"]:
        acc = report["accuracy"]
        line = f"accuracy: PyTorch {acc['pytorch']:.4f}, ONNX {acc['onnx']:.4f}"
        if "reference_onnx" in acc:
            line += f", reference {acc['reference_onnx']:.4f} ({acc['change_vs_reference_points']:+.2f} points)"
        lines.append(line)
    for s in report["latency"]["speedups"]:
        extra = f", {s['onnx_vs_reference']:.2f}x vs reference" if "onnx_vs_reference" in s else ""
        lines.append(f"batch {s['batch']}: ONNX ({s['provider']}) {s['onnx_vs_pytorch_cpu']:.2f}x vs PyTorch eager{extra}")
    return [*lines, f"report: {markdown}"]
