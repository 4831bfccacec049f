"""Real servers in tests: a free loopback port, waiting (bounded) until a server is ready, and an app served in a thread."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx

from metatt_deploy.serving.http import DrainingServer, JsonHttpProtocol, ServeSettings, bind
from metatt_deploy.serving.server import uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, seconds: float, process: subprocess.Popen | None = None) -> float:
    """Seconds until GET /readyz answers 200 (fails after ``seconds``)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stderr.read() if process.stderr else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready after {seconds} s")


def stop(process: subprocess.Popen) -> str:
    """SIGTERM, wait (bounded) for a graceful exit, kill if it hangs; returns what the server wrote to stderr."""
    process.send_signal(signal.SIGTERM)
    try:
        _, log = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    return log or ""


@contextlib.contextmanager
def uvicorn_thread(app, settings: ServeSettings, graceful_s: int = 20, http=JsonHttpProtocol) -> Iterator[tuple[str, DrainingServer]]:
    """``app`` served as `metatt-deploy serve` serves it (socket from `bind`, the same uvicorn config, ``http`` its protocol), in a thread."""
    port = free_port()
    sock = bind("127.0.0.1", port)
    server = DrainingServer(uvicorn_config(app, settings, graceful_s, "warning", http))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 60)
        yield url, server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
