"""Load test of the OpenAI-compatible generation server: continuous batching across tasks against today's path.

    python tools/load_test_llm.py [--bundle runs/llm-load/bundle] [--concurrency 1,4,8,16] [--requests 2] \
        [--max-tokens 24] [--threads 2] [--long-requests 2000] [--output docs/reports/serving-llm-load]

Without --bundle's folder, a 3-task MetaTT-(4+1)D adapter on the embedded SmolLM2-135M-Instruct is
made with random cores (as tools/bench_multitask_decoders.py does; speed does not depend on
training) and merged into a factored bundle. Then `metatt-deploy serve BUNDLE` runs as a
subprocess and, at each concurrency C, closed-loop clients (C at a time, C x --requests requests,
streamed chat completions, greedy, --max-tokens each) run three loads, interleaved, after one untimed
warm-up round of every task and prompt:

- mixed: request i asks task i mod 3;
- single: every request asks the first task;
- today: one `Generator.steps` call per request (the `generate` verb's path, no server), one at a
  time, which is all today's path can do whatever the concurrency.

Per load: aggregate generated tokens/s (completion tokens over wall time), p50/p95 time to first
token (client side, first content chunk), 5xx and lost requests. Then the long run: --long-requests
short greedy text completions (--long-max-tokens, concurrency --long-concurrency, tasks mixed)
whose answers are compared with the same requests decoded alone beforehand.

Writes OUTPUT.md, OUTPUT.json and OUTPUT.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from servers import free_port, wait_ready  # noqa: E402

from metatt_deploy import Generator, LLMSettings, SamplingParams  # noqa: E402
from metatt_deploy.common.report import markdown_table, save_figure  # noqa: E402

PROMPTS = [
    "Write a short review of a film you liked.",
    "Is this review positive or negative? 'The plot was dull and the acting worse.'",
    "Summarize in one sentence: the city council approved a new park near the river.",
    "Give three tips for learning a new language.",
    "Premise: a man is playing a guitar. Hypothesis: a person makes music. Entailment or contradiction?",
    "Describe the taste of a lemon to someone who has never had one.",
    "What is the capital of France, and why is it famous?",
    "Translate to French: good morning, how are you?",
]
TARGET_HEAD = ["figure", "target", "measured", "verdict"]
LONG_PROMPTS = ["The weather today", "My favourite food is", "Once upon a time", "The best way to learn", "In the morning I", "Music makes"]


def make_bundle(path: Path) -> Path:
    """A factored 3-task SmolLM2 bundle with random cores (training stack imported only here)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_multitask_decoders import make_adapter

    from metatt_deploy import DEFAULT_DECODER, merge_factored

    adapter = make_adapter(path.parent, DEFAULT_DECODER, 3, 0.02)
    merge_factored(adapter, path)
    return path


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


async def one_chat(client: httpx.AsyncClient, task: str, prompt: str, max_tokens: int) -> dict:
    """A streamed chat completion: (status, ttft, completion tokens, text)."""
    body = {"model": task, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    ttft, text, tokens, status = None, "", 0, 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    status = 500
                    break
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content")
                    if piece and ttft is None:
                        ttft = time.perf_counter() - started
                    text += piece or ""
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.TransportError:
        status = -1  # lost
    return {"status": status, "ttft": ttft if ttft is not None else time.perf_counter() - started, "tokens": tokens, "text": text}


async def closed_loop(url: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    """Run ``jobs`` (task, prompt) with ``concurrency`` clients, each sending its next request when the last is answered."""
    queue = list(enumerate(jobs))
    results: list[dict] = [{} for _ in jobs]

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i, (task, prompt) = queue.pop(0)
            results[i] = await one_chat(client, task, prompt, max_tokens)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return results, time.perf_counter() - started


def today(gen: Generator, jobs: list[tuple[str, str]], max_tokens: int) -> tuple[list[dict], float]:
    """One Generator.steps call per request, one after another: the path `generate` takes today."""
    results = []
    started = time.perf_counter()
    for task, prompt in jobs:
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        for step in gen.steps(gen.encode(prompt), SamplingParams(max_tokens=max_tokens), task):
            tokens += step.token_id is not None
            if step.text and ttft is None:  # as the clients count it: the first piece of text
                ttft = time.perf_counter() - t0
        results.append({"status": 200, "ttft": ttft or time.perf_counter() - t0, "tokens": tokens, "text": ""})
    return results, time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the server process so far: the cost per token that a shared CPU does not blur."""
    return sum(psutil.Process(pid).cpu_times()[:2])


def summary(results: list[dict], seconds: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_s": percentile([r["ttft"] for r in ok], 50),
        "ttft_p95_s": percentile([r["ttft"] for r in ok], 95),
        "errors_5xx": sum(r["status"] >= 500 for r in results),
        "lost": sum(r["status"] in (-1, 0) for r in results),
    }


async def long_run(url: str, jobs: list[tuple[str, str, int]], concurrency: int) -> tuple[list[tuple[int, str]], float]:
    """Greedy text completions, closed loop; (status, text) per job."""
    queue = list(enumerate(jobs))
    out: list[tuple[int, str]] = [(0, "")] * len(jobs)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i, (task, prompt, n) = queue.pop(0)
            try:
                r = await client.post("/v1/completions", json={"model": task, "prompt": prompt, "max_tokens": n, "temperature": 0})
                out[i] = (r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else "")
            except httpx.TransportError:
                out[i] = (-1, "")

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "runs" / "llm-load" / "bundle")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each concurrency (C x this in all)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--max-tokens-per-step", type=int, default=LLMSettings.max_tokens_per_step)
    parser.add_argument("--long-requests", type=int, default=0)
    parser.add_argument("--long-max-tokens", type=int, default=4)
    parser.add_argument("--long-concurrency", type=int, default=16)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "reports" / "serving-llm-load")
    args = parser.parse_args()

    bundle = args.bundle if (args.bundle / "bundle.json").is_file() else make_bundle(args.bundle)
    gen = Generator(bundle, threads=args.threads, form="tasks")
    tasks = list(gen.tasks)
    levels = [int(c) for c in args.concurrency.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "metatt_deploy", "serve", str(bundle), "--port", str(port), "--threads", str(args.threads)]
    command += ["--max-running", str(args.max_running), "--max-tokens-per-step", str(args.max_tokens_per_step), "--max-queue", "4096"]
    server = subprocess.Popen(
        command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    rows: list[dict] = []
    long: dict = {}
    try:
        wait_ready(url, 600, server)
        # untimed: every task and prompt once, at the highest level, so that the first measured cell does not
        # pay ONNX Runtime's first runs of each batch shape (arena growth, kernel choice) for the others
        asyncio.run(closed_loop(url, [(t, p) for t in tasks for p in PROMPTS], max(levels), args.max_tokens))
        for c in levels:
            n = c * args.requests
            mixed_jobs = [(tasks[i % len(tasks)], PROMPTS[i % len(PROMPTS)]) for i in range(n)]
            single_jobs = [(tasks[0], PROMPTS[i % len(PROMPTS)]) for i in range(n)]
            for load, jobs in (("mixed", mixed_jobs), ("single", single_jobs)):
                cpu = cpu_seconds(server.pid)
                results, seconds = asyncio.run(closed_loop(url, jobs, c, args.max_tokens))
                row = {"concurrency": c, "load": load, **summary(results, seconds)}
                row["server_cpu_ms_per_token"] = 1000 * (cpu_seconds(server.pid) - cpu) / max(row["tokens"], 1)
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)
            results, seconds = today(gen, mixed_jobs[: max(2, min(n, 4))], args.max_tokens)
            rows.append({"concurrency": c, "load": "today", **summary(results, seconds)})
            print(json.dumps(rows[-1]), flush=True)
        if args.long_requests:
            distinct = [
                (tasks[i % len(tasks)], LONG_PROMPTS[i % len(LONG_PROMPTS)], args.long_max_tokens) for i in range(3 * len(LONG_PROMPTS))
            ]
            alone = {
                job: "".join(s.text for s in gen.steps(gen.encode(job[1], raw=True), SamplingParams(max_tokens=job[2]), job[0]))
                for job in distinct
            }
            jobs = [distinct[(i * 7) % len(distinct)] for i in range(args.long_requests)]
            out, seconds = asyncio.run(long_run(url, jobs, args.long_concurrency))
            long = {
                "requests": len(jobs),
                "concurrency": args.long_concurrency,
                "max_tokens": args.long_max_tokens,
                "seconds": seconds,
                "errors_5xx": sum(code >= 500 for code, _ in out),
                "lost": sum(code in (-1, 0) for code, _ in out),
                "differing": sum(code == 200 and text != alone[job] for (code, text), job in zip(out, jobs)),
                "other_status": sum(code not in (200, -1, 0) and code < 500 for code, _ in out),
            }
            print(json.dumps(long), flush=True)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        server.terminate()
        try:
            server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    write_report(args, rows, long, metrics)


def write_report(args: argparse.Namespace, rows: list[dict], long: dict, metrics: str) -> None:
    def at(c: int, load: str) -> dict:
        return next(r for r in rows if r["concurrency"] == c and r["load"] == load)

    levels = sorted({r["concurrency"] for r in rows})
    table = [
        [
            c,
            f"{at(c, 'mixed')['tokens_per_s']:.1f}",
            f"{at(c, 'single')['tokens_per_s']:.1f}",
            f"{at(c, 'today')['tokens_per_s']:.1f}",
            f"{at(c, 'mixed')['tokens_per_s'] / at(c, 'single')['tokens_per_s']:.2f}",
            f"{at(c, 'mixed')['tokens'] / at(c, 'mixed')['requests']:.1f} / {at(c, 'single')['tokens'] / at(c, 'single')['requests']:.1f}",
            f"{at(c, 'mixed')['server_cpu_ms_per_token']:.0f} / {at(c, 'single')['server_cpu_ms_per_token']:.0f}",
            f"{at(c, 'mixed')['tokens_per_s'] / at(c, 'today')['tokens_per_s']:.2f}",
            f"{at(c, 'mixed')['ttft_p50_s']:.2f} / {at(c, 'mixed')['ttft_p95_s']:.2f}",
            f"{at(c, 'single')['ttft_p50_s']:.2f}",
            sum(at(c, k)["errors_5xx"] + at(c, k)["lost"] for k in ("mixed", "single")),
        ]
        for c in levels
    ]
    head = [
        "concurrency",
        "mixed tok/s",
        "single tok/s",
        "today tok/s",
        "mixed/single",
        "tokens per answer mixed/single",
        "server CPU ms per token mixed/single",
        "mixed/today",
        "TTFT p50/p95 mixed (s)",
        "TTFT p50 single (s)",
        "5xx+lost",
    ]
    targets = []
    if 1 in levels and 8 in levels:
        throughput = at(8, "mixed")["tokens_per_s"] / at(1, "mixed")["tokens_per_s"]
        ttft = at(8, "mixed")["ttft_p50_s"] / at(1, "mixed")["ttft_p50_s"]
        worst = min(at(c, "mixed")["tokens_per_s"] / at(c, "single")["tokens_per_s"] for c in levels)
        targets = [
            [
                "aggregate tokens/s, concurrency 8 (mixed) / concurrency 1",
                ">= 3x",
                f"{throughput:.2f}x",
                "met" if throughput >= 3 else "missed",
            ],
            ["p50 TTFT concurrency 8 / concurrency 1", "<= 4x", f"{ttft:.2f}x", "met" if ttft <= 4 else "missed"],
            ["mixed-task tokens/s / single-task (worst level)", ">= 0.9x", f"{worst:.2f}x", "met" if worst >= 0.9 else "missed"],
        ]
    if long:
        ok = long["requests"] >= 2000 and long["errors_5xx"] == 0 and long["lost"] == 0 and long["differing"] == 0
        targets.append(
            [
                f"long run ({long['requests']} requests)",
                ">= 2,000, 0 5xx, 0 lost, 0 differing",
                f"{long['errors_5xx']} 5xx, {long['lost']} lost, {long['differing']} differing",
                "met" if ok else "missed",
            ]
        )
    step_rows = [
        line
        for line in metrics.splitlines()
        if line.startswith("metatt_llm_step_rows_") and not line.startswith("metatt_llm_step_rows_bucket")
    ]
    lines = [
        "# Serving decoders: continuous batching across tasks (load test)",
        "",
        f"`python tools/load_test_llm.py --concurrency {args.concurrency} --requests {args.requests} --max-tokens {args.max_tokens} "
        f"--threads {args.threads} --max-running {args.max_running} --max-tokens-per-step {args.max_tokens_per_step}"
        + (
            f" --long-requests {args.long_requests} --long-max-tokens {args.long_max_tokens} --long-concurrency {args.long_concurrency}"
            if long
            else ""
        )
        + "`",
        "",
        "SmolLM2-135M-Instruct, a factored 3-task MetaTT-(4+1)D bundle (random cores), fp32, ONNX Runtime CPU, "
        f"{args.threads} intra-op threads, on a 2-core machine shared with other jobs (so absolute figures are noisy). "
        f"Closed-loop clients, C x {args.requests} streamed greedy chat completions of {args.max_tokens} new tokens at most per level; "
        "mixed and single-task loads and today's path run interleaved at each level. Today's path is one `Generator.steps` call per "
        "request, one at a time (a few requests, the same prompts): it cannot serve concurrent requests at all, so its rate is the same at every level.",
        "",
        markdown_table([dict(zip(head, r)) for r in table], head),
        "",
        "## Targets",
        "",
        markdown_table([dict(zip(TARGET_HEAD, t)) for t in targets], TARGET_HEAD) if targets else "(needs concurrency 1 and 8)",
        "",
    ]
    if long:
        lines += [
            "## Long run",
            "",
            f"{long['requests']} greedy text completions ({long['max_tokens']} new tokens at most, 18 distinct requests over the 3 tasks), "
            f"concurrency {long['concurrency']}, in {long['seconds']:.0f} s: {long['errors_5xx']} 5xx, {long['lost']} lost, "
            f"{long['differing']} answers differing from the same request decoded alone, {long['other_status']} other non-200.",
            "",
        ]
    lines += ["## Rows per decode step (server metrics over the whole run)", "", "```", *step_rows, "```", ""]
    lines += ["What the figures mean, and why a missed target was missed: [serving-llm.md](../serving-llm.md#measured).", ""]
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "long": long}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for load, style in (("mixed", "o-"), ("single", "s--"), ("today", "x:")):
        left.plot(levels, [at(c, load)["tokens_per_s"] for c in levels], style, label=load)
        right.plot(levels, [at(c, load)["ttft_p50_s"] for c in levels], style, label=load)
    left.set(xlabel="concurrent clients", ylabel="generated tokens/s", title="throughput")
    right.set(xlabel="concurrent clients", ylabel="p50 time to first token (s)", title="time to first token")
    left.legend()
    right.legend()
    save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
