"""Real servers in tests: a free loopback port, and waiting (bounded) until a server is ready."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import httpx


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
