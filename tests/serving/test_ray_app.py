"""The Ray Serve deployments (slow: starts a local Ray once for the module), 2 replicas behind Ray's proxy on 127.0.0.1.

Classifiers: mixed-task requests get the same answers (<= 1e-5) as the runtime alone, both replicas
take traffic, errors are the same one-line 4xx as the uvicorn server's, and a row that fails a
shared ``@serve.batch`` call fails only its own request. Decoders: the OpenAI API of the uvicorn
server, driven by the ``openai`` client and raw HTTP; every greedy answer under concurrent
mixed-task load equals `Generator` alone."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from multitask_fixtures import LABELS, build_tiny_multitask
from servers import free_port
from tiny_decoders import save_tiny_multitask

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.export.merge import merge_factored
from metatt_deploy.inference.decode import SamplingParams
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.http import ServeSettings
from metatt_deploy.serving.openai_app import LLMSettings
from metatt_deploy.serving.ray_app import REPLICA_HEADER, build_app, build_decoder_app
from metatt_deploy.serving.runtime import Runtime

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

TEXTS = {"movie": "A wonderful film.", "nli": ["A man sleeps.", "A man is awake."], "four": "fine then"}
DECODER_TASKS = ["alpha", "beta", "gamma"]
PROMPTS = ["Review: this was good", "What is the capital of France?", "fine lovely happy", "user assistant system"]


class Poisoned:
    """A runtime whose model call fails for any batch holding 'poison' (a row the edge checks let through) or 'bug' (a bug)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __getattr__(self, name):  # tasks, labels, check, info
        return getattr(self.runtime, name)

    def logits(self, texts, task=None, tasks=None):
        if "poison" in texts:
            raise MetaTTError("this row cannot be encoded")
        if "bug" in texts:
            raise RuntimeError("a bug")
        return self.runtime.logits(texts, task=task, tasks=tasks)


@pytest.fixture(scope="module")
def ray_url() -> Iterator[str]:
    """A local Ray (2 CPUs) with Serve's proxy on a free loopback port; each test runs its app as 'metatt'."""
    port = free_port()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_two_replicas_answer_mixed_tasks_like_the_runtime(tmp_path, ray_url: str) -> None:
    _, adapter, _, _ = build_tiny_multitask(tmp_path)
    bundle = tmp_path / "bundle"
    write_bundle(adapter, bundle)
    runtime = Runtime(bundle, threads=1)
    poisoned = str(bundle)
    app = build_app(
        str(bundle),
        replicas=2,
        settings=ServeSettings(max_batch=16, max_wait_ms=50, max_texts=4),
        cpus_per_replica=0.5,
        load=lambda: Poisoned(Runtime(poisoned, threads=1)),
    )
    serve.run(app, name="metatt", route_prefix="/")
    requests = [(task, TEXTS[task]) for _ in range(12) for task in LABELS]  # 36 requests, 3 tasks
    bad = [("movie", "poison")] * 4 + [("four", "bug")] * 2

    async def main():
        async with httpx.AsyncClient(base_url=ray_url, timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/classify", json={"task": task, "texts": [text], "return_logits": True}) for task, text in requests + bad)
            )

    responses = asyncio.run(asyncio.wait_for(main(), 120))
    replicas = set()
    for (task, text), r in zip(requests, responses):
        assert r.status_code == 200, r.text
        replicas.add(r.headers[REPLICA_HEADER])
        got = np.array(r.json()["predictions"][0]["logits"])
        alone = runtime.logits([tuple(text) if isinstance(text, list) else text], task=task)[0]
        assert r.json()["task"] == task and np.abs(got - alone).max() <= 1e-5
    assert len(replicas) == 2  # both replicas took traffic
    rest = responses[len(requests) :]
    assert [r.status_code for r in rest] == [422] * 4 + [500] * 2  # only the bad rows' own requests fail
    assert all(r.json() == {"error": "this row cannot be encoded"} for r in rest[:4])
    assert all(r.json()["error"].startswith("internal error (RuntimeError)") for r in rest[4:])
    tasks = httpx.get(f"{ray_url}/v1/tasks", timeout=30).json()
    assert [t["name"] for t in tasks["tasks"]] == list(LABELS)
    r = httpx.post(f"{ray_url}/v1/classify", json={"task": "nope", "texts": ["a"]}, timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "unknown task 'nope'; this server has tasks: movie, nli, four"}
    r = httpx.post(f"{ray_url}/v1/classify", json={"task": "movie", "texts": ["a"] * 5}, timeout=30)
    assert r.status_code == 413 and "at most 4" in r.json()["error"]
    r = httpx.post(f"{ray_url}/v1/classify", content=b"{", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON")


def alone_text(gen: Generator, task: str, prompt: str, max_tokens: int, chat: bool) -> tuple[str, str]:
    """(text, finish reason) of the greedy request decoded alone by `Generator`."""
    steps = list(gen.steps(gen.encode(prompt, raw=not chat), SamplingParams(max_tokens=max_tokens), task))
    return "".join(s.text for s in steps), str(steps[-1].finish_reason)


@pytest.mark.slow
def test_decoder_replicas_serve_the_openai_api_like_the_generator_alone(tmp_path: Path, ray_url: str) -> None:
    _, adapter = save_tiny_multitask(tmp_path, DECODER_TASKS, seed=1)
    bundle = tmp_path / "bundle"
    merge_factored(adapter, bundle)
    alone = Generator(bundle, threads=1, form="tasks")
    app = build_decoder_app(str(bundle), replicas=2, settings=LLMSettings(max_running=8), threads=1, cpus_per_replica=0.5)
    serve.run(app, name="metatt", route_prefix="/")
    requests = [(DECODER_TASKS[i % 3], PROMPTS[i % len(PROMPTS)], 4 + i % 9, i % 2 == 0) for i in range(24)]
    expected = [alone_text(alone, *r) for r in requests]
    assert len({text for text, _ in expected}) > 6  # the answers differ across tasks and prompts (else equality proves little)

    async def ask(client: openai.AsyncOpenAI, task: str, prompt: str, max_tokens: int, chat: bool) -> tuple[str, str, str]:
        if chat:
            out = await client.chat.completions.with_raw_response.create(
                model=task, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
            )
            done = out.parse()
            return done.choices[0].message.content or "", done.choices[0].finish_reason, out.headers[REPLICA_HEADER]
        raw = await client.completions.with_raw_response.create(model=task, prompt=prompt, max_tokens=max_tokens, temperature=0)
        done = raw.parse()
        return done.choices[0].text, done.choices[0].finish_reason, raw.headers[REPLICA_HEADER]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{ray_url}/v1", api_key="none", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(ask(client, *r) for r in requests))

    answers = asyncio.run(asyncio.wait_for(main(), 180))
    assert [(text, reason) for text, reason, _ in answers] == expected
    assert len({replica for _, _, replica in answers}) == 2  # both replicas took traffic
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == DECODER_TASKS
    # streamed through Ray's proxy: server-sent events ending in [DONE], the same text
    body = {"model": "beta", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{ray_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == alone_text(alone, "beta", PROMPTS[0], 6, False)[0]
    # errors in OpenAI's shape, as from the uvicorn server
    r = httpx.post(f"{ray_url}/v1/completions", json={"model": "nope", "prompt": "a"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{ray_url}/v1/completions", json={"model": "alpha", "prompt": "a", "n": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("n=2")
