"""The server on real sockets (127.0.0.1, a free port, bounded waits): `metatt-deploy serve` starts
in seconds and answers; a shutdown while requests are queued answers every one of them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from multitask_fixtures import build_tiny_multitask
from servers import free_port, stop, wait_ready
from typer.testing import CliRunner

from metatt_deploy.cli import app as cli
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.serving.app import create_app
from metatt_deploy.serving.http import ServeSettings
from metatt_deploy.serving.runtime import Runtime
from metatt_deploy.serving.server import ServeConfig

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


def test_bad_options_are_one_line_errors(bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for args, match in (
        ([str(tmp_path / "missing")], "not found"),
        ([str(bundle), "--max-batch", "0"], "--max-batch must be at least 1"),
        ([str(bundle), "--max-queue", "8", "--max-texts", "16"], "must hold at least one full request"),
        ([str(bundle), "--workers", "0"], "--workers must be at least 1"),
    ):
        result = runner.invoke(cli, ["serve", *args])
        assert result.exit_code == 2 and match in result.output, result.output


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
                asyncio.ensure_future(c.post("/v1/classify", json={"task": task, "texts": ["some text"]}))
                for task in ("movie", "nli", "four") * 4
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
