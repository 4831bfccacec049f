"""int4 settings against fp32 on trained decoders: exact match, perplexity, greedy agreement, decode speed, size.

For each ``--model NAME=ADAPTER`` (a trained MetaTT run's best/ folder): merge it, export the fp32
bundle once (``export_onnx``: parity with PyTorch enforced, the tied table stored once), then
quantize that fp32 graph with every setting of ``SETTINGS`` (``quantize_int4``; the bundle's
tokenizer and configs are copied beside it). Every bundle is then measured the same way:

- ``--prompts`` test prompts of ``--data`` (never seen in training or calibration): exact match of
  the greedy answers, perplexity of the reference responses (teacher-forced), and the share of
  prompts whose greedy tokens are identical to the fp32 bundle's;
- the export quality gate (export/quality.py) on the adapter task's validation split, as
  ``export --quantize int4`` computes it: greedy agreement and perplexity increase vs fp32;
- decode tokens/s at batch 1 (``--new-tokens`` forced tokens after a 32-token prompt, less the
  time to the first token), every bundle timed round-robin ``--repeats`` times, medians; wall
  and CPU seconds (this process's, all threads) of the whole generation are both reported;
- size of model.onnx (+ external data) against the fp32 bundle's, which holds one copy of the
  tied embedding.

Finished bundles and each model's measurements (``WORK/NAME/result.json``) are reused: delete them
to measure again. Writes ``OUT.md`` and ``OUT.json``.

    python tools/experiments/bench_int4.py --model smollm2=runs/smol/best --model gemma3=runs/gemma/best --data movie-sentiment
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a checkout, uninstalled

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metatt_deploy import MetaTTError, export_onnx, merge_adapter  # noqa: E402
from metatt_deploy.common.files import atomic_write_json, atomic_write_text  # noqa: E402
from metatt_deploy.common.report import markdown_table  # noqa: E402
from metatt_deploy.export.decoder_runs import greedy, load_ort_decoder, teacher_forced_logits  # noqa: E402
from metatt_deploy.export.int4 import Int4Options, quantize_int4  # noqa: E402
from metatt_deploy.export.onnx_files import model_bytes  # noqa: E402
from metatt_deploy.export.quality import QualityGate, decoder_examples, decoder_quality, score_decoder  # noqa: E402
from metatt_deploy.export.validate_lm import held_out_prompts  # noqa: E402
from metatt_deploy.inference.formats import ONNX_NAME  # noqa: E402
from metatt_deploy.training.lm_eval import exact_match, nll_from_logits, strip_after_eos  # noqa: E402

SETTINGS: dict[str, Int4Options] = {
    "int4, 4-bit head (before)": Int4Options(head_bits=4, edge_layers=0),
    "int4, 8-bit head": Int4Options(head_bits=8, edge_layers=0),
    "int4, float32 head": Int4Options(head_bits=32, edge_layers=0),
    "int4, 8-bit head + 8-bit edge layers (2+2) (default)": Int4Options(head_bits=8, edge_layers=2),
    "int4, 8-bit head, float32 activations (accuracy level 0)": Int4Options(head_bits=8, edge_layers=0, accuracy_level=0),
    "int4, 4-bit head + 8-bit edge layers (2+2)": Int4Options(head_bits=4, edge_layers=2),
}
TARGETS = {"em_points": -2.0, "ppl_change": 0.1, "decode_ratio": 1.6, "size_ratio": 0.35}
DECODE_PROMPT = 32


def prepare(name: str, adapter: Path, work: Path, settings: dict[str, Int4Options]) -> dict[str, Path]:
    """The fp32 bundle and one bundle per setting (reused when present)."""
    merged = work / name / "merged"
    if not (merged / "config.json").is_file():
        merge_adapter(adapter, merged, force=True)
    fp32 = work / name / "fp32"
    if not (fp32 / "manifest.json").is_file():
        export_onnx(merged, fp32, force=True)
    bundles = {"fp32": fp32}
    for label, options in settings.items():
        folder = work / name / options.label()
        if not (folder / ONNX_NAME).is_file():
            stage = folder.with_name(folder.name + ".partial")
            shutil.rmtree(stage, ignore_errors=True)
            shutil.copytree(fp32, stage, ignore=shutil.ignore_patterns(f"{ONNX_NAME}*", "manifest.json", "web"))
            quantize_int4(fp32 / ONNX_NAME, stage / ONNX_NAME, options)
            stage.rename(folder)
        bundles[label] = folder
    return bundles


def quality(model: Any, tokenizer: Any, rows: dict[str, Any]) -> dict[str, Any]:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    nll, count, answers, tokens = 0.0, 0, [], []
    for ids, labels, prompt in zip(rows["ids"], rows["labels"], rows["prompts"]):
        a, b = nll_from_logits(torch.from_numpy(teacher_forced_logits(model, ids))[None], torch.tensor([labels]))
        nll, count = nll + a, count + b
        out = strip_after_eos(greedy(model, prompt, rows["max_new_tokens"], eos, pad), eos)
        tokens.append(out)
        answers.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    return {"exact_match": exact_match(answers, rows["responses"]), "perplexity": math.exp(nll / max(count, 1)), "tokens": tokens}


def decode_speed(models: dict[str, Any], tokenizer: Any, new_tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of a 1-token and a ``new_tokens`` generation per bundle, round-robin."""
    seed_ids = tokenizer("The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill. ").input_ids
    ids = torch.tensor([(seed_ids * (DECODE_PROMPT // len(seed_ids) + 1))[:DECODE_PROMPT]])

    def run(model: Any, n: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return time.perf_counter() - wall, time.process_time() - cpu

    samples: dict[str, dict[str, list[float]]] = {k: {"ttft_wall": [], "gen_wall": [], "gen_cpu": []} for k in models}
    for model in models.values():  # warm-up
        run(model, 2)
    for _ in range(repeats):
        for name, model in models.items():
            first = run(model, 1)
            whole = run(model, new_tokens)
            samples[name]["ttft_wall"].append(first[0])
            samples[name]["gen_wall"].append(whole[0])
            samples[name]["gen_cpu"].append(whole[1])
    out = {}
    for name, s in samples.items():
        ttft, gen = statistics.median(s["ttft_wall"]), statistics.median(s["gen_wall"])
        out[name] = {
            "ttft_s": ttft,
            "generate_wall_s": gen,
            "generate_cpu_s": statistics.median(s["gen_cpu"]),
            "decode_tokens_per_s": (new_tokens - 1) / max(gen - ttft, 1e-6),
        }
    return out


def bench_model(name: str, adapter: Path, args: argparse.Namespace, done: dict[str, Any] | None) -> dict[str, Any]:
    """Measure fp32 and the settings ``done`` (an earlier result) lacks; rows added later are timed in their own
    round-robin run with fp32 (``timing_run`` 2), so their decode ratio is against that run's fp32."""
    from transformers import AutoTokenizer

    measured = {r["setting"] for r in done["rows"]} - {"fp32"} if done else set()
    bundles = {k: v for k, v in prepare(name, adapter, args.work, args.settings).items() if k not in measured}
    tokenizer = AutoTokenizer.from_pretrained(bundles["fp32"])
    rows = held_out_prompts(args.data, "test", args.prompts, 0, tokenizer, 512)
    task = json.loads((bundles["fp32"] / "manifest.json").read_text()).get("task")
    examples, source = decoder_examples(QualityGate(task=task), tokenizer, 2048)
    results: dict[str, Any] = {}
    fp32_scores = None
    for label, folder in bundles.items():
        print(f"[{name}] quality: {label}", flush=True)
        model = load_ort_decoder(folder, threads=args.threads)
        results[label] = quality(model, tokenizer, rows)
        scores = score_decoder(model, examples, tokenizer.eos_token_id, tokenizer.pad_token_id, reference=fp32_scores)
        if fp32_scores is None:
            fp32_scores = scores
        else:
            results[label]["gate"] = decoder_quality(fp32_scores, scores)
        results[label]["bytes"] = model_bytes(folder)
        del model
    print(f"[{name}] decode speed, {args.repeats} round-robin repeats", flush=True)
    speed = decode_speed(
        {k: load_ort_decoder(f, threads=args.threads) for k, f in bundles.items()}, tokenizer, args.new_tokens, args.repeats
    )
    base = results["fp32"]
    rows_out = list(done["rows"]) if done else []
    for label, r in results.items():
        if done and label == "fp32":
            continue
        rows_out.append(
            {
                "setting": label,
                "exact_match": r["exact_match"],
                "em_change_points": 100 * (r["exact_match"] - base["exact_match"]),
                "perplexity": r["perplexity"],
                "ppl_change": r["perplexity"] - base["perplexity"],
                "greedy_identical": float(np.mean([a == b for a, b in zip(r["tokens"], base["tokens"])])),
                **speed[label],
                "decode_ratio": speed[label]["decode_tokens_per_s"] / speed["fp32"]["decode_tokens_per_s"],
                "bytes": r["bytes"],
                "size_ratio": r["bytes"] / base["bytes"],
                **({"gate": r["gate"]} if "gate" in r else {}),
                "timing_run": 2 if done else 1,
            }
        )
    measured = [*(done["measured"] if done else []), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())]
    return {
        "adapter": str(adapter.resolve()),
        "gate_calibration": source,
        "prompts": len(rows["ids"]),
        "rows": rows_out,
        "measured": measured,
    }


def args_prompts(report: dict[str, Any]) -> int:
    return next(iter(report["models"].values()))["prompts"]


def render(report: dict[str, Any]) -> str:
    lines = [
        "# int4 settings against fp32 (tools/experiments/bench_int4.py)",
        "",
        f"{args_prompts(report)} test prompts of {report['data']} per model; decode: batch 1, {report['threads']} ONNX Runtime threads, "
        f"{report['new_tokens']} forced tokens after a {DECODE_PROMPT}-token prompt, median of {report['repeats']} round-robin "
        f"repeats. Report written {report['written']}; `{report['command']}`.",
        "",
        "Targets: exact match within 2 points of fp32, perplexity <= +0.1, decode >= 1.6x fp32, size <= 35% of fp32 "
        "(fp32 counts one copy of the tied embedding). (b): a setting added later, timed in a second round-robin run "
        "with fp32 (its decode ratio is against that run's fp32: tokens/s divided by the ratio).",
        "",
    ]
    for name, model in report["models"].items():
        when = ", ".join(model.get("measured", [])) or "before measurement dates were recorded"
        lines += [f"## {name}", "", f"Adapter `{model['adapter']}`; gate calibration: {model['gate_calibration']}; measured {when}.", ""]
        table = []
        for r in model["rows"]:
            gate = r.get("gate")
            table.append(
                {
                    "setting": r["setting"] + (" (b)" if r.get("timing_run") == 2 else ""),
                    "exact match (points vs fp32)": f"{r['exact_match']:.2f} ({r['em_change_points']:+.0f})",
                    "perplexity (change)": f"{r['perplexity']:.3f} ({r['ppl_change']:+.3f})",
                    "greedy identical to fp32": f"{r['greedy_identical']:.0%}",
                    "decode tokens/s (vs fp32)": f"{r['decode_tokens_per_s']:.1f} ({r['decode_ratio']:.2f}x)",
                    "generate s, wall / CPU": f"{r['generate_wall_s']:.2f} / {r['generate_cpu_s']:.2f}",
                    "size (vs fp32)": f"{r['bytes'] / 2**20:.1f} MiB ({r['size_ratio']:.1%})",
                    "gate: agreement, ppl": f"{gate['greedy_agreement']:.1%}, {gate['perplexity_increase']:+.1%}" if gate else "-",
                }
            )
        lines += [
            markdown_table(table),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=ADAPTER", help="a trained decoder adapter (best/)")
    parser.add_argument("--data", default="movie-sentiment")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-int4"))
    parser.add_argument("--out", type=Path, default=Path("docs/reports/int4"))
    parser.add_argument(
        "--settings",
        help=f"comma-separated settings to measure, by their short names (default all: {', '.join(o.label() for o in SETTINGS.values())})",
    )
    args = parser.parse_args(argv)
    wanted = args.settings.split(",") if args.settings else [o.label() for o in SETTINGS.values()]
    args.settings = {k: o for k, o in SETTINGS.items() if o.label() in wanted}
    report: dict[str, Any] = {
        "data": args.data,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "command": "python tools/experiments/bench_int4.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "models": {},
    }
    try:
        for spec in args.model:
            name, _, adapter = spec.partition("=")
            path = args.work / name / "result.json"
            done = json.loads(path.read_text()) if path.is_file() else None
            if done is None or not {"fp32", *args.settings} <= {r["setting"] for r in done["rows"]}:
                atomic_write_json(path, bench_model(name, Path(adapter), args, done))
            report["models"][name] = json.loads(path.read_text())
    except MetaTTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["written"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), report)
    atomic_write_text(args.out.with_suffix(".md"), render(report))
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
