"""The continuous-batching scheduler without HTTP: rows of every task, joining and leaving between steps, prefilled in
chunks, give each sequence exactly the token ids it gets alone (greedy and seeded sampling), one call per lane per step."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_decoders import save_tiny_multitask

from metatt_deploy.export.merge import merge_factored
from metatt_deploy.inference.decode import Decoding, SamplingParams, Step
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.llm_engine import LLMEngine, Seq

TASKS = ["alpha", "beta", "gamma"]
PROMPTS = [
    "Review: this was good",
    "Premise: a man plays. Hypothesis: a person plays.",
    "What is the capital of France?",
    "fine",
    "sad boring",
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llm-engine")
    _, adapter = save_tiny_multitask(root, TASKS, seed=2)
    merge_factored(adapter, root / "bundle")
    return root / "bundle"


def sequence(gen: Generator, task: str, prompt: str, params: SamplingParams, log: list[Step]) -> Seq:
    return Seq(task, gen.encode(prompt), params, gen.binding(task), Decoding(params, gen.eos_ids, gen.tokenizer), log.append)


def tokens(log: list[Step]) -> list[int]:
    return [s.token_id for s in log if s.token_id is not None]


@pytest.mark.parametrize("form, lanes", [("tasks", 1), ("adapter", 3)])
def test_sequences_joining_and_leaving_get_the_tokens_they_get_alone(bundle: Path, form: str, lanes: int) -> None:
    """model_tasks.onnx: every task in one call per step; the adapter graph: one call per task (RunOptions are per call)."""
    gen = Generator(bundle, threads=1, form=form)
    jobs = [
        (TASKS[i % 3], PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=4 + (3 * i) % 11, temperature=0.8 * (i % 2), seed=i))
        for i in range(16)
    ]
    alone = [tokens(list(gen.steps(gen.encode(p), params, t))) for t, p, params in jobs]
    assert len({tuple(a) for a in alone}) > 8
    engine = LLMEngine(max_running=6, max_tokens_per_step=16)  # chat prompts of ~20 tokens: prefilled over 2+ steps
    logs: list[list[Step]] = [[] for _ in jobs]
    seqs = [sequence(gen, t, p, params, log) for (t, p, params), log in zip(jobs, logs)]
    cancelled_log: list[Step] = []
    cancelled = sequence(gen, "beta", PROMPTS[0], SamplingParams(max_tokens=50), cancelled_log)
    engine.waiting.extend([*seqs[:5], cancelled])
    steps, most_calls, widest = 0, 0, 0
    while engine.busy():
        if steps == 3:
            engine.waiting.extend(seqs[5:])  # join between steps
        if len(cancelled_log) == 2:
            cancelled.cancelled = True  # leaves at the next step
        events, stats = engine.step()
        for seq, out in events:
            for step in out:
                seq.deliver(step)
        steps += 1
        most_calls = max(most_calls, stats.calls)
        widest = max(widest, stats.decoded_rows)
        assert engine.running <= 6 and stats.prefilled_tokens <= 16
        assert steps < 500
    assert [tokens(log) for log in logs] == alone
    assert all(log[-1].finish_reason in ("stop", "length") for log in logs)
    assert cancelled.decoding.finish_reason is None and len(cancelled_log) == 2
    assert widest > 3 and most_calls <= lanes + 1  # rows decoded together; at most one call per lane plus a prefill chunk
