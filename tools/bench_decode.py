#!/usr/bin/env python
"""Decode speed of the numpy loop (metatt_deploy.inference.decode) against optimum's ``generate`` on one export.

Both run the same decoder export (``metatt-deploy export`` of a causal LM, fp32) through ONNX
Runtime on the CPU with ``--threads`` intra-op threads, greedy, on the same chat prompts, and
generate exactly ``--new-tokens`` tokens each (EOS off in the loop, ``min_new_tokens`` in
optimum), so both do the same work: one prefill and N-1 cached steps. They take turns call by
call (a background load hits both alike); per runtime the median over ``--repeats`` rounds of
tokens/s (wall), and CPU seconds per call next to wall seconds (robust on a shared machine). The
tokens both produce up to the first EOS are checked to be identical. torch keeps its own thread
count unless ``--torch-threads`` is given: its pool runs beside ONNX Runtime's in optimum's loop.

    python tools/bench_decode.py /tmp/smollm2-onnx --new-tokens 64 --repeats 5

Internals (what this measures lies below the public API, docs/api.md):

- metatt_deploy.export.decoder_runs: optimum's ORTModelForCausalLM on the export, the baseline; a comparison harness, not something a deployment calls.
- metatt_deploy.inference.decode: the decode loop under `Generator` (DecoderGraph, generate, EOS handling), timed bare so the figure has no task selection or detokenizing in it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metatt_deploy import SamplingParams, TextTokenizer  # noqa: E402
from metatt_deploy.export.decoder_runs import load_ort_decoder  # noqa: E402
from metatt_deploy.inference.decode import DecoderGraph, generate, generation_eos_ids, until_eos  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three colours."]


def timed(fn) -> tuple[list[int], float, float]:
    """(tokens, wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return tokens, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="a decoder export folder (model.onnx with a KV cache)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (both runtimes)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads around optimum (default: torch's own, as the generate verb leaves it)",
    )
    args = parser.parse_args()

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tok = TextTokenizer.from_folder(args.export)
    graph = DecoderGraph.open(args.export, threads=args.threads)
    optimum = load_ort_decoder(args.export, threads=args.threads)
    eos = generation_eos_ids(args.export)
    params = SamplingParams(max_tokens=args.new_tokens)
    prompts = [tok.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]

    def numpy_loop(ids: list[int]) -> list[int]:
        return [s.token_id for s in generate(graph, ids, params) if s.token_id is not None]

    def optimum_generate(ids: list[int]) -> list[int]:
        x = torch.tensor([ids])
        n = args.new_tokens
        out = optimum.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return out[0, len(ids) :].tolist()

    runners = {"numpy loop (inference.decode)": numpy_loop, "optimum ORTModelForCausalLM.generate": optimum_generate}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for ids in prompts:  # warm-up, and the same greedy tokens up to the first EOS (optimum's min_new_tokens hides it)
        ours, theirs = (fn(ids) for fn in runners.values())
        ours = until_eos(ours, eos)
        assert ours == theirs[: len(ours)], f"the two runtimes' greedy tokens differ: {ours} vs {theirs}"
    for _ in range(args.repeats):
        for ids in prompts:
            for name, fn in runners.items():
                tokens, wall, cpu = timed(lambda fn=fn, ids=ids: fn(ids))
                assert len(tokens) == args.new_tokens
                results[name].append((wall, cpu))
    print(
        f"{args.export}: {len(prompts)} chat prompts x {args.repeats} rounds, {args.new_tokens} new tokens, "
        f"{args.threads} ORT threads, {torch.get_num_threads()} torch threads"
    )
    print(f"{'runtime':40s} {'tokens/s':>9s} {'wall s/call':>12s} {'CPU s/call':>11s}")
    for name, rows in results.items():
        wall = statistics.median(w for w, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"{name:40s} {args.new_tokens / wall:9.1f} {wall:12.3f} {cpu:11.3f}")


if __name__ == "__main__":
    main()
