"""A factored decoder bundle on ONNX Runtime GenAI: tokenizer ids, per-task parity, sizes on disk.

    nice -n 10 python tools/experiments/genai_parity.py [--bundle B | --adapter runs/mt-llm/best] [--prompts 10] \
        [--work runs/genai-mt-llm] [--output docs/reports/multitask-decoders-genai]

Without --bundle, a bundle is written (merge --factored) from --adapter, or without that from the
untrained-but-perturbed 3-task adapter of tools/bench_multitask_decoders.py on the embedded
SmolLM2-135M-Instruct (first core normal std 0.02, every task slice identity + normal 0.5). Then
``export --genai`` (export/genai.py) and, on one thread:

1. tokenizer: the ids of the chat prompts in GenAI from the tokenizer files as transformers saved
   them from GGUF (how many are -1), and from the files export --genai writes (identical or not);
2. parity: per task, greedy generation (--new-tokens, fp32) from GenAI (model_adapter.onnx + the
   task's .onnx_adapter through og.Adapters / set_active_adapter) against the PyTorch adapter
   (MultiTaskModel.generate) and against ONNX Runtime (optimum's generate on the same graph), on
   --prompts test prompts of a builtin task per task (movie, snli, amazon);
3. time per new token of GenAI and of ONNX Runtime on the same prompts (median; the shared
   machine makes this indicative only);
4. disk: the graph, each task's .onnx_adapter and safetensors, and (when the adapter is known:
   --adapter, or the one made here) each task's lossless LoRA form as ``merge --to peft`` writes
   it (adapter_model.safetensors), which is what a GenAI LoRA adapter per task would hold.

Writes OUTPUT.md and OUTPUT.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # bench_multitask_decoders, a user tool

from bench_multitask_decoders import SOURCES, make_adapter  # noqa: E402

from metatt_deploy import DEFAULT_DECODER, GenAIGenerator, Generator, load_text_task, merge_factored, to_peft  # noqa: E402
from metatt_deploy.adapters.base_model import load_tokenizer  # noqa: E402
from metatt_deploy.common.report import markdown_table  # noqa: E402
from metatt_deploy.export.factored import load_bundle  # noqa: E402
from metatt_deploy.export.genai import GENAI_FILES, export_genai  # noqa: E402
from metatt_deploy.inference.decode import until_eos  # noqa: E402
from metatt_deploy.inference.formats import (  # noqa: E402
    ADAPTER_GRAPH,
    GENAI_CONFIG,  # noqa: E402
    base_dir,
    read_bundle,
    task_file,
    task_records,
)
from metatt_deploy.inference.genai import import_genai  # noqa: E402
from metatt_deploy.training.lm_data import prompt_ids  # noqa: E402

KIB = 1024


def compare_ids(og_tokenizer, prompts: list[list[int]], tokenizer) -> dict:
    """GenAI's ids of the prompts' text against transformers' ids: prompts identical, ids that are -1."""
    minus, total, same = 0, 0, 0
    for ids in prompts:
        got = [int(i) for i in og_tokenizer.encode(tokenizer.decode(ids))]
        minus += sum(i == -1 for i in got)
        total += len(got)
        same += got == ids
    return {"prompts": len(prompts), "identical": same, "ids": total, "minus_one": minus}


def as_saved_tokenizer_ids(og, bundle: Path, prompts: list[list[int]], tokenizer) -> dict:
    """`compare_ids` with the tokenizer files as saved in base/ (no GenAI fixes), beside the same graph and config."""
    folder = bundle.parent / "genai-as-saved"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / ADAPTER_GRAPH).symlink_to((bundle / ADAPTER_GRAPH).resolve())
    shutil.copy(bundle / GENAI_CONFIG, folder / GENAI_CONFIG)
    for name in GENAI_FILES[1:]:
        shutil.copy(bundle / "base" / name, folder / name)
    model = og.Model(str(folder))
    out = compare_ids(og.Tokenizer(model), prompts, tokenizer)
    del model
    shutil.rmtree(folder)
    return out


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--model", default=DEFAULT_DECODER)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "genai-mt-llm")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "reports" / "multitask-decoders-genai")
    args = parser.parse_args()
    torch.set_num_threads(1)
    og = import_genai()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bundle, adapter = args.bundle, args.adapter
    if bundle is None:
        bundle = work / "bundle"
        adapter = adapter or (work / "adapter" if (work / "adapter").is_dir() else make_adapter(work, args.model, 3, 0.02))
        if not (bundle / "bundle.json").is_file():
            merge_factored(adapter, bundle)
    info = read_bundle(bundle)
    record = info.get("genai") or export_genai(bundle)
    prepared_s = time.perf_counter() - started

    ort_gen = Generator(bundle, threads=1)
    genai = GenAIGenerator(bundle, threads=1)
    pytorch = load_bundle(bundle)
    tok = load_tokenizer(str(base_dir(bundle, info)))  # prompts formatted as in training (transformers' chat template)
    eos = tok.eos_token_id
    rows, all_prompts, times = [], [], {"genai": [], "onnxruntime": []}
    first_prompt = None
    answers: dict[str, list[int]] = {}  # every task's GenAI answer to the first task's first prompt
    for k, task in enumerate(ort_gen.tasks):
        source = SOURCES[k % len(SOURCES)]
        messages = load_text_task(dataset=source, max_samples={"test": args.prompts}).splits["test"]["messages"]
        prompts = [prompt_ids(m, tok) for m in messages]
        first_prompt = first_prompt or prompts[0]
        all_prompts += prompts
        ort_gen.use(task)
        genai.use(task)
        answers[task] = list(genai.tokens(first_prompt, args.new_tokens))
        same_pt = same_ort = 0
        for ids in prompts:
            t0 = time.perf_counter()
            got = list(genai.tokens(ids, args.new_tokens))
            times["genai"].append((time.perf_counter() - t0) / len(got))
            t0 = time.perf_counter()
            ort = ort_gen.greedy(ids, args.new_tokens)
            times["onnxruntime"].append((time.perf_counter() - t0) / len(ort))
            x = torch.tensor([ids])
            with torch.no_grad():
                ref = pytorch.generate(x, attention_mask=torch.ones_like(x), task_ids=task, max_new_tokens=args.new_tokens, do_sample=False)
            same_pt += got == ref[0, len(ids) :].tolist()  # all three stop after EOS, which they include
            same_ort += until_eos(got, eos) == ort  # GenAI includes the EOS, the numpy loop stops before it
        rows.append(
            {
                "task": task,
                "prompts from": source,
                "prompts": len(prompts),
                "GenAI = PyTorch": same_pt,
                "GenAI = ONNX Runtime": same_ort,
            }
        )
        print(rows[-1], flush=True)
    saved = as_saved_tokenizer_ids(og, bundle, all_prompts, tok)
    written = compare_ids(genai.og_tokenizer, all_prompts, tok)
    sizes = [
        {
            "task": r["task"],
            ".onnx_adapter bytes": task_file(bundle, r, "onnx_adapter").stat().st_size,
            ".safetensors bytes": task_file(bundle, r, "safetensors").stat().st_size,
        }
        for r in task_records(bundle, info)
    ]
    if adapter is not None:
        for row in sizes:
            peft = work / f"peft-{row['task']}"
            if not (peft / "adapter_model.safetensors").is_file():
                to_peft(adapter, peft, task=row["task"], force=True)
            row["LoRA (merge --to peft) bytes"] = (peft / "adapter_model.safetensors").stat().st_size
    result = {
        "bundle": str(bundle),
        "onnxruntime_genai": record["onnxruntime_genai"],
        "export_record": record,
        "tokenizer_as_saved": saved,
        "tokenizer_written": written,
        "parity": rows,
        "distinct_answers_to_one_prompt": len({tuple(a) for a in answers.values()}),
        "ms_per_token_median": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "graph_mib": (bundle / ADAPTER_GRAPH).stat().st_size / 2**20,
        "sizes": sizes,
        "new_tokens": args.new_tokens,
        "prepare_s": prepared_s,
        "total_s": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [
        f"# ONNX Runtime GenAI on a factored decoder bundle ({info['base_model']})",
        "",
        f"`python tools/experiments/genai_parity.py --prompts {args.prompts} --new-tokens {args.new_tokens}`; onnxruntime-genai "
        f"{record['onnxruntime_genai']}, CPU, 1 thread, fp32, greedy.",
        "",
        "## Tokenizer ids of the chat prompts in GenAI vs transformers",
        "",
        markdown_table(
            [
                {
                    "tokenizer files": "as saved from GGUF (base/)",
                    "prompts identical": f"{saved['identical']}/{saved['prompts']}",
                    "ids that are -1": f"{saved['minus_one']}/{saved['ids']}",
                },
                {
                    "tokenizer files": "written by export --genai",
                    "prompts identical": f"{written['identical']}/{written['prompts']}",
                    "ids that are -1": f"{written['minus_one']}/{written['ids']}",
                },
            ]
        ),
        "",
        f"## Greedy parity per task ({args.new_tokens} new tokens)",
        "",
        markdown_table(rows),
        "",
        f"The {len(answers)} tasks give {result['distinct_answers_to_one_prompt']} different answers to the same prompt "
        "(the first prompt of the first task), so the parity above distinguishes the tasks.",
        "",
        f"Median time per new token: GenAI {result['ms_per_token_median']['genai']:.1f} ms, ONNX Runtime (optimum generate) "
        f"{result['ms_per_token_median']['onnxruntime']:.1f} ms (shared 2-core machine: indicative only).",
        "",
        f"## Sizes on disk (graph {result['graph_mib']:.0f} MiB, once)",
        "",
        markdown_table(sizes),
        "",
    ]
    args.output.with_suffix(".md").write_text("\n".join(md))
    print(
        json.dumps(
            {k: result[k] for k in ("parity", "distinct_answers_to_one_prompt", "tokenizer_as_saved", "ms_per_token_median", "sizes")},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
