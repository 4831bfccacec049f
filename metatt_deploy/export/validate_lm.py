"""Validate a decoder's ONNX export against its UNMERGED adapter: parity, exact match, perplexity, latency.

The reference is the PyTorch model as trained (base + MetaTT adapter, or the PEFT LoRA baseline,
not merged), so one check covers merging and exporting. On held-out prompts of a real task (``data``: a builtin task or a
prompt/response / messages JSONL file; at least ``MIN_PARITY_PROMPTS`` for the parity claim):

- teacher-forced logits at every position of prompt + reference response, PyTorch vs ONNX
  (max |diff|), enforced for fp32 bundles at 1e-4 x max(1, max |logit| / 10) (onnx_lm.fp32_tolerance:
  float32 rounding grows with the logits, which reach 38 for SmolLM2), reported for int8/int4;
- greedy generation (batch 1, up to the longest reference answer + 2 tokens, EOS stops it):
  the fraction of prompts whose tokens are identical, enforced at 100% for fp32;
- exact match of the generated answers for PyTorch and for each bundle, and the perplexity of
  the reference responses (from the same teacher-forced logits), so an int8/int4 bundle reports
  its change in both against the PyTorch adapter and against the fp32 bundle;
- latency at batch 1: time to first token (prefill + first token) at each prompt length of
  ``prompt_lengths`` (32 and 256 by default), and decode tokens/s (``new_tokens`` forced tokens
  after a 32-token prompt: (time of the whole generation - time to first token) / (new_tokens -
  1)), for PyTorch eager with the adapter unmerged and merged and for ONNX Runtime on every
  bundle, timed round-robin so load on a shared machine hits every runtime alike.

``compare`` names more bundles of the same model (int8, int4) measured in the same run. Every
bundle must record this adapter's weights sha256 (as for classifiers: parity alone cannot tell an
export from another adapter of a small effect). Results, as for classifiers beside the bundle so it
keeps exactly its manifest's files: ``exported/NAME.validation.json``, ``.validation.md`` and
``.latency.png`` (or ``validation.json``, ``validation.md`` and ``latency.png`` in ``output``); a
parity failure is written to the report first, then raised. Options only a classifier export takes
are refused with one line rather than ignored, by the decoder's export kind (export/kinds.py).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_write_json, atomic_write_text, check_writable
from metatt_deploy.common.report import markdown_table, save_figure
from metatt_deploy.common.timing import summarize, time_round_robin
from metatt_deploy.export.decoder_runs import greedy, load_ort_decoder, teacher_forced_logits
from metatt_deploy.export.onnx_files import library_versions
from metatt_deploy.export.onnx_lm import fp32_tolerance
from metatt_deploy.export.parity import max_abs, max_abs_diff, within
from metatt_deploy.export.reference import check_provenance, load_decoder_reference, torch_threads
from metatt_deploy.export.validate import REPORT_JSON, REPORT_MD, report_path
from metatt_deploy.inference.formats import CAUSAL_LM, DECODER_PIPELINE, context_length, read_manifest
from metatt_deploy.training.lm_data import load_text_task, tokenize_text_task
from metatt_deploy.training.lm_eval import exact_match, max_new_tokens_for, nll_from_logits, strip_after_eos

REPORT_PNG = "latency.png"
MIN_PARITY_PROMPTS = 50
DECODER_REPEATS = 10  # timed generations per runtime and prompt length: a generation takes far longer than a forward
DECODE_PROMPT = 32


def validate_decoder(
    adapter_dir: str | Path,
    onnx_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    max_examples: int = MIN_PARITY_PROMPTS,
    compare: Sequence[str | Path] = (),
    prompt_lengths: Sequence[int] = (32, 256),
    new_tokens: int = 32,
    repeats: int = DECODER_REPEATS,
    max_length: int = 512,
    threads: int | None = None,
    base_model: str | None = None,
    output: str | Path | None = None,
    force: bool = False,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Compare the decoder bundle ``onnx_dir`` (and ``compare`` bundles) with the unmerged adapter.

    ``log`` receives one-line notes for the console (the data used). The public `validate`
    (export/kinds.py) refuses the options only a classifier takes before it calls this.
    """
    import torch

    onnx_dir = Path(onnx_dir)
    bundles = [onnx_dir, *[Path(c) for c in compare]]
    manifests = [read_manifest(b) for b in bundles]
    for b, m in zip(bundles, manifests):
        if m.get("pipeline_task") != DECODER_PIPELINE:
            raise MetaTTError(f"{b} is not a decoder export (no KV-cache graph); export the decoder with metatt-deploy export")
    if data is None:
        raise MetaTTError("decoder validation needs held-out prompts with answers; pass --data (a builtin task or a prompt/response JSONL)")
    if max_examples < 1 or new_tokens < 2 or repeats < 1 or not prompt_lengths or min(prompt_lengths) < 1:
        raise MetaTTError("--max-examples and --repeats must be at least 1, --new-tokens at least 2, prompt lengths positive")
    json_path, md_path, png_path = (report_path(onnx_dir, output, name) for name in (REPORT_JSON, REPORT_MD, REPORT_PNG))
    for path in (json_path, md_path, png_path):
        check_writable(path, force)
    for b, m in zip(bundles, manifests):
        check_provenance(m, adapter_dir, b, None)

    model, tokenizer, method, merge = load_decoder_reference(adapter_dir, base_model)
    context = context_length(model.config.to_dict())
    if context and max(prompt_lengths) + new_tokens > context:
        raise MetaTTError(f"prompt length {max(prompt_lengths)} + {new_tokens} new tokens exceed the model's context of {context}")
    rows = held_out_prompts(data, split, max_examples, seed, tokenizer, min(max_length, context or max_length))
    if log is not None:
        log(f"data: {len(rows['prompts'])} prompts of {data} ({split})")

    with torch_threads(threads):
        names = [_bundle_name(m, b) for b, m in zip(bundles, manifests)]
        sessions = {name: load_ort_decoder(b, threads=threads) for name, b in zip(names, bundles)}
        quality = _quality(model, tokenizer, sessions, rows)
        merged = merge(copy.deepcopy(model)).eval()
        runtimes = {"pytorch-unmerged": model, "pytorch-merged": merged, **{f"onnx-{n}": s for n, s in sessions.items()}}
        latency = _latency(runtimes, tokenizer, prompt_lengths, new_tokens, repeats)

    fp32 = manifests[0].get("variant", {}).get("quantize") is None
    parity = _parity(quality, quality["bundles"][names[0]], fp32, len(rows["prompts"]), method)
    report = {
        "adapter": str(Path(adapter_dir).resolve()),
        "onnx_dir": str(onnx_dir.resolve()),
        "task_type": CAUSAL_LM,
        "method": method,
        "data": data,
        "split": split,
        "parity": parity,
        "quality": quality,
        "latency": latency,
        "threads": threads or torch.get_num_threads(),
        "versions": library_versions(),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, report)
    atomic_write_text(md_path, render_markdown(report))
    _plot(latency, png_path)
    if not parity["passed"]:
        raise MetaTTError(
            f"the ONNX decoder differs from the unmerged adapter (max |logit diff| {parity['max_abs_logit_diff']:.3g}, greedy tokens "
            f"identical on {parity['greedy_identical']:.0%}; report in {md_path}); re-merge and re-export the adapter"
        )
    return report


def _parity(quality: dict, main: dict, fp32: bool, prompts: int, method: str) -> dict:
    """The first bundle against the adapter: logits within fp32_tolerance (NaN fails, export/parity.py) and greedy tokens identical, for fp32."""
    tolerance = fp32_tolerance(quality["max_abs_logit"]) if fp32 else None
    return {
        "max_abs_logit_diff": main["max_abs_logit_diff"],
        "greedy_identical": main["greedy_identical"],
        "prompts": prompts,
        "max_abs_logit": quality["max_abs_logit"],
        "tolerance": tolerance,
        "enforced": fp32,
        "passed": within({**main, "tolerance": tolerance}) and (not fp32 or main["greedy_identical"] == 1.0),
        "reference": f"PyTorch eager, base model + unmerged {'PEFT LoRA' if method == 'lora' else 'MetaTT'} adapter, float32, CPU",
    }


def _bundle_name(manifest: dict, folder: Path) -> str:
    return (manifest.get("variant", {}).get("quantize") or "fp32") if manifest else folder.name


def held_out_prompts(data: str, split: str, max_examples: int, seed: int, tokenizer, max_length: int) -> dict:
    """Prompts, full teacher-forcing ids, labels and reference answers of ``max_examples`` rows."""
    path = Path(data)
    if path.suffix.lower() in (".jsonl", ".json") or path.exists():
        task = load_text_task(test=str(path), max_samples={"test": max_examples}, seed=seed)
        split = "test"
    else:
        task = load_text_task(dataset=data, max_samples={split: max_examples}, seed=seed)
    if split not in task.splits:
        raise MetaTTError(f"'{data}' has no '{split}' split (it has {', '.join(task.splits)}); pass --split")
    task.splits = {split: task.splits[split]}
    ds = tokenize_text_task(task, tokenizer, max_length)[split][:]
    return {
        "ids": ds["input_ids"],
        "labels": ds["labels"],
        "prompts": [ids[:n] for ids, n in zip(ds["input_ids"], ds["prompt_length"])],
        "responses": ds["response"],
        "max_new_tokens": max_new_tokens_for([len(i) - n for i, n in zip(ds["input_ids"], ds["prompt_length"])]),
    }


def _quality(model, tokenizer, sessions: dict, rows: dict) -> dict:
    """Teacher-forced logits, perplexity, greedy tokens and exact match for PyTorch and every bundle."""
    import torch

    eos, pad, n_new = tokenizer.eos_token_id, tokenizer.pad_token_id, rows["max_new_tokens"]

    def run(runtime) -> tuple[list[np.ndarray], list[list[int]]]:
        logits = [teacher_forced_logits(runtime, ids) for ids in rows["ids"]]
        tokens = [strip_after_eos(greedy(runtime, p, n_new, eos, pad), eos) for p in rows["prompts"]]
        return logits, tokens

    def scores(logits, tokens) -> dict:
        nll, count = 0.0, 0
        for lg, labels in zip(logits, rows["labels"]):
            a, b = nll_from_logits(torch.from_numpy(lg)[None], torch.tensor([labels]))
            nll, count = nll + a, count + b
        answers = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
        return {"exact_match": exact_match(answers, rows["responses"]), "perplexity": math.exp(nll / max(count, 1))}

    pt_logits, pt_tokens = run(model)
    pytorch = scores(pt_logits, pt_tokens)
    out: dict[str, Any] = {
        "examples": len(rows["ids"]),
        "max_new_tokens": n_new,
        "max_abs_logit": max_abs(pt_logits),
        "pytorch": pytorch,
        "bundles": {},
    }
    for name, session in sessions.items():
        logits, tokens = run(session)
        s = scores(logits, tokens)
        out["bundles"][name] = {
            **s,
            "max_abs_logit_diff": max_abs_diff(logits, pt_logits),
            "greedy_identical": sum(a == b for a, b in zip(tokens, pt_tokens)) / len(tokens),
            "exact_match_change_points": round(100 * (s["exact_match"] - pytorch["exact_match"]), 3),
            "perplexity_change": s["perplexity"] - pytorch["perplexity"],
        }
    return out


def _latency(runtimes: dict, tokenizer, prompt_lengths: Sequence[int], new_tokens: int, repeats: int) -> dict:
    """Time to first token per prompt length and decode tokens/s, batch 1, every runtime round-robin."""
    import torch

    seed_ids = tokenizer("The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill. ").input_ids
    eos_free = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id}

    def prompt(n: int) -> torch.Tensor:
        return torch.tensor([(seed_ids * (n // len(seed_ids) + 1))[:n]])

    def call(runtime, ids: torch.Tensor, n_new: int):
        def fn():
            with torch.no_grad():
                runtime.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new, **eos_free)

        return fn

    fns = {}
    for name, runtime in runtimes.items():
        for n in sorted({*prompt_lengths, DECODE_PROMPT}):
            fns[(name, "ttft", n)] = call(runtime, prompt(n), 1)
        fns[(name, "generate", DECODE_PROMPT)] = call(runtime, prompt(DECODE_PROMPT), new_tokens)
    times = time_round_robin(fns, warmup=1, repeats=repeats, rounds=min(3, repeats))
    rows = []
    for name in runtimes:
        ttft = {n: summarize(times[(name, "ttft", n)]) for n in sorted({*prompt_lengths, DECODE_PROMPT})}
        total = summarize(times[(name, "generate", DECODE_PROMPT)])
        decode_s = max(total["p50_ms"] - ttft[DECODE_PROMPT]["p50_ms"], 1e-6) / 1000
        row = {
            "runtime": name,
            **{f"ttft_{n}_ms": ttft[n]["p50_ms"] for n in prompt_lengths},
            "decode_tokens_per_s": (new_tokens - 1) / decode_s,
        }
        rows.append(row)
    base = {r["runtime"]: r for r in rows}
    merged = base["pytorch-merged"]["decode_tokens_per_s"]
    for r in rows:
        r["decode_vs_pytorch_merged"] = r["decode_tokens_per_s"] / merged
    if "onnx-fp32" in base:
        for r in rows:
            r["decode_vs_onnx_fp32"] = r["decode_tokens_per_s"] / base["onnx-fp32"]["decode_tokens_per_s"]
    return {
        "batch": 1,
        "new_tokens": new_tokens,
        "decode_prompt": DECODE_PROMPT,
        "repeats": repeats,
        "rows": rows,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def render_markdown(report: dict) -> str:
    p, q = report["parity"], report["quality"]
    status = "passed" if p["passed"] else "FAILED"
    tol = (
        f"tolerance {p['tolerance']:.2g} at max |logit| {p['max_abs_logit']:.1f}, {status}"
        if p["enforced"]
        else "reported only (quantized)"
    )
    lines = [
        "# Decoder validation\n",
        f"adapter `{report['adapter']}` vs ONNX `{report['onnx_dir']}`; data `{report['data']}` ({report['split']}), {q['examples']} prompts\n",
        "## Parity (fp32 bundle vs unmerged PyTorch adapter)\n",
        f"- max |logit diff|, teacher-forced over prompt + response: {p['max_abs_logit_diff']:.3g} ({tol})",
        f"- greedy generation token-identical: {p['greedy_identical']:.1%} of {p['prompts']} prompts (up to {q['max_new_tokens']} new tokens)\n",
        "## Exact match and perplexity\n",
    ]
    rows = [{"runtime": "pytorch (unmerged adapter)", **q["pytorch"]}]
    rows += [{"runtime": f"onnx {name}", **v} for name, v in q["bundles"].items()]
    lines.append(
        markdown_table(
            rows,
            [
                "runtime",
                "exact_match",
                "perplexity",
                "max_abs_logit_diff",
                "greedy_identical",
                "exact_match_change_points",
                "perplexity_change",
            ],
        )
    )
    lat = report["latency"]
    lines.append(
        f"\n## Latency (batch 1, {report['threads']} threads, medians; decode: {lat['new_tokens']} tokens after a {lat['decode_prompt']}-token prompt)\n"
    )
    lines.append(markdown_table(lat["rows"], floatfmt=".2f"))
    return "\n".join(lines)


def _plot(latency: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = latency["rows"]
    names = [r["runtime"] for r in rows]
    ttft_keys = [k for k in rows[0] if k.startswith("ttft_")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(ttft_keys)
    for i, k in enumerate(ttft_keys):
        axes[0].bar(
            np.arange(len(names)) + i * width, [r[k] for r in rows], width, label=k.replace("ttft_", "prompt ").replace("_ms", " tokens")
        )
    axes[0].set_xticks(np.arange(len(names)) + width * (len(ttft_keys) - 1) / 2, names, rotation=30, ha="right")
    axes[0].set_ylabel("time to first token (ms, p50)")
    axes[0].legend()
    axes[1].bar(names, [r["decode_tokens_per_s"] for r in rows], color="tab:green")
    axes[1].set_ylabel("decode tokens/s (batch 1)")
    axes[1].tick_params(axis="x", rotation=30)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Decoder latency: PyTorch eager vs ONNX Runtime")
    save_figure(fig, path)


def summary_lines(report: dict, markdown: Path) -> list[str]:
    """The lines a person reads after validating a decoder: parity, exact match, tokens/s, where the report is."""
    p, q = report["parity"], report["quality"]
    tol = f"tolerance {p['tolerance']:.2g}" if p["enforced"] else "reported only"
    lines = [
        f"max |logit diff| ONNX vs unmerged adapter {p['max_abs_logit_diff']:.2e} ({tol}) on {p['prompts']} prompts; "
        f"greedy tokens identical on {p['greedy_identical']:.0%}"
    ]
    line = f"exact match: PyTorch {q['pytorch']['exact_match']:.4f} (perplexity {q['pytorch']['perplexity']:.3f})"
    for name, b in q["bundles"].items():
        line += f", ONNX {name} {b['exact_match']:.4f} ({b['perplexity']:.3f})"
    lines.append(line)
    for r in report["latency"]["rows"]:
        ttft = ", ".join(f"{k[5:-3]} tokens {v:.0f} ms" for k, v in r.items() if k.startswith("ttft_"))
        lines.append(
            f"{r['runtime']}: {r['decode_tokens_per_s']:.1f} tokens/s ({r['decode_vs_pytorch_merged']:.2f}x PyTorch merged); first token: {ttft}"
        )
    return [*lines, f"report: {markdown}"]
