"""Load test of `metatt-deploy serve` on loopback: throughput and latency, three ways of serving 3 tasks.

    python tools/load_test.py --bundle BUNDLE --merged movie=ONNX_DIR --merged snli=... --merged tweet=... \
        [--requests 600] [--big 20000] [--threads 1] [--adapter ADAPTER] [--docs docs]

Starts three servers (subprocesses on 127.0.0.1, random free ports), all behind the same HTTP
layer (serving/app.py):

  (a) cross-task   `metatt-deploy serve BUNDLE`: rows of every task share model calls (model_tasks.onnx)
  (b) per-task     `metatt-deploy serve BUNDLE --batch-per-task`: a model call takes rows of one task
  (c) merged       one merged ONNX session per task (optimum export of each task's merged model),
                   batched per task (a session serves one task)

and drives each, interleaved cell by cell, at concurrency 1, 8 and 32 with a round-robin mix of
the 3 tasks (sentences and pairs from the built-in test splits). Every cell is bounded by a
request count and a time limit and stops by itself. Every answer is checked against a direct
call of the same model on that row alone (logits within --tolerance; a wrong task or label is a
failure). Server-side batch metrics (/metrics) give rows per call and model milliseconds per row.
Then: resident memory of a server with 1 and 10 tasks (factored bundles baked with 1 and 10
tasks; 10 merged sessions), and, with --big, one long run at concurrency 32 on (a) during which a
task is hot-added through /admin. Writes docs/reports/serving-load.{md,json,png}.

Internals (what this measures lies below the public API, docs/api.md):

- metatt_deploy.adapters.multitask: copies one trained (4+1)D adapter into 10 tasks for the memory measurement; the API trains adapters, it does not reshape them.
- metatt_deploy.inference.sessions: bare ONNX Runtime sessions: the merged baseline server and the direct per-row calls every answer is checked against.
- metatt_deploy.serving.runtime: `predict`'s own input reader, so the load uses the test rows exactly as `predict` would read them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import numpy as np
import psutil
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metatt_deploy import Runtime, ServeSettings, create_app, prepare_builtins, write_bundle  # noqa: E402
from metatt_deploy.adapters.multitask import extend_tasks, load_multitask, save_multitask  # noqa: E402
from metatt_deploy.common.files import atomic_write_json, atomic_write_text  # noqa: E402
from metatt_deploy.common.report import markdown_table, save_figure  # noqa: E402
from metatt_deploy.inference.sessions import make_session, onnx_feeds  # noqa: E402
from metatt_deploy.serving.runtime import read_inputs  # noqa: E402

DATA = {"movie": "movie-sentiment", "snli": "snli", "tweet": "tweet-sentiment"}
CONCURRENCY = (1, 8, 32)
MODES = {"a": "cross-task batching", "b": "per-task batching", "c": "merged session per task"}


# ---------------------------------------------------------------- (c): one merged ONNX session per task


class MergedSessions:
    """An engine for the HTTP layer: task -> its own merged ONNX export (session + tokenizer)."""

    def __init__(self, exports: dict[str, Path], threads: int | None):
        self.tasks = list(exports)
        self.model_id = "merged:" + ",".join(self.tasks)
        self.sessions, self.tokenizers, self._labels = {}, {}, {}
        for task, folder in exports.items():
            self.sessions[task] = make_session(folder / "model.onnx", ["CPUExecutionProvider"], threads)
            self.tokenizers[task] = AutoTokenizer.from_pretrained(folder)
            config = json.loads((folder / "config.json").read_text())
            self._labels[task] = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]

    def labels(self, task: str) -> list[str]:
        return self._labels[task]

    def check(self, texts, task: str) -> None:
        """Nothing to refuse: the load test sends the test splits' own rows, in each task's own form."""

    def logits(self, texts, task=None, tasks=None) -> list[np.ndarray]:
        tasks = tasks or [task] * len(texts)
        out: list = [None] * len(texts)
        for name in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == name]
            tok = self.tokenizers[name]
            firsts = [texts[i] if isinstance(texts[i], str) else texts[i][0] for i in rows]
            seconds = [None if isinstance(texts[i], str) else texts[i][1] for i in rows]
            enc = tok(
                firsts,
                seconds if all(s is not None for s in seconds) else None,
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="np",
            )
            logits = self.sessions[name].run(["logits"], onnx_feeds(self.sessions[name], dict(enc)))[0]
            for j, i in enumerate(rows):
                out[i] = logits[j]
        return out


def serve_merged(args) -> None:
    """Subprocess entry: the HTTP layer of `serve` over MergedSessions (mode c)."""
    exports = {k: Path(v) for k, v in (m.split("=", 1) for m in args.merged)}
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=4096, cross_task=False)
    app = create_app(lambda: MergedSessions(exports, args.threads), settings)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free loopback port; `ready()` waits for /readyz, `stop()` sends SIGTERM."""

    def __init__(self, name: str, command: list[str], env: dict | None = None):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(f"/tmp/load-test-{name}-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        self.startup_s: float | None = None

    def ready(self, timeout: float = 300) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server {self.name} exited ({self.process.returncode}); see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - self.started
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"server {self.name} not ready after {timeout} s; see {self.log.name}")

    def rss_mib(self) -> float:
        proc = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server so far (its workers included): on a shared CPU, a fairer cost than wall time."""
        proc = psutil.Process(self.process.pid)
        return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values: dict[str, float] = {"server_cpu_s": self.cpu_seconds()}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in ("metatt_batch_rows_sum", "metatt_batch_rows_count", "metatt_batch_seconds_sum", "metatt_batch_tasks_sum"):
                    values[s.name] = s.value
        return values

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def serve_command(model: Path, args, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "metatt_deploy", "serve", str(model), "--threads", str(args.threads), "--max-batch", str(args.max_batch),
        "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "4096", *extra,
    ]  # fmt: skip


def merged_command(exports: dict[str, Path], args) -> list[str]:
    merged = [x for task, path in exports.items() for x in ("--merged", f"{task}={path}")]
    return [
        sys.executable, str(Path(__file__).resolve()), "--serve-merged", *merged, "--threads", str(args.threads),
        "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
    ]  # fmt: skip


# ---------------------------------------------------------------- load


def pool(tasks: list[str], per_task: int) -> list[tuple[str, object]]:
    """A round-robin mix of (task, text or pair) from the built-in test splits."""
    rows: dict[str, list] = {}
    for task in tasks:
        texts, _, _ = read_inputs(None, prepare_builtins([DATA[task]])[DATA[task]] / "test.jsonl", task)
        rows[task] = texts[:per_task]
    return [(task, rows[task][i]) for i in range(per_task) for task in tasks]


def references(engine, items: list[tuple[str, object]]) -> list[np.ndarray]:
    """Each row alone through the engine: what a correct, correctly routed answer must be."""
    return [engine.logits([text], tasks=[task])[0] for task, text in items]


async def drive(url: str, items, refs, concurrency: int, requests: int, seconds: float, tolerance: float, on_start=None) -> dict:
    """``requests`` requests (or until ``seconds`` pass) by ``concurrency`` clients; every answer checked."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    wrong = 0
    max_diff = 0.0
    next_i = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal next_i, wrong, max_diff
        while next_i < requests and time.monotonic() < deadline:
            i = next_i
            next_i += 1
            task, text = items[i % len(items)]
            body = {"task": task, "texts": [list(text) if isinstance(text, tuple) else text], "return_logits": True}
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/classify", json=body)
                code = r.status_code
            except httpx.HTTPError:
                code = 0  # lost: no answer at all
            latencies.append(time.perf_counter() - t0)
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                answer = r.json()
                got = np.asarray(answer["predictions"][0]["logits"])
                ref = refs[i % len(items)]
                diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
                max_diff = max(max_diff, diff)
                wrong += answer["task"] != task or diff > tolerance

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        started = time.perf_counter()
        workers = [asyncio.ensure_future(client(c)) for _ in range(concurrency)]
        if on_start is not None:
            await on_start(c)
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "codes": codes, "wrong": wrong, "max_diff": max_diff, "seconds": elapsed}


def summarize(parts: list[dict]) -> dict:
    """One cell from its rounds: counts summed, throughput over the summed time, percentiles over every request."""
    lat = np.array([x for p in parts for x in p["latencies"]]) * 1000
    codes: dict[int, int] = {}
    for p in parts:
        for k, n in p["codes"].items():
            codes[k] = codes.get(k, 0) + n
    seconds = sum(p["seconds"] for p in parts)
    return {
        "requests": len(lat),
        "ok": codes.get(200, 0),
        "5xx": sum(n for k, n in codes.items() if k >= 500),
        "lost": codes.get(0, 0),
        "other": sum(n for k, n in codes.items() if k not in (0, 200) and k < 500),
        "wrong_or_misrouted": sum(p["wrong"] for p in parts),
        "max_abs_logit_diff": max(p["max_diff"] for p in parts),
        "seconds": seconds,
        "throughput_rps": len(lat) / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


BATCH_SAMPLES = ("metatt_batch_rows_count", "metatt_batch_rows_sum", "metatt_batch_seconds_sum", "metatt_batch_tasks_sum", "server_cpu_s")


def batch_delta(before: dict, after: dict, into: dict | None = None) -> dict:
    """Batch metric increments between two scrapes, added to ``into``."""
    into = into if into is not None else {}
    for k in BATCH_SAMPLES:
        into[k] = into.get(k, 0.0) + after.get(k, 0.0) - before.get(k, 0.0)
    return into


def batch_stats(delta: dict) -> dict:
    calls, rows = delta["metatt_batch_rows_count"], delta["metatt_batch_rows_sum"]
    return {
        "rows_per_call": rows / calls if calls else 0.0,
        "tasks_per_call": delta["metatt_batch_tasks_sum"] / calls if calls else 0.0,
        "model_ms_per_row": 1000 * delta["metatt_batch_seconds_sum"] / rows if rows else 0.0,
        "server_cpu_ms_per_row": 1000 * delta["server_cpu_s"] / rows if rows else 0.0,
    }


# ---------------------------------------------------------------- bundles for the memory probe


def grown_adapter(adapter: Path, work: Path, total: int) -> Path:
    """The adapter with tasks added (random task slices and heads) up to ``total`` tasks: same shared cores, same bundle id."""
    out = work / f"adapter-{total}"
    if out.exists():
        return out
    mtm, config, tokenizer = load_multitask(adapter)
    g = torch.Generator().manual_seed(0)
    t_core = config.mode_names.index("task")
    for k in range(len(config.tasks), total):
        t = extend_tasks(mtm, f"extra{k}", ["negative", "positive"], seed=k)
        with torch.no_grad():
            mtm.metatt.cores[t_core][:, t] += 0.05 * torch.randn(mtm.metatt.cores[t_core][:, t].shape, generator=g)
    return save_multitask(mtm, out, tokenizer)


def memory_probe(args, work: Path, exports: dict[str, Path]) -> list[dict]:
    """RSS of a warm server (every task answered once) with 1 and 10 tasks, factored vs merged."""
    ten = grown_adapter(args.adapter, work, 10)
    names = [*exports]
    bundles = {1: work / "bundle-1", 10: work / "bundle-10"}
    if not bundles[1].exists():
        write_bundle(args.adapter, bundles[1], tasks=[names[0]])
    if not bundles[10].exists():
        write_bundle(ten, bundles[10])
    rows = []
    for n, bundle in bundles.items():
        server = Server(f"mem-factored-{n}", serve_command(bundle, args)).ready()
        tasks = [t["name"] for t in httpx.get(f"{server.url}/v1/tasks").json()["tasks"]]
        for t in tasks:
            httpx.post(f"{server.url}/v1/classify", json={"task": t, "texts": ["a warm-up text of a few words"] * 8}, timeout=60)
        rows.append({"serving": "factored bundle", "tasks": n, "rss_mib": server.rss_mib()})
        server.stop()
    for n in (1, 10):
        chosen = {f"t{k}": exports[names[k % len(names)]] for k in range(n)}  # sessions of the same size, as many as tasks
        server = Server(f"mem-merged-{n}", merged_command(chosen, args)).ready()
        for t in chosen:
            httpx.post(f"{server.url}/v1/classify", json={"task": t, "texts": ["a warm-up text of a few words"] * 8}, timeout=60)
        rows.append({"serving": "merged sessions", "tasks": n, "rss_mib": server.rss_mib()})
        server.stop()
    for r in rows:
        one = next(x["rss_mib"] for x in rows if x["serving"] == r["serving"] and x["tasks"] == 1)
        r["vs_1_task"] = r["rss_mib"] / one
    print("memory", rows, flush=True)
    return rows


# ---------------------------------------------------------------- report


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for k, mode in enumerate(MODES):
        mine = [c for c in cells if c["mode"] == mode]
        x = np.arange(len(mine)) + (k - 1) * width
        axes[0].bar(x, [c["throughput_rps"] for c in mine], width, label=f"({mode}) {MODES[mode]}")
        axes[1].bar(x, [c["p99_ms"] for c in mine], width, label=f"({mode}) {MODES[mode]}")
    for ax, title in zip(axes, ("throughput (requests/s)", "p99 latency (ms)")):
        ax.set_xticks(range(len(CONCURRENCY)), [f"concurrency {c}" for c in CONCURRENCY])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("metatt-deploy serve, 3 tasks, loopback")
    save_figure(fig, path)


def targets(result: dict) -> list[dict]:
    """The issue's targets next to what this run measured (met: yes/no)."""
    rows = []
    for r in result["ratios"]:
        if r["concurrency"] in (8, 32):
            rows.append(
                {
                    "target": f"cross-task >= per-task throughput, concurrency {r['concurrency']}",
                    "measured": f"{r['a/b throughput']:.2f}x",
                    "met": r["a/b throughput"] >= 1,
                }
            )
            rows.append(
                {
                    "target": f"cross-task > merged sessions throughput, concurrency {r['concurrency']}",
                    "measured": f"{r['a/c throughput']:.2f}x",
                    "met": r["a/c throughput"] > 1,
                }
            )
    bound = result["p99_c8_bound_ms"]
    rows.append(
        {
            "target": "p99 at concurrency 8 <= 2 x p50 at concurrency 1 + max wait (a)",
            "measured": f"{result['p99_c8_ms']:.1f} ms vs {bound:.1f} ms",
            "met": result["p99_c8_ms"] <= bound,
        }
    )
    for m in result.get("memory") or []:
        if m["tasks"] == 10:
            limit = 1.15 if m["serving"] == "factored bundle" else None
            rows.append(
                {
                    "target": f"memory 10 tasks / 1 task, {m['serving']}" + (" <= 1.15x" if limit else ""),
                    "measured": f"{m['vs_1_task']:.2f}x",
                    "met": (m["vs_1_task"] <= limit) if limit else "",
                }
            )
    big = result.get("big")
    if big:
        bad = big["5xx"] + big["lost"] + big["wrong_or_misrouted"]
        rows.append(
            {
                "target": f"{big['requests']} requests at concurrency 32: no 5xx, lost or misrouted answer",
                "measured": f"{big['5xx']} / {big['lost']} / {big['wrong_or_misrouted']}",
                "met": bad == 0,
            }
        )
        if "hot_add" in big:
            rows.append(
                {
                    "target": "hot add under load: 0 failed requests",
                    "measured": f"{big['requests'] - big['ok']} failed; {big['hot_add']}",
                    "met": big["requests"] == big["ok"],
                }
            )
    for r in rows:
        if isinstance(r["met"], bool):
            r["met"] = "yes" if r["met"] else "NO"
    return rows


def write_report(result: dict, docs: Path) -> None:
    cells = result["cells"]
    columns = ["mode", "concurrency", "requests", "ok", "5xx", "lost", "wrong_or_misrouted", "throughput_rps", "p50_ms", "p95_ms", "p99_ms",
               "rows_per_call", "tasks_per_call", "model_ms_per_row", "server_cpu_ms_per_row"]  # fmt: skip
    lines = [
        "# Load test: `metatt-deploy serve` with 3 tasks",
        "",
        f"Generated by `{result['command']}` on {result['date']} ({result['machine']}; 1-minute load average "
        f"{result['load_average_start']:.1f} at the start, {result['load_average_end']:.1f} at the end: other jobs shared the CPU).",
        "",
        f"Model: `{result['model']}` ({result['bundle_id'][:12]}), tasks {', '.join(result['tasks'])}; ONNX Runtime CPU, {result['threads']} intra-op "
        f"thread(s) per server; `--max-batch {result['max_batch']} --max-wait-ms {result['max_wait_ms']:g}`. Inputs: the built-in test splits "
        "(sentences and sentence pairs, a round-robin mix of the 3 tasks), one text per request. Each answer is checked against a direct "
        f"call of the same model on that row alone (max |logit diff| <= {result['tolerance']:g}, right task); a failed check counts as "
        f"wrong_or_misrouted. Each cell ran in {result['rounds']} chunks, the modes interleaved chunk by chunk (a, b, c at concurrency 1, 8, 32, then again), so drift in the machine's load hits all three alike.",
        "",
        "Modes, all behind the same HTTP layer: " + "; ".join(f"({k}) {v}" for k, v in MODES.items()) + ".",
        "`rows_per_call`, `tasks_per_call` and `model_ms_per_row` (tokenize + ONNX Runtime, per row) come from the servers' /metrics; "
        "`server_cpu_ms_per_row` is the server process's user + system CPU time per row (psutil), the cost that a shared CPU does not blur.",
        "",
        markdown_table(cells, columns, floatfmt=".1f"),
        "## Ratios (throughput; p99)",
        "",
        markdown_table(result["ratios"], floatfmt=".2f"),
        "## Resident memory of a warm server",
        "",
        markdown_table(result["memory"], floatfmt=".2f") if result.get("memory") else "not measured (no --adapter)\n",
        "## Long run",
        "",
        markdown_table([result["big"]], floatfmt=".1f") if result.get("big") else "not run (no --big)\n",
        "## Targets (issue 13), as measured in this run",
        "",
        markdown_table(targets(result), floatfmt=".2f"),
        "## Startup (process start to /readyz 200)",
        "",
        markdown_table([{"server": k, "seconds": v} for k, v in result["startup_s"].items()], floatfmt=".1f"),
    ]
    atomic_write_text(docs / "serving-load.md", "\n".join(lines))
    atomic_write_json(docs / "serving-load.json", result)
    plot(cells, docs / "serving-load.png")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="factored bundle of the 3 tasks (merge --factored)")
    parser.add_argument(
        "--merged", action="append", default=[], help="TASK=DIR: a task's merged ONNX export (metatt-deploy export); repeat per task"
    )
    parser.add_argument(
        "--adapter", type=Path, help="the bundle's adapter: enables the memory probe (1 vs 10 tasks) and the hot add in --big"
    )
    parser.add_argument("--requests", type=int, default=600, help="requests per cell (mode x concurrency)")
    parser.add_argument("--cell-seconds", type=float, default=120, help="time limit per cell (all rounds together)")
    parser.add_argument("--rounds", type=int, default=4, help="each cell runs in this many chunks, the modes interleaved chunk by chunk")
    parser.add_argument("--big", type=int, default=0, help="requests of the long run at concurrency 32 on (a) (0: skip)")
    parser.add_argument("--big-seconds", type=float, default=600)
    parser.add_argument("--pool", type=int, default=100, help="distinct inputs per task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/load-test-work"))
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "reports")
    parser.add_argument("--serve-merged", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_merged:
        serve_merged(args)
        return
    if not args.bundle or len(args.merged) < 1:
        parser.error("--bundle and --merged TASK=DIR (per task) are required")
    exports = {k: Path(v) for k, v in (m.split("=", 1) for m in args.merged)}
    args.work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]

    runtime = Runtime(args.bundle, threads=args.threads)
    if sorted(runtime.tasks) != sorted(exports):
        parser.error(f"--merged must name the bundle's tasks {runtime.tasks}")
    items = pool(runtime.tasks, args.pool)
    refs = {"a": references(runtime, items)}
    refs["b"] = refs["a"]
    refs["c"] = references(MergedSessions(exports, args.threads), items)
    print(f"{len(items)} distinct inputs, references computed", flush=True)

    servers = {
        "a": Server("a", serve_command(args.bundle, args)),
        "b": Server("b", serve_command(args.bundle, args, "--batch-per-task")),
        "c": Server("c", merged_command(exports, args)),
    }
    cells = []
    result: dict = {}
    try:
        for s in servers.values():
            s.ready()
        parts: dict = {(m, c): [] for c in CONCURRENCY for m in servers}
        deltas: dict = {(m, c): {} for c in CONCURRENCY for m in servers}
        chunk = -(-args.requests // args.rounds)
        for r in range(args.rounds):  # rounds interleave the modes, so drift in the machine's load hits all three alike
            for concurrency in CONCURRENCY:
                for mode, server in servers.items():
                    before = server.metrics()
                    part = asyncio.run(
                        drive(server.url, items, refs[mode], concurrency, chunk, args.cell_seconds / args.rounds, args.tolerance)
                    )
                    parts[mode, concurrency].append(part)
                    batch_delta(before, server.metrics(), deltas[mode, concurrency])
                    print(f"round {r + 1}: ({mode}) c={concurrency}: {len(part['latencies']) / part['seconds']:.1f} req/s", flush=True)
        for concurrency in CONCURRENCY:
            for mode in servers:
                cell = {
                    "mode": mode,
                    "concurrency": concurrency,
                    **summarize(parts[mode, concurrency]),
                    **batch_stats(deltas[mode, concurrency]),
                }
                print(cell, flush=True)
                cells.append(cell)
        rss = {f"({m}) 3 tasks": s.rss_mib() for m, s in servers.items()}
        startup = {f"({m}) {MODES[m]}": s.startup_s for m, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()

    def cell(mode, c):
        return next(x for x in cells if x["mode"] == mode and x["concurrency"] == c)

    ratios = [
        {
            "concurrency": c,
            "a/b throughput": cell("a", c)["throughput_rps"] / cell("b", c)["throughput_rps"],
            "a/c throughput": cell("a", c)["throughput_rps"] / cell("c", c)["throughput_rps"],
            "a/b p99": cell("a", c)["p99_ms"] / cell("b", c)["p99_ms"],
            "a/c p99": cell("a", c)["p99_ms"] / cell("c", c)["p99_ms"],
            "a/b server CPU per row": cell("a", c)["server_cpu_ms_per_row"] / cell("b", c)["server_cpu_ms_per_row"],
        }
        for c in CONCURRENCY
    ]
    p99_c8_bound = 2 * cell("a", 1)["p50_ms"] + args.max_wait_ms
    result.update(
        {
            "command": "python tools/load_test.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs",
            "load_average_start": load_start,
            "model": runtime.info["base_model"],
            "bundle_id": runtime.info["bundle_id"],
            "tasks": runtime.tasks,
            "threads": args.threads,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "tolerance": args.tolerance,
            "rounds": args.rounds,
            "cells": cells,
            "ratios": ratios,
            "p99_c8_ms": cell("a", 8)["p99_ms"],
            "p99_c8_bound_ms": p99_c8_bound,
            "rss_mib_3_tasks": rss,
            "startup_s": startup,
        }
    )
    if args.adapter:
        result["memory"] = memory_probe(args, args.work, exports)
    if args.big:
        result["big"] = big_run(args, items, refs["a"])
    result["load_average_end"] = os.getloadavg()[0]
    write_report(result, args.docs)
    print(f"wrote {args.docs / 'serving-load.md'}", flush=True)


def big_run(args, items, refs) -> dict:
    """The long run on (a) at concurrency 32; with --adapter, a task is hot-added a few seconds in."""
    bundle = args.work / "bundle-hot"
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(args.bundle, bundle)
    token = secrets.token_hex(8)
    server = Server("big", serve_command(bundle, args), env={"METATT_ADMIN_TOKEN": token}).ready()
    added: dict = {}

    async def hot_add(c: httpx.AsyncClient) -> None:
        if not args.adapter:
            return
        await asyncio.sleep(5)
        n = len({t for t, _ in items})
        grown = await asyncio.to_thread(grown_adapter, args.adapter, args.work, n + 1)
        name = f"extra{n}"
        await asyncio.to_thread(write_bundle, grown, bundle, tasks=[name])
        t0 = time.perf_counter()
        r = await c.post(f"/admin/tasks/{name}", headers={"Authorization": f"Bearer {token}"})
        added.update({"task": name, "status": r.status_code, "add_seconds": time.perf_counter() - t0})
        r = await c.post("/v1/classify", json={"task": name, "texts": ["a new task answers"]})
        added["first_request_status"] = r.status_code

    try:
        before = server.metrics()
        part = asyncio.run(drive(server.url, items, refs, 32, args.big, args.big_seconds, args.tolerance, on_start=hot_add))
        out = {"mode": "a", "concurrency": 32, **summarize([part]), **batch_stats(batch_delta(before, server.metrics()))}
        if added:
            out["hot_add"] = (
                f"{added['task']}: HTTP {added['status']} in {added['add_seconds']:.2f} s, first request {added['first_request_status']}"
            )
    finally:
        server.stop()
    print("big", out, flush=True)
    return out


if __name__ == "__main__":
    main()
