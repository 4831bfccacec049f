"""What a deployment costs from a cold start: the runtime install against a raw ONNX Runtime script.

    python tools/bench_cold_start.py [--export exported/minilm-movie-sentiment] [--lean .venv-lean] [--full .venv]
        [--decoder EXPORT] [--runs 7] [--output docs/reports/cold-start]

Every figure is measured side by side in one run, the commands interleaved pair by pair (A B A B
...), so a drift of the shared machine's speed hits both; medians are reported, with CPU seconds
(user + system, robust on a shared machine) next to wall time. Peak memory is the process's own
maximum resident set (``wait4``'s rusage), so it is per run, not per session.

- the runtime install: site-packages of the lean venv (``pip install .``, made by ``make setup``)
  against the full venv's (``[train,dev,ray,genai]``);
- ``metatt-deploy predict EXPORT --text x`` from the lean venv against ``RAW_SCRIPT`` (onnxruntime +
  tokenizers + numpy, the least a deployment can do) on the same export;
- ``metatt-deploy serve EXPORT``: process start to the first ``/readyz`` 200, and the server's
  resident memory once warm (after 20 requests);
- with ``--decoder``: decode tokens/s of the numpy loop (``Generator``) against optimum's
  ``ORTModelForCausalLM.generate`` on the same export, greedy, same prompts and lengths (full venv).

Writes OUTPUT.md and OUTPUT.json.

Internals (what this measures lies below the public API, docs/api.md):

- metatt_deploy.export.decoder_runs: optimum's ORTModelForCausalLM on the export, the baseline the numpy loop is timed against; a comparison harness, not something a deployment calls.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metatt_deploy.common.files import atomic_write_json, atomic_write_text  # noqa: E402
from metatt_deploy.common.report import markdown_table  # noqa: E402

RAW_SCRIPT = """
import sys
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

folder, text = sys.argv[1], sys.argv[2]
tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")
tokenizer.enable_truncation(128)
encoding = tokenizer.encode(text)
session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
arrays = {"input_ids": encoding.ids, "attention_mask": encoding.attention_mask, "token_type_ids": encoding.type_ids}
logits = session.run(["logits"], {i.name: np.array([arrays[i.name]], dtype=np.int64) for i in session.get_inputs()})[0][0]
p = np.exp(logits - logits.max())
print(int(p.argmax()), float(p.max() / p.sum()))
"""
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three colours.", "Is this review positive? A fine film."]


def run_measured(command: list[str], cwd: Path) -> dict:
    """One run of ``command``: wall seconds, CPU seconds (user + system) and peak RSS (MiB) of that process alone."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stderr = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {stderr.strip()[-400:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def paired(a: list[str], b: list[str], runs: int, cwd: Path) -> dict:
    """A and B interleaved (one warm-up each), medians of each figure and of the per-pair ratios A/B."""
    run_measured(a, cwd), run_measured(b, cwd)
    rows = [(run_measured(a, cwd), run_measured(b, cwd)) for _ in range(runs)]
    out: dict = {}
    for key in ("wall_s", "cpu_s", "peak_rss_mib"):
        out[key] = {
            "a": statistics.median(r[0][key] for r in rows),
            "b": statistics.median(r[1][key] for r in rows),
            "ratio": statistics.median(r[0][key] / r[1][key] for r in rows),
        }
    return out


def site_packages_mib(venv: Path) -> float:
    total = 0
    for folder in venv.glob("lib/python*/site-packages"):
        total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return total / 2**20


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn may fork), from /proc."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.is_file():
        pids += [int(c) for c in children.read_text().split()]
    total = 0
    for p in pids:
        status = Path(f"/proc/{p}/status")
        if status.is_file():
            line = next((x for x in status.read_text().splitlines() if x.startswith("VmRSS:")), "VmRSS: 0 kB")
            total += int(line.split()[1])
    return total / 1024


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_once(binary: Path, export: Path, cwd: Path, port: int) -> dict:
    """Seconds (wall, and the server's CPU) from process start to /readyz 200, then RSS after 20 requests; stopped with SIGTERM.

    On a shared machine the wall time waits for cores other jobs hold; the CPU seconds do not.
    """
    url = f"http://127.0.0.1:{port}"
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(binary), "serve", str(export), "--port", str(port)], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(
                    f"serve exited with {process.returncode}: {process.stderr.read().decode()[-400:] if process.stderr else ''}"
                )
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > 120:
                raise SystemExit("serve was not ready after 120 s")
            time.sleep(0.02)
        ready = time.perf_counter() - started
        ready_cpu = process_cpu_s(process.pid)
        task = httpx.get(f"{url}/v1/tasks", timeout=10).json()["tasks"][0]["name"]
        for i in range(20):
            httpx.post(f"{url}/v1/classify", json={"task": task, "texts": [f"a fine film, number {i}"]}, timeout=30).raise_for_status()
        rss = tree_rss_mib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total_cpu = usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime
    return {"ready_s": ready, "ready_cpu_s": ready_cpu, "warm_rss_mib": rss, "cpu_s": total_cpu}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_rates(export: Path, runs: int, new_tokens: int = 48) -> dict:
    """Greedy decode tokens/s of the numpy loop and of optimum's generate on one decoder export (medians over prompts x runs)."""
    import torch

    from metatt_deploy import Generator, SamplingParams
    from metatt_deploy.export.decoder_runs import load_ort_decoder

    torch.set_num_threads(1)  # optimum's loop runs small torch ops between ONNX Runtime calls: more threads only contend with ORT's
    generator = Generator(export, threads=2)
    optimum = load_ort_decoder(export, threads=2)
    rates: dict[str, list[float]] = {"numpy": [], "optimum": []}
    same = 0
    for _ in range(runs):
        for prompt in PROMPTS:
            ids = generator.encode(prompt)
            params = SamplingParams(max_tokens=new_tokens)
            started = time.perf_counter()
            ours = [s.token_id for s in generator.steps(ids, params) if s.token_id is not None]
            rates["numpy"].append(len(ours) / (time.perf_counter() - started))
            x = torch.tensor([ids])
            started = time.perf_counter()
            out = optimum.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False)
            theirs = out[0, len(ids) :].tolist()
            rates["optimum"].append(len(theirs) / (time.perf_counter() - started))
            same += ours == [t for t in theirs if t not in generator.eos_ids][: len(ours)]
    return {
        "numpy_tokens_per_s": statistics.median(rates["numpy"]),
        "optimum_tokens_per_s": statistics.median(rates["optimum"]),
        "ratio": statistics.median(a / b for a, b in zip(rates["numpy"], rates["optimum"])),
        "greedy_identical": f"{same}/{runs * len(PROMPTS)}",
        "new_tokens": new_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--export", type=Path, default=ROOT / "exported" / "minilm-movie-sentiment", help="a classifier export (make demo writes this one)"
    )
    parser.add_argument("--lean", type=Path, default=ROOT / ".venv-lean", help="the runtime-only venv (make setup)")
    parser.add_argument("--full", type=Path, default=ROOT / ".venv", help="the full venv")
    parser.add_argument("--decoder", type=Path, default=None, help="a decoder export (fp32) for the decode-loop comparison")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "reports" / "cold-start")
    args = parser.parse_args()
    export = args.export.resolve()
    if not (export / "model.onnx").is_file():
        raise SystemExit(f"{export} is not a classifier export; run make demo (or pass --export)")
    cwd = Path("/tmp")  # outside the checkout: the lean venv imports its installed package
    lean_bin, lean_py = args.lean.resolve() / "bin" / "metatt-deploy", args.lean.resolve() / "bin" / "python"
    report: dict = {"export": export.name, "runs": args.runs, "cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
    lean_mib, full_mib = site_packages_mib(args.lean), site_packages_mib(args.full)
    report["install"] = {"lean_mib": lean_mib, "full_mib": full_mib, "ratio": lean_mib / full_mib}
    print(f"site-packages: lean {lean_mib:.0f} MiB, full {full_mib:.0f} MiB ({lean_mib / full_mib:.1%})", flush=True)
    script = cwd / "metatt_raw_predict.py"
    script.write_text(RAW_SCRIPT)
    report["predict"] = paired(
        [str(lean_bin), "predict", str(export), "--text", "x"], [str(lean_py), str(script), str(export), "x"], args.runs, cwd
    )
    print("predict vs raw script (median ratios): " + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in report["predict"].items()), flush=True)
    serves = [serve_once(lean_bin, export, cwd, free_port()) for _ in range(args.runs)]
    report["serve"] = {k: statistics.median(s[k] for s in serves) for k in serves[0]}
    print(
        f"serve: ready in {report['serve']['ready_s']:.2f} s ({report['serve']['ready_cpu_s']:.2f} CPU s), warm RSS {report['serve']['warm_rss_mib']:.0f} MiB (medians)",
        flush=True,
    )
    if args.decoder is not None:
        report["decode"] = decode_rates(args.decoder.resolve(), max(1, args.runs // 3))
        print(f"decode: numpy loop {report['decode']['ratio']:.2f}x optimum's generate", flush=True)
    report["load_average_end"] = os.getloadavg()
    atomic_write_json(args.output.with_suffix(".json"), report)
    atomic_write_text(args.output.with_suffix(".md"), render(report, args))
    print(f"wrote {args.output.with_suffix('.md')}")


def render(report: dict, args: argparse.Namespace) -> str:
    p, s, i = report["predict"], report["serve"], report["install"]
    rows = [
        {
            "figure": "site-packages, runtime install vs full",
            "measured": f"{i['lean_mib']:.0f} vs {i['full_mib']:.0f} MiB ({i['ratio']:.1%})",
            "target": "<= 15%",
        },
        {
            "figure": "predict CPU seconds vs raw script",
            "measured": f"{p['cpu_s']['a']:.2f} vs {p['cpu_s']['b']:.2f} s ({p['cpu_s']['ratio']:.2f}x)",
            "target": "<= 2x",
        },
        {
            "figure": "predict wall seconds vs raw script",
            "measured": f"{p['wall_s']['a']:.2f} vs {p['wall_s']['b']:.2f} s ({p['wall_s']['ratio']:.2f}x)",
            "target": "<= 2x",
        },
        {
            "figure": "predict peak RSS vs raw script",
            "measured": f"{p['peak_rss_mib']['a']:.0f} vs {p['peak_rss_mib']['b']:.0f} MiB ({p['peak_rss_mib']['ratio']:.2f}x)",
            "target": "<= 1.3x",
        },
        {
            "figure": "serve: start to /readyz 200",
            "measured": f"{s['ready_s']:.2f} s wall, {s['ready_cpu_s']:.2f} s CPU",
            "target": "<= 3 s",
        },
        {"figure": "serve: warm RSS", "measured": f"{s['warm_rss_mib']:.0f} MiB", "target": "<= 250 MiB"},
    ]
    if "decode" in report:
        d = report["decode"]
        rows.append(
            {
                "figure": "decode tokens/s, numpy loop vs optimum generate",
                "measured": f"{d['numpy_tokens_per_s']:.1f} vs {d['optimum_tokens_per_s']:.1f} ({d['ratio']:.2f}x; greedy identical {d['greedy_identical']})",
                "target": ">= 1x",
            }
        )
    command = "python tools/bench_cold_start.py" + (" --decoder DECODER_EXPORT" if args.decoder else "") + f" --runs {args.runs}"
    return (
        "# Cold start: the runtime install against a raw ONNX Runtime script\n\n"
        f"Export: `{Path(report['export']).name}`; {report['runs']} interleaved runs per figure, medians "
        f"(ratios are medians of per-pair ratios); {report['cpus']} CPUs, load average {report['load_average_start'][0]:.1f} at the start "
        f"and {report['load_average_end'][0]:.1f} at the end. Reproduce: `{command}` (after `make setup` and `make demo`).\n\n"
        + markdown_table(rows)
        + "\n\nThe raw script is `RAW_SCRIPT` in tools/bench_cold_start.py: tokenizers, onnxruntime and numpy, "
        "no checks. `predict` runs from the runtime-only venv (`pip install .`). DECODER_EXPORT is the embedded "
        "SmolLM2-135M-Instruct (its converted folder under the model cache) exported fp32 with `metatt-deploy export`; "
        "optimum's loop runs with torch held to 1 thread (with torch's default threads it was 2.4x slower here, "
        "its thread pool competing with ONNX Runtime's on 2 cores).\n"
    )


if __name__ == "__main__":
    main()
