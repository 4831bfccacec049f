"""Node, npm and Chromium for the slow JS tests: a cached npm install and a loopback static server.

The packages of js/package.json are installed with npm into a scratch folder outside the
repository (``$METATT_NPM_DIR``, default ``/tmp/metatt-npm-tests``), once; later runs reuse it
while its package.json is unchanged. onnxruntime-node's install script is told to skip its
optional GPU download (``ONNXRUNTIME_NODE_INSTALL=skip``): the CPU binaries ship in the package.
The tests skip only when npm itself is absent; Chromium is installed with apt-get when missing.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "js"
NPM_DIR = Path(os.environ.get("METATT_NPM_DIR", "/tmp/metatt-npm-tests"))
CHROMIUM = "/usr/bin/chromium"


def npm_dir() -> Path:
    """The scratch folder with node_modules installed (skips the test when npm is absent)."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm/node are not installed (the JS tests need Node 20 + npm)")
    NPM_DIR.mkdir(parents=True, exist_ok=True)
    wanted = (HERE / "package.json").read_text()
    current = (NPM_DIR / "package.json").read_text() if (NPM_DIR / "package.json").is_file() else None
    if current != wanted or not (NPM_DIR / "node_modules").is_dir():
        (NPM_DIR / "package.json").write_text(wanted)
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund"], cwd=NPM_DIR, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr[-2000:]
    for script in HERE.glob("*.mjs"):
        shutil.copyfile(script, NPM_DIR / script.name)
    return NPM_DIR


def node(script: str, *args: str, timeout: float = 300) -> object:
    """Run one of js/*.mjs in the scratch folder; returns its last stdout line as JSON."""
    done = subprocess.run(["node", script, *args], cwd=npm_dir(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-1000:], done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing."""
    if not Path(CHROMIUM).is_file():
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, f"{' '.join(command)} failed: {done.stderr[-1000:]}"
    return CHROMIUM


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".wasm": "application/wasm"}

    def log_message(self, *args) -> None:
        pass


@contextmanager
def static_server(root: Path, max_requests: int = 200, max_seconds: float = 300):
    """A static file server for ``root`` on 127.0.0.1 (a free port): at most ``max_requests`` requests, ``max_seconds`` long."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    server.timeout = 0.5
    served = [0]
    finish = server.finish_request

    def counted(request, address) -> None:
        served[0] += 1
        finish(request, address)

    server.finish_request = counted  # type: ignore[method-assign]
    deadline = time.monotonic() + max_seconds
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set() and served[0] < max_requests and time.monotonic() < deadline:
            server.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.server_close()
