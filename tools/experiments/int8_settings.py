#!/usr/bin/env python
"""Which int8 settings to ship: every quantization form of one trained model, side by side -> docs/reports/int8-settings.md.

For a trained single-task adapter (merged, exported plain fp32), the graph is quantized in each
form below, and every form classifies the whole test split twice: one sentence per call
(batch 1, unpadded) and in batches of --batch rows in test order, padded to the longest row
(what a server batching its requests does). Against fp32 at batch 1 each form reports label
agreement, max |logit change|, accuracy and its change; and how many labels change between its
own batch-1 and batched runs (batch composition: dynamic activation scales come from the batch
at hand, static ones are fixed). Then p50 latency of every form at batch 1 (seq 32 and 128,
padded), all forms timed in interleaved blocks in this one process.

Forms: dynamic int8 (``quantize_dynamic``) with weights per channel or per tensor, full or
reduced (7-bit) range; static QDQ int8 (``quantize_static``, per-channel weights) calibrated on
the validation split with MinMax (full and reduced range), Percentile and Entropy, every weight
MatMul in int8; and MinMax with the FFN down-projections kept in fp32 (the shipped default).

    python tools/experiments/int8_settings.py --adapter runs/x/best --data movie-sentiment

The CPU's instruction-set flags are recorded: the right choice of ``reduce_range`` depends on
VNNI (export/quantize.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from metatt_deploy import export_onnx, merge_adapter
from metatt_deploy.adapters.base_model import load_tokenizer
from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.common.timing import summarize, time_round_robin
from metatt_deploy.export.held_out import load_held_out
from metatt_deploy.export.onnx_files import library_versions
from metatt_deploy.export.quantize import (
    TextCalibrationReader,
    cpu_summary,
    load_calibration_rows,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from metatt_deploy.inference.formats import ONNX_NAME
from metatt_deploy.inference.sessions import make_session, onnx_feeds

# name -> (kind, options); kind "dynamic" or "static"
FORMS: dict[str, tuple[str, dict]] = {
    "dynamic, per-channel, full range": ("dynamic", {"per_channel": True, "reduce_range": False}),
    "dynamic, per-channel, reduce_range": ("dynamic", {"per_channel": True, "reduce_range": True}),
    "dynamic, per-tensor, full range": ("dynamic", {"per_channel": False, "reduce_range": False}),
    "dynamic, per-tensor, reduce_range": ("dynamic", {"per_channel": False, "reduce_range": True}),
    "static, MinMax, full range": ("static", {"method": "minmax", "reduce_range": False, "fp32_down_projections": False}),
    "static, MinMax, reduce_range": ("static", {"method": "minmax", "reduce_range": True, "fp32_down_projections": False}),
    "static, Percentile, full range": ("static", {"method": "percentile", "reduce_range": False, "fp32_down_projections": False}),
    "static, Entropy, full range": ("static", {"method": "entropy", "reduce_range": False, "fp32_down_projections": False}),
    "static, MinMax, full range, FFN down-projections fp32": ("static", {"method": "minmax", "reduce_range": False}),
}
FP32 = "fp32 (reference)"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, required=True, help="trained single-task adapter folder (best/)")
    p.add_argument("--data", default="movie-sentiment", help="task: test split judged, validation split calibrates")
    p.add_argument("--batch", type=int, default=64, help="rows per call of the batched run")
    p.add_argument("--calibration-rows", type=int, default=256)
    p.add_argument("--forms", default="all", help="comma-separated indices into the form list (default all)")
    p.add_argument("--seq-lens", default="32,128", help="padded lengths of the batch-1 latency")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--max-seconds", type=float, default=12.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "int8-settings")
    p.add_argument("--reuse", action="store_true", help="reuse the merged model, fp32 export and quantized files")
    p.add_argument("--out-md", type=Path, default=ROOT / "docs" / "reports" / "int8-settings.md")
    p.add_argument("--out-json", type=Path, default=ROOT / "docs" / "reports" / "int8-settings.json")
    return p.parse_args()


def build_forms(args, fp32: Path, tokenizer, inputs: list[str], chosen: dict) -> dict[str, dict]:
    """Quantize fp32 into every chosen form; returns name -> {path, settings, seconds}."""
    rows, source = load_calibration_rows(args.data, max_rows=args.calibration_rows)

    def feeds(batch):
        enc = tokenizer(*[list(c) for c in zip(*batch)], truncation=True, max_length=128, return_tensors="np")
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in inputs}

    out = {}
    for i, (name, (kind, options)) in enumerate(chosen.items()):
        path = args.work_dir / "forms" / f"{i}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        settings_file = path.with_suffix(".json")
        if args.reuse and path.is_file() and settings_file.is_file():
            settings = json.loads(settings_file.read_text())
        elif kind == "dynamic":
            settings = quantize_dynamic_int8(fp32, path, **options)
        else:
            settings = quantize_static_int8(fp32, path, TextCalibrationReader(rows, feeds), **options)
            settings["calibration"]["data"] = source
        settings_file.write_text(json.dumps(settings))
        out[name] = {"path": path, "settings": settings, "seconds": round(time.time() - t0, 1)}
        print(f"  {name}: {out[name]['seconds']}s", flush=True)
    return out


def logits_of(session, tokenizer, held, batch: int) -> np.ndarray:
    """Logits of every held-out row, ``batch`` rows per call padded to the longest (1: unpadded)."""
    out = []
    for start in range(0, len(held.texts), batch):
        enc = tokenizer(*held.columns(slice(start, start + batch)), padding=True, truncation=True, max_length=128, return_tensors="np")
        out.append(session.run(["logits"], onnx_feeds(session, enc))[0])
    return np.concatenate(out).astype(np.float64)


def main() -> None:
    args = parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.time()
    config = MetaTTConfig.load(args.adapter)
    if config.multitask:
        sys.exit("give a single-task adapter")
    merged, export = work / "merged", work / "fp32"
    if not (args.reuse and (merged / "config.json").is_file()):
        merge_adapter(args.adapter, merged, force=True)
    if not (args.reuse and (export / "manifest.json").is_file()):
        export_onnx(merged, export, force=True, threads=args.threads)
    fp32 = export / ONNX_NAME
    inputs = json.loads((export / "manifest.json").read_text())["inputs"]
    tokenizer = load_tokenizer(str(merged))
    names = list(FORMS)
    if args.forms != "all":
        names = [names[int(i)] for i in args.forms.split(",")]
    forms = build_forms(args, fp32, tokenizer, inputs, {n: FORMS[n] for n in names})

    held = load_held_out(args.data, split="test", model_labels=config.label_names[config.tasks[0]])
    labels = np.asarray(held.labels)
    sessions = {FP32: make_session(fp32, ["CPUExecutionProvider"], args.threads)}
    sessions.update({n: make_session(f["path"], ["CPUExecutionProvider"], args.threads) for n, f in forms.items()})
    print(f"classifying {len(labels)} test rows at batch 1 and {args.batch} with {len(sessions)} graphs", flush=True)
    logits = {n: {1: logits_of(s, tokenizer, held, 1), args.batch: logits_of(s, tokenizer, held, args.batch)} for n, s in sessions.items()}
    ref = logits[FP32][1]
    quality = {}
    for name, by_batch in logits.items():
        row = {}
        for b, z in by_batch.items():
            row[f"agreement_b{b}"] = float((z.argmax(1) == ref.argmax(1)).mean())
            row[f"max_logit_change_b{b}"] = float(np.abs(z - ref).max())
            row[f"accuracy_b{b}"] = float((z.argmax(1) == labels).mean())
        row["labels_changed_b1_vs_batched"] = int((by_batch[1].argmax(1) != by_batch[args.batch].argmax(1)).sum())
        row["max_logit_change_b1_vs_batched"] = float(np.abs(by_batch[1] - by_batch[args.batch]).max())
        quality[name] = row

    latency = []
    for seq in [int(s) for s in args.seq_lens.split(",")]:
        enc = tokenizer([held.texts[0][0]], padding="max_length", truncation=True, max_length=seq, return_tensors="np")
        fns = {n: (lambda s=s, f=onnx_feeds(s, enc): s.run(["logits"], f)) for n, s in sessions.items()}
        times = time_round_robin(fns, repeats=args.repeats, max_seconds=args.max_seconds)
        base = float(np.median(times[FP32]))
        for n, t in times.items():
            latency.append({"form": n, "batch": 1, "seq_len": seq, **summarize(t), "speedup_vs_fp32": round(base / float(np.median(t)), 3)})
        print(f"  seq {seq}: " + ", ".join(f"{n} {summarize(t)['p50_ms']:.1f}ms" for n, t in times.items()), flush=True)

    result = {
        "adapter": str(args.adapter),
        "data": held.source,
        "test_rows": len(labels),
        "batch": args.batch,
        "threads": args.threads,
        "cpu": {**cpu_summary(), "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {n: f["settings"] for n, f in forms.items()},
        "quantize_seconds": {n: f["seconds"] for n, f in forms.items()},
        "sizes_mib": {n: round(Path(f["path"]).stat().st_size / 2**20, 1) for n, f in forms.items()},
        "quality": quality,
        "latency": latency,
        "versions": library_versions(),
        "seconds": round(time.time() - started),
    }
    args.out_json.write_text(json.dumps(result, indent=1) + "\n")
    args.out_md.write_text(render(result))
    print(f"wrote {args.out_md}, {args.out_json} in {result['seconds']}s")


def render(r: dict) -> str:
    b = r["batch"]
    lines = [
        "# int8 settings, measured side by side",
        "",
        "Written by `tools/experiments/int8_settings.py` (the choice it supports: [int8.md](../int8.md)). Raw numbers: int8-settings.json.",
        "",
        f"- model: MiniLM merged with `{r['adapter']}`; judged on {r['test_rows']} rows of {r['data']} (test split); "
        "static forms calibrated on its validation split",
        f"- CPU: {r['cpu']['cpu_count']} cores ({r['cpu']['processor']}), flags {', '.join(r['cpu']['flags'])}; "
        f"VNNI: {'yes' if r['cpu']['vnni'] else 'no'}; 1-minute load average before/after "
        f"{r['load_average_before'][0]} / {r['load_average_after'][0]} (shared machine)",
        f"- {r['threads']} intra-op threads; reference: fp32 at batch 1; batched run: {b} rows per call in test order, "
        "padded to the longest row",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "",
        "## Agreement with fp32 and accuracy",
        "",
        f"| form | agreement b1 | max logit change b1 | agreement b{b} | max logit change b{b} | accuracy b1 | accuracy b{b} "
        f"| change vs fp32 b1 (points) | labels changed b1 vs b{b} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = r["quality"][FP32]["accuracy_b1"]
    for name, q in r["quality"].items():
        lines.append(
            f"| {name} | {100 * q['agreement_b1']:.2f}% | {q['max_logit_change_b1']:.3f} | {100 * q[f'agreement_b{b}']:.2f}% "
            f"| {q[f'max_logit_change_b{b}']:.3f} | {q['accuracy_b1']:.4f} | {q[f'accuracy_b{b}']:.4f} "
            f"| {100 * (q['accuracy_b1'] - ref):+.2f} | {q['labels_changed_b1_vs_batched']} |"
        )
    seqs = sorted({row["seq_len"] for row in r["latency"]})
    lines += [
        "",
        "## Latency at batch 1 (p50 ms, speed-up vs fp32 in the same run)",
        "",
        "| form | " + " | ".join(f"seq {s}" for s in seqs) + " | size MiB |",
        "|---|" + "---:|" * (len(seqs) + 1),
    ]
    for name in r["quality"]:
        cells = []
        for s in seqs:
            row = next(x for x in r["latency"] if x["form"] == name and x["seq_len"] == s)
            cells.append(f"{row['p50_ms']:.1f} ({row['speedup_vs_fp32']:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['sizes_mib'].get(name, '')} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
