"""The server on real sockets (127.0.0.1, a free port, bounded waits): `metatt-deploy serve` starts
in seconds and answers; a shutdown while requests are queued answers every one of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from multitask_fixtures import build_tiny_multitask
from servers import free_port, stop, uvicorn_thread, wait_ready
from tiny_decoders import save_tiny_multitask
from typer.testing import CliRunner

from metatt_deploy.cli import app as cli
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.export.merge import merge_factored
from metatt_deploy.serving import http as http_module
from metatt_deploy.serving.app import create_app
from metatt_deploy.serving.http import ServeSettings
from metatt_deploy.serving.runtime import Runtime
from metatt_deploy.serving.server import CONFIG_ENV, ServeConfig, app_from_env, read_admin_token

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("server")
    _, adapter, _, _ = build_tiny_multitask(root)
    write_bundle(adapter, root / "bundle")
    return root / "bundle"


def test_serve_cli_starts_in_seconds_answers_and_stops_on_sigterm(bundle: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "METATT_ADMIN_TOKEN": "t0ken"}
    command = [sys.executable, "-m", "metatt_deploy", "serve", str(bundle), "--port", str(port), "--threads", "1", "--max-batch", "8"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seconds = wait_ready(url, 120, process)
        assert seconds < 90  # tiny model, bound loose for a shared CPU; the real model's startup: docs/reports/serving-load.md
        r = httpx.post(f"{url}/v1/classify", json={"task": "nli", "texts": [["A man sleeps.", "A man is awake."]]}, timeout=10)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("entailment", "neutral", "contradiction")
        r = httpx.delete(f"{url}/admin/tasks/four", headers={"Authorization": "Bearer t0ken"}, timeout=10)
        assert r.status_code == 200  # the token reached the server through its environment variable
    finally:
        log = stop(process)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
    assert process.returncode == -signal.SIGTERM and "Application shutdown complete" in log and "Traceback" not in log


def test_a_server_that_cannot_serve_exits_2_with_one_line(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """Options, the port, the host and the model are all checked before uvicorn starts (issue 27, class 3)."""
    monkeypatch.delenv("METATT_ADMIN_TOKEN", raising=False)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    (tmp_path / "folder").mkdir()
    (tmp_path / "token").write_bytes(b"\xff\xfe")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    runner = CliRunner()
    for args, match in (
        ([str(tmp_path / "missing")], "not found"),
        ([str(tmp_path / "missing"), "--ray-replicas", "1"], "not found"),  # before Ray starts
        ([str(data)], "is not a factored bundle"),
        ([str(tmp_path / "folder")], "neither a factored bundle"),
        ([str(bundle), "--form", "fast"], "unknown form 'fast'"),
        ([str(bundle), "--max-batch", "0"], "--max-batch must be between 1"),
        ([str(bundle), "--max-queue", "8", "--max-texts", "16"], "must hold at least one full request"),
        ([str(bundle), "--workers", "0"], "--workers must be between 1"),
        ([str(bundle), "--threads", "0"], "--threads must be between 1"),
        ([str(bundle), "--graceful-seconds", "-1"], "--graceful-seconds must be between 0"),
        ([str(bundle), "--max-wait-ms", "nan"], "--max-wait-ms must be a finite number"),
        ([str(bundle), "--max-wait-ms", "inf"], "--max-wait-ms must be a finite number"),
        ([str(bundle), "--max-wait-ms", "-1"], "--max-wait-ms must be between 0"),
        ([str(bundle), "--body-timeout-seconds", "nan"], "--body-timeout-seconds must be a finite number"),
        ([str(bundle), "--keep-alive-seconds", "0"], "--keep-alive-seconds must be between"),
        ([str(bundle), "--port", "65536"], "--port must be between 1 and 65535, got 65536"),
        ([str(bundle), "--port", "0"], "--port must be between 1 and 65535"),
        ([str(bundle), "--port", "-80"], "--port must be between 1 and 65535"),
        ([str(bundle), "--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1:"),
        ([str(bundle), "--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' does not resolve"),
        ([str(bundle), "--admin-token-file", str(tmp_path / "nope")], "cannot read the admin token file"),
        ([str(bundle), "--admin-token-file", str(tmp_path / "token")], "is not UTF-8 text"),
    ):
        result = runner.invoke(cli, ["serve", *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], (args, result.output)
    taken.close()
    assert "--admin-token " not in runner.invoke(cli, ["serve", "--help"]).output  # never on the command line, where ps shows it


def test_admin_token_from_a_file_or_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("METATT_ADMIN_TOKEN", raising=False)
    path = tmp_path / "token"
    path.write_text("clé-ß\n", encoding="utf-8")
    assert read_admin_token(path) == "clé-ß" and read_admin_token(None) is None
    monkeypatch.setenv("METATT_ADMIN_TOKEN", "from-env")
    assert read_admin_token(None) == "from-env"
    with pytest.raises(MetaTTError, match="given twice"):
        read_admin_token(path)


def test_config_travels_to_workers_without_the_admin_token(bundle: Path, monkeypatch) -> None:
    config = ServeConfig(model=str(bundle), settings=ServeSettings(max_batch=7, admin_token="secret"), threads=2)
    text = config.to_json()
    assert "secret" not in text
    monkeypatch.setenv("METATT_ADMIN_TOKEN", "secret")
    back = ServeConfig.from_json(text)
    assert back == config


def test_shutdown_answers_every_queued_request(bundle: Path) -> None:
    """uvicorn's graceful shutdown waits for open requests; the lifespan then drains the batcher."""
    runtime = Runtime(bundle, threads=1)
    app = create_app(runtime, ServeSettings(max_batch=64, max_wait_ms=1500))  # rows sit in the queue for 1.5 s
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=20))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 30)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            inflight = [
                asyncio.ensure_future(c.post("/v1/classify", json={"task": task, "texts": [text]}))
                for task, text in (("movie", "some text"), ("nli", ["a text", "another"]), ("four", "some text")) * 4
            ]
            while app.state.server.batcher.depth < len(inflight):  # all 12 queued, none answered yet
                await asyncio.sleep(0.01)
            server.should_exit = True  # what SIGTERM does
            return await asyncio.gather(*inflight)

    responses = asyncio.run(asyncio.wait_for(main(), 60))
    thread.join(30)
    assert not thread.is_alive()
    assert [r.status_code for r in responses] == [200] * 12
    assert all(len(r.json()["predictions"]) == 1 for r in responses)
    with pytest.raises(httpx.TransportError):  # and the port is closed
        httpx.get(f"{url}/healthz", timeout=2)


@pytest.mark.slow
def test_workers_each_load_the_model_and_metrics_cover_all_of_them(bundle: Path) -> None:
    """--workers 2: two processes on one port; /metrics of whichever answers counts every worker's requests."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [sys.executable, "-m", "metatt_deploy", "serve", str(bundle), "--port", str(port), "--threads", "1", "--workers", "2"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, 120, process)
        time.sleep(5)  # the second worker may still be warming up: /readyz answered from one of them
        n = 40
        for _ in range(n):  # new connections: the kernel spreads them over both workers
            assert (
                httpx.post(
                    f"{url}/v1/classify", json={"task": "movie", "texts": ["fine"]}, headers={"connection": "close"}, timeout=30
                ).status_code
                == 200
            )
        pids = {
            int(line.split()[0])
            for line in subprocess.run(["pgrep", "-P", str(process.pid), "-a"], capture_output=True, text=True).stdout.splitlines()
            if "multiprocessing" in line
        }
        assert len(pids) >= 2
        for _ in range(5):  # whichever worker answers the scrape
            text = httpx.get(f"{url}/metrics", headers={"connection": "close"}, timeout=10).text
            assert f'metatt_requests_total{{task="movie"}} {float(n)}' in text
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()


# ---------------------------------------------------------------- limits on the wire (issue 27, class 2)


def http_answer(sock: socket.socket, seconds: float = 10) -> tuple[int, dict]:
    """Status and JSON body of the answer on ``sock`` (read until the server closes or the body is complete)."""
    sock.settimeout(seconds)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
        next((line.split(b":")[1] for line in data.split(b"\r\n") if line.lower().startswith(b"content-length:")), b"0")
    ):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture(scope="module")
def wire(bundle: Path):
    """The bundle served as `serve` serves it, with a 1 MiB body limit and 1 s body and keep-alive times."""
    settings = ServeSettings(body_timeout_s=1.0, keep_alive_s=1.0)
    with uvicorn_thread(create_app(Runtime(bundle, threads=1), settings), settings) as (url, _):
        yield int(url.rsplit(":", 1)[1])


def test_a_chunked_body_is_refused_at_the_limit(wire: int) -> None:
    """100 MiB of chunked JSON: answered 413 once the server has counted 1 MiB; the sender is cut off soon after."""
    sock = socket.create_connection(("127.0.0.1", wire))
    sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b'"tiny text", ' * 5000
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    sent = 0
    try:
        sock.sendall(b'5\r\n{"tas\r\n')
        while sent < 100 << 20:
            sock.sendall(chunk)
            sent += len(piece)
    except OSError:
        pass  # the server answered and closed the connection
    status, body = http_answer(sock)
    sock.close()
    assert status == 413 and body == {
        "error": f"request body over {1 << 20} bytes; send a smaller request (fewer or shorter texts or messages)"
    }
    assert sent < 24 << 20, (
        sent
    )  # the rest of the 100 MiB was never taken: the server read about 1 MiB, loopback socket buffers took the rest
    r = httpx.post(
        f"http://127.0.0.1:{wire}/v1/classify",
        content=iter([json.dumps({"task": "movie", "texts": ["x" * 4000] * 64}).encode()[:1000], b" " * (2 << 20)]),
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413 and set(r.json()) == {"error"}  # 2 MiB chunked, valid JSON once whole: refused all the same


def test_malformed_content_length_gets_the_json_error_shape(wire: int) -> None:
    for length in (b"12abc", b"-1", b"1, 2", b"99999999999999999999999"):
        with socket.create_connection(("127.0.0.1", wire)) as sock:
            body = b'{"task": "movie", "texts": ["a"]}'
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: " + length + b"\r\n\r\n" + body
            )
            status, answer = http_answer(sock)
        assert status in (400, 413) and set(answer) == {"error"}, (length, status, answer)


def test_trickling_bodies_and_silent_connections_are_cut_off(wire: int) -> None:
    """Body: 408 after --body-timeout-seconds however slowly bytes keep coming; headers or nothing: closed after the keep-alive time."""
    with socket.create_connection(("127.0.0.1", wire)) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(20):  # a byte every 0.2 s: 4 s if nothing stopped it
                sock.sendall(b" ")
                time.sleep(0.2)
                if select.select([sock], [], [], 0)[0]:
                    break
        status, body = http_answer(sock)
        assert status == 408 and "did not arrive within 1 s" in body["error"] and time.monotonic() - started < 3.5
    for trickle in (b"", b"POST /v1/classify HTTP/1.1\r\nHost: t\r\n"):
        with socket.create_connection(("127.0.0.1", wire)) as sock:
            started = time.monotonic()
            sock.settimeout(0.2)
            closed = False
            for byte in (trickle or b"\0" * 20)[:20]:
                if trickle:
                    with contextlib.suppress(OSError):
                        sock.send(bytes([byte]))
                try:
                    closed = sock.recv(1) == b""
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                if closed:
                    break
            assert closed and time.monotonic() - started < 3, trickle  # 1 s keep-alive, 4 s if never closed


def test_requests_sent_during_shutdown_are_answered(bundle: Path, monkeypatch) -> None:
    """After SIGTERM, a connection the kernel already took and a request on an idle keep-alive connection are answered, not reset."""
    monkeypatch.setattr(http_module, "SHUTDOWN_GRACE_S", 2.0)  # wide margins for a loaded machine
    settings = ServeSettings(keep_alive_s=30)
    request = b'POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 33\r\n\r\n{"task": "movie", "texts": ["a"]}'
    with uvicorn_thread(create_app(Runtime(bundle, threads=1), settings), settings) as (url, server):
        port = int(url.rsplit(":", 1)[1])
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(request)
        assert http_answer(idle)[0] == 200  # the connection stays open, idle
        server.should_exit = True  # what SIGTERM does
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port)) as late:  # the listener is still open (grace): accepted
            late.sendall(request)
            assert http_answer(late)[0] == 200
        time.sleep(2.5)  # connections are being shut down now; the idle one gets its grace
        idle.sendall(request)
        status, _ = http_answer(idle)
        idle.close()
        assert status == 200


def test_the_export_task_type_picks_the_app_in_every_worker(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """A worker process's app (built from the environment, model loaded in its lifespan) is the classify API for a classifier
    and the OpenAI API for a decoder bundle: one table keyed by the export's task type, not a branch per call site."""
    _, adapter = save_tiny_multitask(tmp_path, ["alpha", "beta"], seed=1)
    merge_factored(adapter, tmp_path / "llm")
    for model, route, body in (
        (bundle, "/v1/classify", {"task": "movie", "texts": ["fine"]}),
        (tmp_path / "llm", "/v1/completions", {"model": "beta", "prompt": "fine", "max_tokens": 2}),
    ):
        monkeypatch.setenv(CONFIG_ENV, ServeConfig(model=str(model), threads=1).to_json())
        with uvicorn_thread(app_from_env(), ServeSettings()) as (url, _):
            r = httpx.post(url + route, json=body, timeout=30)
            assert r.status_code == 200, r.text
        if route == "/v1/completions":  # serve's body limit holds for the decoder app too, in OpenAI's error shape
            small = ServeConfig(model=str(model), threads=1, settings=ServeSettings(max_body_bytes=4096))
            monkeypatch.setenv(CONFIG_ENV, small.to_json())
            with uvicorn_thread(app_from_env(), ServeSettings()) as (url, _):
                r = httpx.post(url + route, json={**body, "prompt": "x" * 5000}, timeout=30)
                assert r.status_code == 413 and "request body over 4096 bytes" in r.json()["error"]["message"], r.text
