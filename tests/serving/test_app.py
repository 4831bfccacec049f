"""The HTTP API on a tiny 3-task bundle (httpx on the ASGI app, no sockets): every endpoint, every
error code with a one-line reason, rows of different tasks batched into one call with per-row
answers equal (<= 1e-5) to the task alone, and tasks added and removed under concurrent load
with no failed request."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import shutil
import threading

import httpx
import numpy as np
import pytest
import torch
from multitask_fixtures import LABELS, build_tiny_multitask
from onnx_fixtures import LABELS as EXPORT_LABELS
from onnx_fixtures import build_tiny
from prometheus_client.parser import text_string_to_metric_families

from metatt_deploy.adapters.heads import routers
from metatt_deploy.adapters.multitask import extend_tasks, save_multitask
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.inference.formats import TASKS_DIR
from metatt_deploy.serving.app import create_app
from metatt_deploy.serving.http import ServeSettings
from metatt_deploy.serving.runtime import Runtime

TOKEN = "s3cret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = {"movie": ["A wonderful film.", "Dull and slow."], "nli": [["A man sleeps.", "A man is awake."]], "four": ["ok", "fine then"]}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The bundle, a grown adapter with a 4th task 'late', and a bundle made from other shared cores."""
    root = tmp_path_factory.mktemp("app")
    _, adapter, mtm, tokenizer = build_tiny_multitask(root)
    bundle = root / "bundle"
    write_bundle(adapter, bundle)
    grown = copy.deepcopy(mtm)
    extend_tasks(grown, "late", ["no", "yes"], seed=5)
    with torch.no_grad():
        grown.metatt.cores[3][:, 3] += 0.3
        for p in routers(grown.model)[0].heads[3].parameters():
            p.add_(0.5)
    grown_adapter = save_multitask(grown, root / "grown", tokenizer)
    other = root / "other"
    _, other_adapter, _, _ = build_tiny_multitask(root, core_seed=11)
    write_bundle(other_adapter, other)
    return bundle, grown_adapter, other


@pytest.fixture(scope="module")
def runtime(bundles):
    return Runtime(bundles[0], threads=1)


@contextlib.asynccontextmanager
async def serving(engine, **settings):
    app = create_app(engine, ServeSettings(admin_token=TOKEN, **settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            if not callable(engine) or hasattr(engine, "logits"):
                await asyncio.wait_for(app.state.server.loaded.wait(), 30)
            yield client, app.state.server


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


def one_line_error(response: httpx.Response, code: int, match: str) -> str:
    body = response.json()
    assert response.status_code == code, (response.status_code, body)
    assert set(body) == {"error"} and match in body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus exposition (None if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def as_input(text):
    return tuple(text) if isinstance(text, list) else text


# ---------------------------------------------------------------- endpoints


def test_endpoints_tasks_health_openapi_metrics(runtime) -> None:
    async def main():
        async with serving(runtime) as (c, _):
            assert (await c.get("/healthz")).json() == {"status": "ok", "detail": None}
            assert (await c.get("/readyz")).json()["status"] == "ready"
            tasks = (await c.get("/v1/tasks")).json()
            assert tasks["model_id"] == runtime.info["bundle_id"]
            assert tasks["tasks"] == [{"name": t, "labels": labels} for t, labels in LABELS.items()]
            for task, texts in TEXTS.items():
                r = await c.post("/v1/classify", json={"task": task, "texts": texts})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["task"] == task and body["model_id"] == runtime.info["bundle_id"]
                expected = runtime.predict([as_input(t) for t in texts], task=task)
                for got, want in zip(body["predictions"], expected):
                    assert got["label"] == want["label"] and got["label_id"] == want["label_id"] and "logits" not in got
                    assert got["scores"] == pytest.approx(want["scores"], abs=1e-6)
            spec = (await c.get("/openapi.json")).json()
            post = spec["paths"]["/v1/classify"]["post"]
            assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ClassifyRequest")
            assert {"200", "400", "404", "413", "422", "429", "503"} <= set(post["responses"])
            assert set(spec["components"]["schemas"]["ClassifyRequest"]["properties"]) == {"task", "texts", "return_logits"}
            assert (await c.get("/docs")).status_code == 404  # Swagger UI loads from a CDN: off unless --docs
            await c.post("/v1/classify", json={"task": "nope", "texts": ["x"]})
            metrics = (await c.get("/metrics")).text
            assert metric(metrics, "metatt_requests_total", task="movie") == 1
            assert metric(metrics, "metatt_request_errors_total", task="-", code="404") == 1
            assert metric(metrics, "metatt_request_latency_seconds_count", task="nli") == 1
            assert metric(metrics, "metatt_batch_rows_count") == 3 and metric(metrics, "metatt_queue_depth") == 0
            assert metric(metrics, "metatt_tasks_served") == 3

    run(main())


# ---------------------------------------------------------------- errors


def test_every_error_is_a_4xx_with_one_line(runtime) -> None:
    async def main():
        async with serving(runtime, max_texts=3, max_chars=50, max_body_bytes=2000) as (c, _):
            post = c.post
            one_line_error(
                await post("/v1/classify", content=b'{"task": "movie", "texts": [', headers={"content-type": "application/json"}),
                400,
                "malformed JSON",
            )
            one_line_error(await post("/v1/classify", json={"task": "movie", "texts": [1]}), 422, "texts.0")
            one_line_error(await post("/v1/classify", json={"task": "movie", "texts": "a text, not a list"}), 422, "texts")
            one_line_error(await post("/v1/classify", json={"task": 7, "texts": ["a"]}), 422, "task")
            one_line_error(await post("/v1/classify", json={"texts": ["a"]}), 422, "task: Field required")
            one_line_error(await post("/v1/classify", json={"task": "movie", "text": ["a"]}), 422, "Field required")
            one_line_error(await post("/v1/classify", json={"task": "movie", "texts": []}), 422, "texts")
            one_line_error(await post("/v1/classify", json={"task": "movie", "texts": [["a", "b", "c"]]}), 422, "texts.0")
            one_line_error(await post("/v1/classify", json={"task": "movie", "texts": ["a"], "return_logits": "yes"}), 422, "return_logits")
            one_line_error(
                await post("/v1/classify", json={"task": "nope", "texts": ["a"]}),
                404,
                "unknown task 'nope'; this server has tasks: movie, nli, four",
            )
            one_line_error(await post("/v1/classify", json={"task": "movie", "texts": ["a"] * 4}), 413, "at most 3")
            one_line_error(await post("/v1/classify", json={"task": "movie", "texts": ["a" * 51]}), 413, "at most 50 per text")
            one_line_error(await post("/v1/classify", json={"task": "nli", "texts": [["a" * 30, "b" * 30]]}), 413, "at most 50")
            one_line_error(
                await post("/v1/classify", content=b"x" * 2001, headers={"content-type": "application/json"}), 413, "over 2000 bytes"
            )
            one_line_error(
                await post("/v1/classify", content=b"task=movie", headers={"content-type": "text/plain"}), 415, "application/json"
            )
            one_line_error(await c.get("/v1/classify"), 405, "Method Not Allowed")
            one_line_error(await c.get("/nowhere"), 404, "Not Found")
            # admin: 401 without the right token (and 403 on a server started without one, below)
            one_line_error(await post("/admin/tasks/late", headers={"Authorization": "Bearer wrong"}), 401, "Bearer")
            one_line_error(await c.delete("/admin/tasks/movie"), 401, "Bearer")
            one_line_error(await post("/admin/tasks/late", headers=ADMIN), 422, "no task file tasks/late.json")
            one_line_error(await post("/admin/tasks/movie", headers=ADMIN), 409, "already served")
            one_line_error(await post("/admin/tasks/..%2Fbase", headers=ADMIN), 404, "Not Found")
            one_line_error(await post("/admin/tasks/.hidden", headers=ADMIN), 422, "not a task name")
            one_line_error(await c.delete("/admin/tasks/nope", headers=ADMIN), 404, "unknown task 'nope'")
            metrics = (await c.get("/metrics")).text
            assert metric(metrics, "metatt_request_errors_total", task="movie", code="413") == 2
            assert metric(metrics, "metatt_request_errors_total", task="-", code="422") == 8
        app = create_app(runtime, ServeSettings())
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app.state.server.loaded.wait(), 30)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
                one_line_error(await c.post("/admin/tasks/late", headers=ADMIN), 403, "METATT_ADMIN_TOKEN or --admin-token-file")

    run(main())


class Gated:
    """A runtime whose model calls wait for a gate (to hold rows in flight) or fail (a bug); the rest is the runtime's."""

    def __init__(self, runtime, gate: threading.Event | None = None, fail: bool = False):
        self.runtime, self.gate, self.fail = runtime, gate, fail
        self.calls: list[list[str]] = []

    def __getattr__(self, name):  # tasks, labels, info, add_task, remove_task
        return getattr(self.runtime, name)

    def logits(self, texts, task=None, tasks=None):
        if texts != ["warm-up"]:  # the server's warm-up at load passes
            if self.gate is not None:
                assert self.gate.wait(20)
            if self.fail:
                raise RuntimeError("a bug\nwith a second line")
            self.calls.append(list(tasks))
        return self.runtime.logits(texts, tasks=tasks)


def test_full_queue_loading_and_internal_errors(runtime) -> None:
    async def main():
        gate = threading.Event()
        async with serving(Gated(runtime, gate), max_batch=2, max_wait_ms=0, max_queue=4, max_texts=4) as (c, state):
            held = [asyncio.ensure_future(c.post("/v1/classify", json={"task": "movie", "texts": ["a", "b"]}))]
            while state.batcher.pending("movie") != 2 or state.batcher.depth:  # the first call is running, blocked
                await asyncio.sleep(0.005)
            held.append(
                asyncio.ensure_future(
                    c.post("/v1/classify", json={"task": "nli", "texts": [["c", "d"], ["e", "f"], ["g", "h"], ["i", "j"]]})
                )
            )
            while state.batcher.depth != 4:
                await asyncio.sleep(0.005)
            r = await c.post("/v1/classify", json={"task": "movie", "texts": ["g"]})
            one_line_error(r, 429, "queue full (4 of 4 rows waiting)")
            assert r.headers["retry-after"] == "1"
            assert metric((await c.get("/metrics")).text, "metatt_queue_depth") == 4
            gate.set()
            assert [h.status_code for h in await asyncio.gather(*held)] == [200, 200]

        loading = threading.Event()

        def slow_factory():
            assert loading.wait(20)
            return runtime

        async with serving(slow_factory) as (c, state):
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json()["detail"] == "the model is still loading" and r.headers["retry-after"] == "1"
            assert (await c.get("/healthz")).status_code == 200  # alive while loading
            one_line_error(await c.post("/v1/classify", json={"task": "movie", "texts": ["a"]}), 503, "still loading")
            loading.set()
            await asyncio.wait_for(state.loaded.wait(), 30)
            assert (await c.get("/readyz")).status_code == 200

        def broken_factory():
            return Runtime(runtime.bundle / TASKS_DIR)  # not a bundle: a MetaTTError at load

        async with serving(broken_factory) as (c, state):
            while state.load_error is None:
                await asyncio.sleep(0.01)
            r = await c.get("/readyz")
            assert r.status_code == 503 and "neither a factored bundle" in r.json()["detail"]

        async with serving(Gated(runtime, fail=True)) as (c, _):
            error = one_line_error(
                await c.post("/v1/classify", json={"task": "nli", "texts": [["a", "b"]]}), 500, "internal error (RuntimeError)"
            )
            assert "a bug" not in error  # the message of an unexpected error stays in the server log
            metrics = (await c.get("/metrics")).text
            assert metric(metrics, "metatt_request_errors_total", task="nli", code="500") == 1

    run(main())


# ---------------------------------------------------------------- batching across tasks


def test_rows_of_different_tasks_share_calls_and_match_each_task_alone(runtime) -> None:
    requests = [(task, [text]) for _ in range(4) for task, texts in TEXTS.items() for text in texts]  # 20 requests, 3 tasks

    async def main(cross: bool):
        engine = Gated(runtime)
        async with serving(engine, max_batch=64, max_wait_ms=200, cross_task=cross) as (c, _):
            engine.calls.clear()
            responses = await asyncio.gather(
                *(c.post("/v1/classify", json={"task": task, "texts": texts, "return_logits": True}) for task, texts in requests)
            )
            metrics = (await c.get("/metrics")).text
        return engine.calls, responses, metrics

    calls, responses, metrics = run(main(cross=True))
    assert len(calls) == 1 and sorted(set(calls[0])) == sorted(LABELS) and len(calls[0]) == len(requests)  # one call, 3 tasks
    assert metric(metrics, "metatt_batch_tasks_bucket", le="3.0") == 1 and metric(metrics, "metatt_batch_tasks_bucket", le="2.0") == 0
    for (task, texts), r in zip(requests, responses):
        assert r.status_code == 200 and r.json()["task"] == task
        got = np.array(r.json()["predictions"][0]["logits"])
        alone = runtime.logits([as_input(texts[0])], task=task)[0]
        assert got.shape == alone.shape and np.abs(got - alone).max() <= 1e-5
    calls, responses, _ = run(main(cross=False))
    assert sorted(map(tuple, calls)) == sorted((t,) * (4 * len(TEXTS[t])) for t in LABELS)  # one call per task
    assert all(r.status_code == 200 for r in responses)


# ---------------------------------------------------------------- tasks added and removed while serving


def test_tasks_added_and_removed_under_load_without_failed_requests(bundles, tmp_path) -> None:
    bundle, grown_adapter, other = bundles
    deployed = tmp_path / "deployed"
    shutil.copytree(bundle, deployed)
    runtime = Runtime(deployed, threads=1)
    gate = threading.Event()
    gate.set()
    statuses: list[int] = []

    async def load(c, stop: asyncio.Event, tasks: list[str]):
        i = 0
        while not stop.is_set() and i < 150:  # bounded
            task = tasks[i % len(tasks)]
            r = await c.post("/v1/classify", json={"task": task, "texts": TEXTS[task]})
            statuses.append(r.status_code)
            i += 1

    async def main():
        async with serving(Gated(runtime, gate), max_batch=8, max_wait_ms=2) as (c, state):
            stop = asyncio.Event()
            clients = [asyncio.ensure_future(load(c, stop, ["movie", "nli"])) for _ in range(4)]
            await asyncio.sleep(0.05)
            # a task written into the bundle while serving (train --add-task + merge --factored --task late)
            await asyncio.to_thread(write_bundle, grown_adapter, deployed, tasks=["late"])
            r = await c.post("/admin/tasks/late", headers=ADMIN)
            assert r.status_code == 201, r.text
            assert r.json() == {"task": "late", "action": "added", "tasks": [*LABELS, "late"]}
            late = await c.post("/v1/classify", json={"task": "late", "texts": ["great", "awful"], "return_logits": True})
            assert late.status_code == 200 and [p["label"] for p in late.json()["predictions"]] != []
            fresh = Runtime(deployed, threads=1)  # a server started now would answer the same
            for text, p in zip(["great", "awful"], late.json()["predictions"]):
                assert np.abs(np.array(p["logits"]) - fresh.logits([text], task="late")[0]).max() <= 1e-5
            # removal: rows in flight for the task are answered, new ones get 404 at once
            gate.clear()  # hold every model call: rows of the load and of 'four' pile up
            queued = [asyncio.ensure_future(c.post("/v1/classify", json={"task": "four", "texts": ["x"]})) for _ in range(5)]
            while state.batcher.pending("four") < 5:
                await asyncio.sleep(0.002)
            removal = asyncio.ensure_future(c.delete("/admin/tasks/four", headers=ADMIN))
            while "four" not in state.removing:
                await asyncio.sleep(0.002)
            one_line_error(await c.post("/v1/classify", json={"task": "four", "texts": ["y"]}), 404, "unknown task 'four'")
            assert not removal.done()  # waiting for the rows in flight
            gate.set()
            assert [q.status_code for q in await asyncio.gather(*queued)] == [200] * 5
            r = await removal
            assert r.status_code == 200 and r.json()["tasks"] == ["movie", "nli", "late"]
            assert "four" not in [t["name"] for t in (await c.get("/v1/tasks")).json()["tasks"]]
            # task files that do not belong to this bundle are refused, the server keeps serving
            for ext in (".json", ".safetensors", ".onnx_adapter"):
                shutil.copy(other / TASKS_DIR / f"movie{ext}", deployed / TASKS_DIR / f"alien{ext}")
            record = json.loads((other / TASKS_DIR / "movie.json").read_text())
            (deployed / TASKS_DIR / "alien.json").write_text(json.dumps({**record, "task": "alien"}))
            one_line_error(await c.post("/admin/tasks/alien", headers=ADMIN), 422, "belongs to bundle")
            tampered = deployed / TASKS_DIR / "late.safetensors"
            for ext in (".json", ".safetensors", ".onnx_adapter"):
                shutil.copy(deployed / TASKS_DIR / f"late{ext}", deployed / TASKS_DIR / f"copy{ext}")
            record = json.loads((deployed / TASKS_DIR / "late.json").read_text())
            files = {kind: {**entry, "file": entry["file"].replace("late", "copy")} for kind, entry in record["files"].items()}
            (deployed / TASKS_DIR / "copy.json").write_text(json.dumps({**record, "task": "copy", "files": files}))
            (deployed / TASKS_DIR / "copy.safetensors").write_bytes(tampered.read_bytes()[:-1] + b"\0")
            one_line_error(await c.post("/admin/tasks/copy", headers=ADMIN), 422, "(sha256 differs)")
            # re-adding a removed task works
            assert (await c.post("/admin/tasks/four", headers=ADMIN)).status_code == 201
            stop.set()
            await asyncio.gather(*clients)
        return len(statuses)

    n = run(main())
    assert n >= 20 and statuses.count(200) == n  # no request of the load failed during adds and removals


def test_a_single_task_export_is_served_with_a_fixed_task(tmp_path) -> None:
    """serve EXPORT: one task (the export's), the same answers as the Runtime, admin changes refused (409)."""
    exported = export_onnx(build_tiny(tmp_path).merged, tmp_path / "exported" / "mt")
    runtime = Runtime(exported, threads=1)
    (task,) = runtime.tasks

    async def main():
        async with serving(runtime) as (c, _):
            tasks = (await c.get("/v1/tasks")).json()
            assert tasks["tasks"] == [{"name": task, "labels": EXPORT_LABELS}]
            r = await c.post("/v1/classify", json={"task": task, "texts": ["great", "awful"], "return_logits": True})
            assert r.status_code == 200, r.text
            for text, p in zip(["great", "awful"], r.json()["predictions"]):
                assert np.abs(np.array(p["logits"]) - runtime.logits([text], task=task)[0]).max() <= 1e-5
            one_line_error(await c.post("/admin/tasks/other", headers=ADMIN), 409, "fixed set of tasks")
            one_line_error(await c.delete(f"/admin/tasks/{task}", headers=ADMIN), 409, "fixed set of tasks")

    run(main())


# ---------------------------------------------------------------- one bad row never fails other clients (issue 27, class 1)


class Poisoned(Gated):
    """A runtime whose model call fails for any batch holding the text 'poison' (a row the edge checks let through)."""

    def logits(self, texts, task=None, tasks=None):
        if "poison" in texts:
            raise MetaTTError("this row cannot be encoded")
        if "bug" in texts:
            raise RuntimeError("a bug")
        return super().logits(texts, task=task, tasks=tasks)


def test_a_bad_row_fails_only_its_own_request(runtime) -> None:
    """Refused at the edge (invalid Unicode) or failing in a shared model call: only that request fails, with a 4xx."""
    valid = [(task, text) for _ in range(10) for task, texts in TEXTS.items() for text in texts]  # 50 requests, 3 tasks
    bad = [("movie", "poison")] * 5 + [("four", "bug")] * 2

    async def main():
        engine = Poisoned(runtime)
        async with serving(engine, max_batch=16, max_wait_ms=100) as (c, state):
            surrogate = b'{"task": "movie", "texts": ["fine", "\\ud800 lone"]}'
            requests = [c.post("/v1/classify", json={"task": t, "texts": [x], "return_logits": True}) for t, x in valid + bad]
            requests += [c.post("/v1/classify", content=surrogate, headers={"content-type": "application/json"}) for _ in range(5)]
            responses = await asyncio.gather(*requests)
            return responses, engine.calls

    responses, calls = run(main())
    for (task, text), r in zip(valid, responses):
        assert r.status_code == 200, r.text
        got = np.array(r.json()["predictions"][0]["logits"])
        assert np.abs(got - runtime.logits([as_input(text)], task=task)[0]).max() <= 1e-5
    assert max(len(call) for call in calls) > 1  # valid rows did share calls with each other
    rest = responses[len(valid) :]
    for r in rest[:5]:
        one_line_error(r, 422, "this row cannot be encoded")
    for r in rest[5:7]:
        one_line_error(r, 500, "internal error (RuntimeError)")  # a bug stays a 500, for its own request only
    for r in rest[7:]:
        one_line_error(r, 422, "texts.1: not valid Unicode text")


def test_errors_that_echo_input_are_encodable(runtime) -> None:
    async def main():
        async with serving(runtime) as (c, _):
            json_body = {"content-type": "application/json"}
            r = await c.post("/v1/classify", content=b'{"task": "\\udc80x", "texts": ["a"]}', headers=json_body)
            assert "\\udc80x" in one_line_error(r, 404, "unknown task")
            r = await c.post("/v1/classify", content=b'{"task": "movie", "texts": ["a"], "\\ud800": 1}', headers=json_body)
            one_line_error(r, 422, "body")  # a field name with a lone surrogate: still one encodable line

    run(main())


# ---------------------------------------------------------------- a task's inputs (issue 27, class 7)


def test_pairs_for_single_sentence_tasks_and_sentences_for_pair_tasks_are_422(runtime) -> None:
    async def main():
        async with serving(runtime) as (c, _):
            r = await c.post("/v1/classify", json={"task": "movie", "texts": ["fine", ["a", "b"]]})
            one_line_error(r, 422, "texts.1: task 'movie' takes one text, not a sentence pair per row")
            r = await c.post("/v1/classify", json={"task": "nli", "texts": ["A man sleeps."]})
            one_line_error(r, 422, "texts.0: task 'nli' takes a sentence pair [first, second] per row")
            assert (await c.post("/v1/classify", json={"task": "nli", "texts": [["A man sleeps.", "He is awake."]]})).status_code == 200

    run(main())


# ---------------------------------------------------------------- operations (issue 27, class 8)


def test_a_non_ascii_admin_token_matches_a_utf8_client_and_docs_are_opt_in(runtime) -> None:
    async def main():
        app = create_app(runtime, ServeSettings(admin_token="clé-ß€", docs=True))
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app.state.server.loaded.wait(), 30)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
                r = await c.delete("/admin/tasks/nope", headers={"Authorization": "Bearer clé-ß€".encode()})
                one_line_error(r, 404, "unknown task 'nope'")  # past the token check
                r = await c.delete("/admin/tasks/nope", headers={"Authorization": "Bearer clé-ß".encode("latin-1")})
                one_line_error(r, 401, "UTF-8")
                assert (await c.get("/docs")).status_code == 200

    run(main())
    for token in ("", "two words", "line\nbreak", "\ud800"):
        with pytest.raises(MetaTTError, match="admin token"):
            ServeSettings(admin_token=token).check()


# ---------------------------------------------------------------- a broken task record (issue 27, class 3)


def test_a_corrupt_task_record_is_skipped_and_reported(bundles, tmp_path) -> None:
    deployed = tmp_path / "deployed"
    shutil.copytree(bundles[0], deployed)
    (deployed / TASKS_DIR / "four.json").write_text('{"task": "four", "labels": [')  # truncated
    runtime = Runtime(deployed, threads=1)
    assert runtime.tasks == ["movie", "nli"] and set(runtime.skipped) == {"four.json"}
    with pytest.raises(MetaTTError, match="task 'four' is not served: .*four.json"):
        runtime.predict(["x"], task="four")

    async def main():
        async with serving(runtime) as (c, _):
            detail = (await c.get("/readyz")).json()["detail"]
            assert detail.startswith("2 task(s); skipped four.json: ") and "four.json" in detail
            assert (await c.post("/v1/classify", json={"task": "movie", "texts": ["fine"]})).status_code == 200

    run(main())
    for name in ("movie", "nli"):
        (deployed / TASKS_DIR / f"{name}.json").write_text("[]")
    with pytest.raises(MetaTTError, match="has no task that can be served"):
        Runtime(deployed)
