"""The OpenAI-compatible generation server on real sockets (127.0.0.1, free ports, bounded waits), driven by the
official ``openai`` client and raw HTTP: every task is a model, answers under concurrent mixed-task load equal
the answers alone, errors in OpenAI's shape, limits, disconnects, hot add/remove, metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from servers import free_port, wait_ready
from tiny_decoders import save_tiny_adapter, save_tiny_multitask

from metatt_deploy.export.merge import merge_factored
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.inference.decode import SamplingParams
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.openai_app import LLMSettings, create_openai_app

REPO = Path(__file__).resolve().parents[2]
TASKS = ["alpha", "beta", "gamma"]
TOKEN = "s3cret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = [
    "Review: this was good",
    "Premise: a man plays. Hypothesis: a person plays. Answer:",
    "What is the capital of France?",
    "fine lovely happy",
    "Review: this was bad and awful today, really boring and sad",
    "user assistant",
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny 3-task factored decoder bundle (random cores: the tasks answer differently)."""
    root = tmp_path_factory.mktemp("llm-server")
    _, adapter = save_tiny_multitask(root, TASKS, seed=1)
    merge_factored(adapter, root / "bundle")
    return root / "bundle"


@pytest.fixture(scope="module")
def alone(bundle: Path) -> Generator:
    """Today's path, one request at a time: what every answer under load must equal."""
    return Generator(bundle, threads=1, form="tasks")


class Served:
    def __init__(self, url: str, app) -> None:
        self.url = url
        self.app = app
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

    @property
    def server(self):
        return self.app.state.server


@pytest.fixture
def served(bundle: Path, request) -> Iterator[Served]:
    """The app on uvicorn in a thread; ``@pytest.mark.parametrize('served', [settings], indirect=True)`` changes its settings."""
    settings = getattr(request, "param", None) or LLMSettings(admin_token=TOKEN)
    app = create_openai_app(lambda: Generator(bundle, threads=1, form="auto"), settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 60)
    yield Served(url, app)
    server.should_exit = True
    thread.join(30)
    assert not thread.is_alive()


def expected_text(gen: Generator, task: str | None, prompt: str, max_tokens: int, chat: bool, **sampling) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of the request decoded alone."""
    ids = gen.encode(prompt, raw=not chat)
    steps = list(gen.steps(ids, SamplingParams(max_tokens=max_tokens, **sampling), task))
    return "".join(s.text for s in steps), sum(s.token_id is not None for s in steps), str(steps[-1].finish_reason)


def long_prompt(gen: Generator, task: str) -> str:
    """A prompt that ``task`` answers with 400 tokens and no EOS (random weights: found, not assumed)."""
    return next(p for p in PROMPTS if expected_text(gen, task, p, 400, chat=False)[2] == "length")


def load(n: int) -> list[dict]:
    """n requests over the 3 tasks, both endpoints, prompts of different lengths and different max_tokens."""
    return [
        {"task": TASKS[i % 3], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 6 + (i * 5) % 17, "chat": i % 2 == 0} for i in range(n)
    ]


async def ask(client: openai.AsyncOpenAI, r: dict, **sampling) -> tuple[str, int, str]:
    if r["chat"]:
        out = await client.chat.completions.create(
            model=r["task"], messages=[{"role": "user", "content": r["prompt"]}], max_tokens=r["max_tokens"], **sampling
        )
        return out.choices[0].message.content or "", out.usage.completion_tokens, out.choices[0].finish_reason
    done = await client.completions.create(model=r["task"], prompt=r["prompt"], max_tokens=r["max_tokens"], **sampling)
    return done.choices[0].text, done.usage.completion_tokens, done.choices[0].finish_reason


def test_models_lists_every_task_and_answers_name_the_task(served: Served) -> None:
    assert httpx.get(f"{served.url}/docs").status_code == 404  # off unless serve --docs (its scripts come from a CDN)
    assert [m.id for m in served.client.models.list().data] == TASKS
    out = served.client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hello"}], max_tokens=3)
    assert out.model == "beta" and out.object == "chat.completion" and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_mixed_task_load_answers_equal_each_request_alone(served: Served, alone: Generator) -> None:
    """24 concurrent greedy requests over 3 tasks, then seeded sampled ones: each equals the same request served alone."""
    requests = load(24)
    greedy = [expected_text(alone, r["task"], r["prompt"], r["max_tokens"], r["chat"]) for r in requests]
    sampled = [
        expected_text(alone, r["task"], r["prompt"], r["max_tokens"], r["chat"], temperature=0.9, seed=i) for i, r in enumerate(requests)
    ]
    assert len({g[0] for g in greedy}) > 6  # the answers differ across tasks and prompts (else equality proves little)

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=60) as client:
            g = asyncio.gather(*(ask(client, r, temperature=0) for r in requests))
            s = asyncio.gather(*(ask(client, r, temperature=0.9, seed=i) for i, r in enumerate(requests)))
            return await asyncio.gather(g, s)

    got_greedy, got_sampled = asyncio.run(asyncio.wait_for(main(), 120))
    assert got_greedy == greedy
    assert got_sampled == sampled
    # the decode steps really ran several rows (of several tasks) together
    metrics = httpx.get(f"{served.url}/metrics").text
    rows = {
        line.split('le="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if "metatt_llm_step_rows_bucket" in line
    }
    steps = rows["+Inf"]
    assert steps > 0 and rows["1.0"] < steps  # some steps had more than one row
    for name in (
        "metatt_llm_time_to_first_token_seconds_count",
        "metatt_llm_inter_token_seconds_count",
        'metatt_llm_generated_tokens_total{task="gamma"}',
    ):
        assert name in metrics


def test_streaming_with_the_openai_client_and_raw_sse(served: Served, alone: Generator) -> None:
    text, n, reason = expected_text(alone, "gamma", "fine lovely happy", 12, chat=True)
    stream = served.client.chat.completions.create(
        model="gamma", messages=[{"role": "user", "content": "fine lovely happy"}], max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == reason and chunks[-1].usage.completion_tokens == n
    assert all(c.object == "chat.completion.chunk" and c.model == "gamma" for c in chunks)
    # raw: the body is server-sent events, each a JSON chunk, ending in [DONE]
    body = {"model": "alpha", "prompt": "Review: this was good", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    pieces = [json.loads(e[6:]) for e in events[:-1]]
    expected, _, _ = expected_text(alone, "alpha", "Review: this was good", 5, chat=False)
    assert "".join(p["choices"][0]["text"] for p in pieces) == expected
    assert pieces[-1]["usage"]["completion_tokens"] >= 1 and pieces[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # a list of prompts: one choice each, in order
    out = served.client.completions.create(model="alpha", prompt=["fine lovely happy", "user assistant"], max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [
        expected_text(alone, "alpha", p, 4, chat=False)[0] for p in ("fine lovely happy", "user assistant")
    ]


def test_stop_strings_and_max_tokens_end_with_their_reason(served: Served, alone: Generator) -> None:
    text, _, _ = expected_text(alone, "alpha", "Review: this was good", 20, chat=False)
    assert len(text) > 4
    stop = text[2:4]
    out = served.client.completions.create(model="alpha", prompt="Review: this was good", max_tokens=20, temperature=0, stop=[stop])
    assert out.choices[0].text == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"
    out = served.client.completions.create(model="alpha", prompt="Review: this was good", max_tokens=1, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 1


def openai_error(r: httpx.Response, code: int, words: str) -> dict:
    assert r.status_code == code, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    return error


def test_client_mistakes_are_4xx_in_openai_shape_and_never_fail_others(served: Served) -> None:
    url = served.url
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert openai_error(httpx.post(f"{url}/v1/chat/completions", json={**chat, "model": "nope"}), 404, "'nope' does not exist")["code"] == (
        "model_not_found"
    )
    error = openai_error(
        httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "word " * 300, "max_tokens": 400}), 400, "512"
    )
    assert error["code"] == "context_length_exceeded" and "400 for the completion" in error["message"]
    openai_error(httpx.post(f"{url}/v1/chat/completions", json={**chat, "n": 2}), 400, "n=2")
    openai_error(httpx.post(f"{url}/v1/chat/completions", json={**chat, "logprobs": True}), 400, "'logprobs' is not supported")
    openai_error(httpx.post(f"{url}/v1/chat/completions", json={**chat, "temperature": -1}), 400, "temperature")
    openai_error(httpx.post(f"{url}/v1/chat/completions", json={**chat, "seed": -1}), 400, "seed")
    openai_error(httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": "3"}), 400, "max_tokens")
    openai_error(httpx.post(f"{url}/v1/chat/completions", json={**chat, "stop": ["a", "b", "c", "d", "e"]}), 400, "at most 4")
    openai_error(httpx.post(f"{url}/v1/chat/completions", json={**chat, "messages": []}), 400, "messages")
    openai_error(httpx.post(f"{url}/v1/chat/completions", json={**chat, "typo": 1}), 400, "typo")
    openai_error(httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": ""}), 400, "non-empty")
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    openai_error(r, 400, "JSON")
    openai_error(httpx.post(f"{url}/v1/chat/completions", content=json.dumps(chat)), 415, "application/json")
    big = {**chat, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    openai_error(httpx.post(f"{url}/v1/chat/completions", json=big), 413, "request body over")
    openai_error(httpx.get(f"{url}/v1/nothing"), 404, "Not Found")
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context"):
        served.client.completions.create(model="alpha", prompt="word " * 300, max_tokens=400)

    async def mixed():  # bad requests interleaved with good ones: the good ones all answer
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            calls = [c.post("/v1/chat/completions", json={**chat, "model": ["alpha", "nope"][i % 2], "max_tokens": 4}) for i in range(10)]
            return await asyncio.gather(*calls)

    codes = [r.status_code for r in asyncio.run(asyncio.wait_for(mixed(), 60))]
    assert codes == [200, 404] * 5


@pytest.mark.parametrize("served", [LLMSettings(max_running=1, max_queue=2, max_tokens_per_step=8)], indirect=True)
def test_a_full_queue_answers_429_with_retry_after_and_a_disconnect_frees_its_slot(served: Served, alone: Generator) -> None:
    url = served.url
    engine = served.server.scheduler.engine
    body = {"model": "alpha", "prompt": long_prompt(alone, "alpha"), "max_tokens": 400, "temperature": 0, "stream": True}
    # a client that reads one chunk and hangs up: its sequence leaves the batch at the next step
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())
        deadline = time.monotonic() + 10  # the first chunk can leave before the sequence has joined the batch
        while engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 1
    deadline = time.monotonic() + 30  # generous on a loaded machine: what proves the slot was freed is the token count
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0 and generated(served, "alpha") < 200  # it left long before its 400 tokens

    async def flood():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            long = asyncio.ensure_future(c.post("/v1/completions", json={**body, "stream": False}))
            while engine.running == 0:
                await asyncio.sleep(0.01)
            short = [asyncio.ensure_future(c.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})) for _ in range(6)]
            while sum(t.done() for t in short) < 4:  # one slot, two places in the queue: four are refused at once
                await asyncio.sleep(0.01)
            long.cancel()  # the client goes away: its sequence leaves, and the queued two run
            return await asyncio.gather(*short)

    before = generated(served, "alpha")
    rest = asyncio.run(asyncio.wait_for(flood(), 60))
    refused = [r for r in rest if r.status_code == 429]
    assert refused and all(r.headers["retry-after"] == "1" for r in refused)
    assert openai_error(refused[0], 429, "queue full")["type"] == "rate_limit_error"
    assert sorted(r.status_code for r in rest) == [200, 200, 429, 429, 429, 429]
    deadline = time.monotonic() + 10  # the cancelled non-streaming request left too
    while engine.busy() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.busy() and generated(served, "alpha") - before < 200 + 2 * len(rest)


def generated(served: Served, task: str) -> float:
    """Tokens the server has generated for ``task`` (its Prometheus counter)."""
    return served.server.metrics.generated_tokens.labels(task)._value.get()


def test_hot_add_and_remove_of_tasks_with_the_admin_token(served: Served, bundle: Path, tmp_path: Path) -> None:
    url = served.url
    openai_error(httpx.post(f"{url}/admin/tasks/delta"), 401, "Bearer")
    openai_error(httpx.post(f"{url}/admin/tasks/delta", headers=ADMIN), 422, "no task file tasks/delta.json")
    openai_error(httpx.post(f"{url}/admin/tasks/alpha", headers=ADMIN), 409, "already served")
    r = httpx.delete(f"{url}/admin/tasks/beta", headers=ADMIN, timeout=30)
    assert r.status_code == 200 and r.json()["tasks"] == ["alpha", "gamma"]
    assert [m.id for m in served.client.models.list().data] == ["alpha", "gamma"]
    openai_error(httpx.post(f"{url}/v1/completions", json={"model": "beta", "prompt": "hi"}), 404, "does not exist")
    r = httpx.post(f"{url}/admin/tasks/beta", headers=ADMIN, timeout=30)
    assert r.status_code == 201 and r.json()["tasks"] == ["alpha", "gamma", "beta"]
    out = served.client.completions.create(model="beta", prompt="fine lovely happy", max_tokens=4, temperature=0)
    assert out.choices[0].text == expected_text(Generator(bundle, threads=1), "beta", "fine lovely happy", 4, chat=False)[0]


def test_sigterm_finishes_running_sequences_then_exits(bundle: Path, alone: Generator) -> None:
    """`metatt-deploy serve` on a decoder bundle: serves the OpenAI API; on SIGTERM a running stream still ends in [DONE]."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "metatt_deploy",
        "serve",
        str(bundle),
        "--port",
        str(port),
        "--threads",
        "1",
        "--graceful-seconds",
        "20",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, 120, process)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == TASKS
        body = {"model": "gamma", "prompt": long_prompt(alone, "gamma"), "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
        _, log = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGTERM and "Application shutdown complete" in log and "Traceback" not in log


def test_a_single_task_decoder_export_is_one_model(tmp_path: Path) -> None:
    """A merged decoder export (metatt-deploy export) has one id, its folder's name; its task set is fixed."""
    _, adapter = save_tiny_adapter(tmp_path, "llama")
    export = export_onnx(adapter, tmp_path / "assistant")
    app = create_openai_app(lambda: Generator(export, threads=1, form="auto"), LLMSettings(admin_token=TOKEN))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 60)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["assistant"]
        out = client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
        assert out.choices[0].message.content == expected_text(Generator(export, threads=1), None, "hi", 5, chat=True)[0]
        openai_error(httpx.post(f"{url}/admin/tasks/other", headers=ADMIN), 409, "single-task export")
        openai_error(httpx.delete(f"{url}/admin/tasks/assistant", headers=ADMIN), 409, "fixed set of tasks")
    finally:
        server.should_exit = True
        thread.join(30)
