"""Many tasks on one small LLM: a factored decoder bundle against one merged export per task.

    python tools/bench_multitask_decoders.py [--adapter runs/mt-llm/best] [--tasks 3] [--prompts 10] \
        [--work runs/bench-mt-llm] [--output docs/reports/multitask-decoders-bench]

Without --adapter, a 3-task MetaTT-(4+1)D adapter on the embedded SmolLM2-135M-Instruct is made
with non-trivial values (first core normal std --std, every task slice the identity plus normal
noise 0.5, so the tasks answer differently); parity and speed do not depend on training.
Measured on ONNX Runtime's CPU execution provider, both sides through optimum's
ORTModelForCausalLM.generate (fp32, greedy):

1. parity: for every task, greedy generation (--new-tokens) from the factored graph
   (model_adapter.onnx + the task's .onnx_adapter) against that task's merged export (merge
   --task + export), on --prompts test prompts of a builtin task per task (movie, snli, amazon);
2. switching: the first call (a 32-token prompt's forward) after a switch to a task whose
   adapter was not loaded yet, the same call in steady state, and a fresh session of a merged
   export plus its first call;
3. decode tokens/s at batch 1 (32-token prompt, --decode-tokens forced tokens, less the time of
   the prompt), factored vs merged, round robin, median of --repeats;
4. disk and resident memory for 1, 3 and 10 tasks: measured for the whole bundle and for
   one merged export (RSS of a fresh process holding the session(s) after one call); 10 tasks
   of merged exports are extrapolated from one (each is a full copy), stated as such.

Writes OUTPUT.md, OUTPUT.json and OUTPUT.png.

Internals (what this measures lies below the public API, docs/api.md):

- metatt_deploy.adapters.base_model: the base decoder and its tokenizer, to build the random adapter and the prompts.
- metatt_deploy.adapters.multitask: builds a 3-task (4+1)D adapter with random cores (parity and speed do not depend on training); the API trains adapters, it does not assemble them.
- metatt_deploy.export.decoder_runs: optimum's ORTModelForCausalLM on each graph, the side the factored graph is compared with.
- metatt_deploy.export.factored: the bundle's bytes on disk counted as the bundle's own summary counts them (each file once).
- metatt_deploy.export.onnx_lm: the fp32 tolerance the export's own parity check uses, so parity here is judged the same way.
- metatt_deploy.inference.decode: the decode loop under `Generator`, driven on the bare graph for the numpy side.
- metatt_deploy.inference.formats: the bundle's file names and task records: the benchmark opens each graph of the bundle by itself.
- metatt_deploy.training.lm_data: the prompts as training formats them (chat template), so the test prompts are the tasks' own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metatt_deploy import DEFAULT_DECODER, Generator, SamplingParams, export_onnx, load_text_task, merge_adapter, merge_factored  # noqa: E402
from metatt_deploy.adapters.base_model import load_causal_lm, load_tokenizer  # noqa: E402
from metatt_deploy.adapters.multitask import build_multitask, save_multitask  # noqa: E402
from metatt_deploy.common.report import markdown_table, save_figure  # noqa: E402
from metatt_deploy.export.decoder_runs import greedy, load_ort_decoder, teacher_forced_logits  # noqa: E402
from metatt_deploy.export.factored import folder_bytes  # noqa: E402
from metatt_deploy.export.onnx_lm import fp32_tolerance  # noqa: E402
from metatt_deploy.inference.decode import generate, until_eos  # noqa: E402
from metatt_deploy.inference.formats import ADAPTER_GRAPH, base_dir, read_bundle, task_records  # noqa: E402
from metatt_deploy.training.lm_data import prompt_ids  # noqa: E402

SOURCES = ["movie-sentiment", "snli", "amazon-sentiment"]
MIB = 2**20

RSS_SCRIPT = r"""
import json, sys, psutil, numpy as np, onnxruntime as ort
graphs = json.loads(sys.argv[1]); adapters = json.loads(sys.argv[2])
proc = psutil.Process(); before = proc.memory_info().rss
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.log_severity_level = 3
kept = []
for g in graphs:
    s = ort.InferenceSession(g, o, providers=["CPUExecutionProvider"]); kept.append(s)
    feeds = {"input_ids": np.array([[1, 2, 3, 4]]), "attention_mask": np.ones((1, 4), np.int64), "position_ids": np.arange(4)[None]}
    for i in s.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    runs = []
    for a in adapters or [None]:
        r = None
        if a:
            lo = ort.LoraAdapter(); lo.Load(a); kept.append(lo); r = ort.RunOptions(); r.add_active_adapter(lo)
        s.run(None, feeds, r)
print(json.dumps({"rss_mib": (proc.memory_info().rss - before) / 2**20}))
"""


def resident(graphs: list[Path], adapters: list[Path]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, json.dumps([str(g) for g in graphs]), json.dumps([str(a) for a in adapters])],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def make_adapter(work: Path, model: str, n_tasks: int, std: float) -> Path:
    import torch

    base = load_causal_lm(model)
    tasks = [f"t{i}" for i in range(n_tasks)]
    mtm = build_multitask(base, tasks, {t: [] for t in tasks}, rank=8, targets="q,k,v,o,gate,up,down", base_model=model)
    g = torch.Generator().manual_seed(0)
    cores = [c.detach().clone() for c in mtm.metatt.cores]
    cores[0] = torch.randn(cores[0].shape, generator=g) * std
    t = mtm.adapter_config.mode_names.index("task")
    cores[t] = cores[t] + torch.randn(cores[t].shape, generator=g) * 0.5
    mtm.metatt.set_cores(cores)
    return save_multitask(mtm, work / "adapter", load_tokenizer(model), force=True)


def bundle_and_exports(adapter: Path, work: Path, timings: dict[str, float] | None = None) -> tuple[Path, dict[str, Path]]:
    """``merge --factored`` of ``adapter`` into work/bundle, and per task ``merge --task`` + ``export``
    into work/onnx-TASK (each reused when already there); returns (bundle, task -> export folder)."""
    t0 = time.perf_counter()
    bundle = work / "bundle"
    if not (bundle / "bundle.json").is_file():
        merge_factored(adapter, bundle)
    t1 = time.perf_counter()
    merged: dict[str, Path] = {}
    for task in (r["task"] for r in task_records(bundle, read_bundle(bundle))):
        out = work / f"onnx-{task}"
        if not (out / "model.onnx").is_file():
            merge_adapter(adapter, work / f"merged-{task}", task=task, force=True)
            export_onnx(work / f"merged-{task}", out, force=True)
        merged[task] = out
    if timings is not None:
        timings["bundle_s"] = t1 - t0
        timings["merged_exports_s"] = time.perf_counter() - t1
    return bundle, merged


def task_parity(
    bundle: Path,
    merged: dict[str, Path],
    prompts: dict[str, list[list[int]]],
    new_tokens: int,
    forms: tuple[str, ...] = ("adapter", "tasks"),
    logits: bool = True,
) -> list[dict]:
    """Per task and bundle form, greedy generation from the factored bundle against that task's merged export.

    One row per (task, form): prompts whose ``new_tokens`` greedy tokens are identical, and with
    ``logits`` the max |logit diff| teacher-forced over the prompt plus the merged export's answer and
    the fp32 tolerance that ``export`` holds a decoder to at those logits (onnx_lm.fp32_tolerance).
    """
    generators = {form: Generator(bundle, threads=1, form=form) for form in forms}
    tok = next(iter(generators.values())).tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = []
    for task, ids in prompts.items():
        reference = load_ort_decoder(merged[task], threads=1)
        answers = [greedy(reference, p, new_tokens, eos, pad) for p in ids]
        expected = [teacher_forced_logits(reference, p + a) for p, a in zip(ids, answers)] if logits else []
        for form, gen in generators.items():
            gen.use(task)
            same = sum(gen.greedy(p, new_tokens) == until_eos(a, eos) for p, a in zip(ids, answers))
            row = {"task": task, "form": form, "prompts": len(ids), "token-identical": same}
            if logits:
                row["max abs logit diff"] = max(float(np.abs(gen.logits(p + a) - e).max()) for p, a, e in zip(ids, answers, expected))
                row["fp32 tolerance"] = fp32_tolerance(max(float(np.abs(e).max()) for e in expected))
            rows.append(row)
            print(row, flush=True)
        del reference
    return rows


def decode_time(model, ids: list[int], n: int) -> float:
    """Seconds for ``n`` forced new tokens after the prompt, less the prompt's own forward."""
    import torch

    x = torch.tensor([ids])
    t0 = time.perf_counter()
    model(input_ids=x, attention_mask=torch.ones_like(x))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None)
    return (time.perf_counter() - t0 - first) / (n - 1)


def numpy_decode_time(gen: Generator, ids: list[int], n: int) -> float:
    """Seconds per new token of the numpy decode loop after the prompt (EOS not honoured, as ``decode_time``), less the prompt's own forward."""
    t0 = time.perf_counter()
    gen.logits(ids)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = list(generate(gen.graph, ids, SamplingParams(max_tokens=n), eos_ids=(), run_options=gen.task_inputs(gen.task)[1]))
    return (time.perf_counter() - t0 - first) / (len(steps) - 2)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--model", default=DEFAULT_DECODER)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--std", type=float, default=0.02)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-mt-llm")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "reports" / "multitask-decoders-bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    adapter = args.adapter or make_adapter(work, args.model, args.tasks, args.std)
    bundle, merged = bundle_and_exports(adapter, work, timings)
    gen = Generator(bundle, threads=1)
    tasks = gen.tasks
    tok = load_tokenizer(str(base_dir(bundle, read_bundle(bundle))))  # prompts formatted as in training

    # 1. parity
    prompts = {}
    for k, task in enumerate(tasks):
        rows = load_text_task(dataset=SOURCES[k % len(SOURCES)], max_samples={"test": args.prompts}).splits["test"]
        prompts[task] = [prompt_ids(m, tok) for m in rows["messages"]]
    parity = task_parity(bundle, merged, prompts, args.new_tokens, forms=("adapter",), logits=False)
    for k, row in enumerate(parity):
        row["prompts from"] = SOURCES[k % len(SOURCES)]

    # 2. switching
    x = torch.tensor([prompt_ids([{"role": "user", "content": "word " * 28}], tok)[:32]])
    mask = torch.ones_like(x)
    fresh = Generator(bundle, threads=1)
    switch = []
    for task in tasks:
        t1 = time.perf_counter()
        fresh.use(task)
        fresh.model(input_ids=x, attention_mask=mask)
        first = time.perf_counter() - t1
        t1 = time.perf_counter()
        fresh.model(input_ids=x, attention_mask=mask)
        steady = time.perf_counter() - t1
        t1 = time.perf_counter()
        m = load_ort_decoder(merged[task], threads=1)
        m(input_ids=x, attention_mask=mask)
        cold = time.perf_counter() - t1
        switch.append(
            {
                "task": task,
                "first call after switch ms": first * 1e3,
                "steady call ms": steady * 1e3,
                "fresh merged session + call ms": cold * 1e3,
            }
        )
        del m

    # 3. decode tokens/s, round robin
    ids = x[0].tolist()
    reference = load_ort_decoder(merged[tasks[0]], threads=1)
    gen.use(tasks[0])
    times: dict[str, list[float]] = {"factored": [], "merged": []}
    for _ in range(args.repeats):
        times["factored"].append(numpy_decode_time(gen, ids, args.decode_tokens))
        times["merged"].append(decode_time(reference, ids, args.decode_tokens))
    decode = {k: statistics.median(v) for k, v in times.items()}

    # 4. disk and memory
    graph = bundle / ADAPTER_GRAPH
    task_files = {t: [bundle / "tasks" / f"{t}{s}" for s in (".onnx_adapter", ".safetensors", ".json")] for t in tasks}
    per_task = statistics.mean(sum(p.stat().st_size for p in fs) for fs in task_files.values())
    # the whole bundle (base weights once, both graphs, tokenizer, shared cores), less its own tasks' files
    shared_bytes = folder_bytes(bundle) - sum(p.stat().st_size for fs in task_files.values() for p in fs)
    merged_size = statistics.mean(sum(p.stat().st_size for p in d.iterdir() if p.is_file()) for d in merged.values())
    adapters = [bundle / "tasks" / f"{t}.onnx_adapter" for t in tasks]
    rss_f = {1: resident([graph], adapters[:1]), len(tasks): resident([graph], adapters)}
    rss_m1 = resident([merged[tasks[0]] / "model.onnx"], [])
    memory = []
    for n in (1, 3, 10):
        f_rss = rss_f.get(n, rss_f[len(tasks)])
        memory.append(
            {
                "tasks": n,
                "factored disk MiB": (shared_bytes + n * per_task) / MIB,
                "merged disk MiB": n * merged_size / MIB,
                "factored resident MiB": f_rss,
                "merged resident MiB": n * rss_m1,
                "note": "measured"
                if n in rss_f and n == 1
                else (
                    "factored measured, merged n x one"
                    if n in rss_f
                    else f"factored as {len(tasks)} tasks (+{per_task / 1024:.1f} KiB per task), merged n x one"
                ),
            }
        )
    result = {
        "parity": parity,
        "switch": switch,
        "decode_s_per_token": decode,
        "decode_ratio": decode["factored"] / decode["merged"],
        "memory": memory,
        "timings": timings,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.output}.json").write_text(json.dumps(result, indent=2))
    md = [
        f"# Factored decoder bundle vs merged exports ({args.model})\n",
        f"`python tools/bench_multitask_decoders.py {' '.join(sys.argv[1:])}`\n",
    ]
    md.append("## Parity (fp32, greedy, ORTModelForCausalLM.generate)\n\n" + markdown_table(parity))
    md.append("\n## Switching tasks (32-token prompt, 1 thread)\n\n" + markdown_table(switch, floatfmt=".1f"))
    md.append(
        f"\n## Decode (batch 1, 32-token prompt, {args.decode_tokens} forced tokens, median of {args.repeats}, 1 thread)\n\n"
        + markdown_table([{"graph": k, "ms per token": v * 1e3, "tokens/s": 1 / v} for k, v in decode.items()], floatfmt=".2f")
        + f"\n\nfactored / merged time per token: **{result['decode_ratio']:.3f}x** (target <= 1.10x)\n"
    )
    md.append("\n## Disk and resident memory\n\n" + markdown_table(memory, floatfmt=".1f"))
    Path(f"{args.output}.md").write_text("\n".join(md))
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.bar(["factored", "merged"], [1 / decode["factored"], 1 / decode["merged"]])
    a1.set(ylabel="decode tokens/s", title="decode speed, batch 1")
    n = [r["tasks"] for r in memory]
    a2.plot(n, [r["factored disk MiB"] for r in memory], "o-", label="factored disk")
    a2.plot(n, [r["merged disk MiB"] for r in memory], "o-", label="merged disk")
    a2.plot(n, [r["factored resident MiB"] for r in memory], "s--", label="factored resident")
    a2.plot(n, [r["merged resident MiB"] for r in memory], "s--", label="merged resident")
    a2.set(xlabel="tasks", ylabel="MiB", title="disk and memory", xscale="log", yscale="log")
    a2.legend()
    save_figure(fig, Path(f"{args.output}.png"))
    print(Path(f"{args.output}.md").read_text())


if __name__ == "__main__":
    main()
