"""The Ray Serve deployment (slow: starts a local Ray): 2 replicas behind Ray's proxy on
127.0.0.1 answer mixed-task requests with the same answers (<= 1e-5) as the runtime alone, both
replicas take traffic, and errors are the same one-line 4xx as the uvicorn server's."""

from __future__ import annotations

import asyncio
import socket

import httpx
import numpy as np
import pytest
from multitask_fixtures import LABELS, build_tiny_multitask

from metatt_deploy.export.factored import write_bundle
from metatt_deploy.serving.http import ServeSettings
from metatt_deploy.serving.ray_app import REPLICA_HEADER, build_app
from metatt_deploy.serving.runtime import Runtime

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

TEXTS = {"movie": "A wonderful film.", "nli": ["A man sleeps.", "A man is awake."], "four": "fine then"}


@pytest.mark.slow
def test_two_replicas_answer_mixed_tasks_like_the_runtime(tmp_path) -> None:
    _, adapter, _, _ = build_tiny_multitask(tmp_path)
    bundle = tmp_path / "bundle"
    write_bundle(adapter, bundle)
    runtime = Runtime(bundle, threads=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            str(bundle), replicas=2, settings=ServeSettings(max_batch=16, max_wait_ms=20, max_texts=4), threads=1, cpus_per_replica=0.5
        )
        serve.run(app, name="metatt", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        requests = [(task, TEXTS[task]) for _ in range(12) for task in LABELS]  # 36 requests, 3 tasks

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(
                    *(c.post("/v1/classify", json={"task": task, "texts": [text], "return_logits": True}) for task, text in requests)
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
        tasks = httpx.get(f"{url}/v1/tasks", timeout=30).json()
        assert [t["name"] for t in tasks["tasks"]] == list(LABELS)
        r = httpx.post(f"{url}/v1/classify", json={"task": "nope", "texts": ["a"]}, timeout=30)
        assert r.status_code == 404 and r.json() == {"error": "unknown task 'nope'; this server has tasks: movie, nli, four"}
        r = httpx.post(f"{url}/v1/classify", json={"task": "movie", "texts": ["a"] * 5}, timeout=30)
        assert r.status_code == 413 and "at most 4" in r.json()["error"]
        r = httpx.post(f"{url}/v1/classify", content=b"{", headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON")
    finally:
        serve.shutdown()
        ray.shutdown()
