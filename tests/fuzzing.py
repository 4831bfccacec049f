"""Shared by the fuzz tests (CLI: test_cli_fuzz*.py; HTTP: serving/test_*_fuzz.py): seeded corruptions of JSON, bytes,
safetensors and JSONL files, the CLI case runner that checks the promises every command keeps, and the HTTP pieces
(raw-wire requests, reading raw answers, valid clients that run alongside the bad ones).

Every generator takes a ``random.Random`` so a run is reproducible; ``METATT_FUZZ_SEED`` picks another run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import socket
import struct
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
from typer.testing import CliRunner

from metatt_deploy.cli import app

SEED = int(os.environ.get("METATT_FUZZ_SEED", "0"))
WEIRD = [
    None,
    True,
    -1,
    0,
    1,
    3,
    10**12,
    -(10**12),
    1.5,
    float("nan"),
    float("inf"),
    "",
    "x",
    "../../outside",
    [],
    {},
    [1, 2],
    {"a": 1},
    "0" * 40,
]

# ---------------------------------------------------------------- corruptions


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON value, containers included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def _delete(obj, path):
    for key in path[:-1]:
        obj = obj[key]
    del obj[path[-1]]


def mutate_json(rng: random.Random, obj):
    """One structural change: a value replaced, nudged or dropped, a key added, a list reshaped."""
    obj = json.loads(json.dumps(obj))
    paths = [p for p, _ in _paths(obj) if p]
    if not paths:
        return rng.choice(WEIRD)
    path = rng.choice(paths)
    value = dict(_paths(obj))[path]
    kind = rng.choice(["replace", "replace", "nudge", "delete", "add", "list"])
    if kind == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
        _set(obj, path, value + rng.choice([-1, 1, 7, -value - 1]) if isinstance(value, int) else value * rng.choice([-1, 0.5, 1e6]))
    elif kind == "delete":
        _delete(obj, path)
    elif kind == "add" and isinstance(value, dict):
        value[rng.choice(["unknown", "extra_field", "tasks"])] = rng.choice(WEIRD)
    elif kind == "list" and isinstance(value, list) and value:
        rng.choice([value.reverse, value.pop, lambda: value.append(value[0]), lambda: value.insert(0, rng.choice(WEIRD))])()
    else:
        _set(obj, path, rng.choice(WEIRD))
    return obj


def corrupt_bytes(rng: random.Random, data: bytes) -> bytes:
    kind = rng.choice(["truncate", "flip", "garbage", "empty", "latin1"])
    if kind == "truncate":
        return data[: rng.randrange(max(1, len(data)))]
    if kind == "flip" and data:
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    if kind == "latin1":
        return data.replace(b"e", b"\xe9", 3)
    return b""


def corrupt_json_file(rng: random.Random, path: Path) -> None:
    data = path.read_bytes()
    if rng.random() < 0.7:
        text = json.dumps(mutate_json(rng, json.loads(data)), indent=1)  # NaN / Infinity as Python writes them
        path.write_text(text)
    else:
        path.write_bytes(corrupt_bytes(rng, data))


def corrupt_safetensors(rng: random.Random, path: Path) -> None:
    """The JSON header (dtypes, shapes, offsets, metadata), its length prefix, or the tensor bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    kind = rng.choice(["header", "header", "prefix", "body", "nan"])
    if kind == "header":
        raw = json.dumps(mutate_json(rng, header)).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    elif kind == "prefix":
        path.write_bytes(struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**40])) + data[8:])
    elif kind == "body":
        path.write_bytes(data[: 8 + n] + corrupt_bytes(rng, body)[: len(body)].ljust(len(body), b"\0"))
    else:  # a NaN written over one float32 of some tensor
        name = rng.choice([k for k in header if k != "__metadata__"])
        start = header[name]["data_offsets"][0]
        body = body[:start] + struct.pack("<f", rng.choice([math.nan, math.inf])) + body[start + 4 :]
        path.write_bytes(data[: 8 + n] + body)


def corrupt_jsonl(rng: random.Random, path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    kind = rng.choice(["row", "row", "single_class", "bytes", "not_json", "many_classes"])
    if kind == "row":
        i = rng.randrange(len(rows))
        rows[i] = mutate_json(rng, {"r": rows[i]}).get("r", None) if rng.random() < 0.8 else rng.choice(WEIRD)
    elif kind == "single_class":
        rows = [{**r, "label": "positive"} for r in rows]
    elif kind == "many_classes":
        rows = [{**r, "label": f"class{i}"} for i, r in enumerate(rows)]
    if kind == "bytes":
        path.write_bytes(corrupt_bytes(rng, path.read_bytes()))
    elif kind == "not_json":
        path.write_text(path.read_text().replace("}", "", 1))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def corrupt_file(rng: random.Random, path: Path) -> None:
    """The corruption that fits the file's kind."""
    if path.suffix == ".json":
        corrupt_json_file(rng, path)
    elif path.suffix == ".safetensors":
        corrupt_safetensors(rng, path)
    elif path.suffix == ".jsonl":
        corrupt_jsonl(rng, path)
    else:
        path.write_bytes(corrupt_bytes(rng, path.read_bytes()))


# ---------------------------------------------------------------- CLI cases


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the given folders (or of the given files), and the file lists."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class CliCases:
    """Runs commands in-process (typer's CliRunner) and records every broken promise.

    A case must end with exit status 0 or 2 (never 1, an uncaught exception); on exit 2 exactly
    one stderr line starting ``error:``; no ``Traceback``; its inputs byte-identical; and nothing at
    its output path unless it succeeded.
    """

    def __init__(self) -> None:
        self.runner = CliRunner()
        self.failures: list[str] = []
        self.outcomes: Counter = Counter()
        self.seconds: Counter = Counter()  # per label, printed: where the run's time goes
        self.n = 0

    def run(self, argv: list[str], out: Path | None, inputs: list[Path], label: str, stdin=None, may_leave=None, writes_inputs=False):
        """One case; ``may_leave(result)`` says whether a failed run may leave ``out`` (validate's report after a parity failure);
        ``writes_inputs``: a command that writes into its input (export --genai) may change it, when it succeeds."""
        self.n += 1
        before = snapshot(*inputs)
        started = time.perf_counter()
        result = self.runner.invoke(app, argv, input=stdin)
        self.seconds[label] += time.perf_counter() - started
        err = [line for line in result.stderr.splitlines() if line.strip()]
        where = f"case {self.n} ({label}, seed {SEED}): {argv} -> {result.exit_code}"
        if result.exit_code not in (0, 2) or "Traceback" in result.output:
            frames = [f for f in traceback.extract_tb(result.exc_info[2]) if "metatt_deploy" in f.filename] if result.exc_info else []
            at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
            self.failures.append(f"{where}: {type(result.exception).__name__}: {result.exception}{at}")
        elif result.exit_code == 2 and (len(err) != 1 or not err[0].startswith("error: ")):
            self.failures.append(f"{where}: stderr is not one error line: {err}")
        after = snapshot(*inputs)
        if after != before and not (writes_inputs and result.exit_code == 0):
            self.failures.append(f"{where}: inputs changed: {sorted(k for k in before if before[k] != after.get(k))[:3]}")
        if result.exit_code != 0 and out is not None and out.exists() and not (may_leave and may_leave(result)):
            self.failures.append(f"{where}: output left behind: {sorted(p.name for p in out.iterdir())[:5] if out.is_dir() else out}")
        self.outcomes[(label.split()[0], result.exit_code)] += 1
        return result

    def check(self, at_least: int) -> None:
        print(dict(self.outcomes), {k: round(v, 1) for k, v in self.seconds.items()})
        assert self.n >= at_least, self.n
        assert not self.failures, f"{len(self.failures)} failures:\n" + "\n".join(self.failures[:20])


# ---------------------------------------------------------------- HTTP cases


def spoil_body(rng: random.Random, body: dict, oversized: dict) -> tuple[dict[str, str], bytes]:
    """(headers, raw body) of a JSON request: ``body`` as a JSON client sends it, or spoiled (truncated, not JSON, lone
    surrogates as raw invalid UTF-8, a wrong content type, deep nesting, or ``oversized``, a body over the limit)."""
    raw = json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \\ud800 escapes; NaN / Infinity as Python writes them
    headers = {"content-type": "application/json"}
    roll = rng.random()
    if roll < 0.08:
        raw = raw[: rng.randrange(len(raw))]  # truncated JSON
    elif roll < 0.12:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))  # not JSON, maybe not UTF-8
    elif roll < 0.15:
        raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")  # surrogates as raw (invalid) UTF-8
    elif roll < 0.18:
        headers = {"content-type": rng.choice(["text/plain", "application/x-www-form-urlencoded", "", "application/json; charset=latin-1"])}
    elif roll < 0.2:
        raw = b"[" * 5000 + b"]" * 5000  # deep nesting
    elif roll < 0.23:
        raw = json.dumps(oversized).encode()  # over the body limit
    return headers, raw


def wire_case(rng: random.Random, path: str, body: bytes) -> bytes:
    """A raw HTTP/1.1 exchange around a valid ``body`` for ``path``: framing, headers and request lines a client can get wrong."""
    head = b"POST %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\n" % path.encode()
    kind = rng.randrange(9)
    if kind == 0:  # malformed Content-Length
        length = rng.choice([b"abc", b"-5", b"1e3", b" ", b"0x10", b"12, 13", b"99999999999999999999", b"\xff"])
        return head + b"Content-Length: " + length + b"\r\n\r\n" + body
    if kind == 1:  # two different Content-Lengths
        return head + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(body), len(body) + 1) + body
    if kind == 2:  # a Content-Length shorter than the body (the rest is read as the next request) or longer (body timeout)
        return head + b"Content-Length: %d\r\n\r\n" % max(len(body) + rng.choice([-10, -1, 5]), 0) + body
    if kind == 3:  # chunked with bad sizes or encoding
        chunks = rng.choice(
            [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}\r\n", b"-1\r\n\r\n", b"5\r\n{}\r\n0\r\n\r\n", b"ffffffffffffffff\r\nab\r\n"]
        )
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks
    if kind == 4:  # chunked over the limit, in chunks of random sizes
        size = rng.choice([100, 1000, 4000])
        piece = b" " * size
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + (b"%x\r\n%s\r\n" % (size, piece)) * (9000 // size + 2) + b"0\r\n\r\n"
    if kind == 5:  # both framings at once
        return head + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body) + body
    if kind == 6:  # garbage request line or header
        return rng.choice(
            [
                b"GARBAGE\r\n\r\n",
                b"POST %s HTTP/9.9\r\nHost: t\r\n\r\n" % path.encode(),
                b"POST %s HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n" % path.encode(),
                b"POST %s HTTP/1.1\r\nHost: t\r\nX: " % path.encode() + b"a" * 70000 + b"\r\n\r\n",
                b"\x00\x01\x02\r\n\r\n",
                bytes(rng.randrange(256) for _ in range(50)) + b"\r\n\r\n",
            ]
        )
    if kind == 7:  # pipelined: a valid request, then a bad one
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body + b"POST %s HTTP/1.1\r\nContent-Length: x\r\n\r\n" % path.encode()
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body  # a valid one, as a control


def read_answers(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Every (status, body) the server sends on ``sock`` before it closes (or goes quiet for 3 s)."""
    sock.settimeout(3)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    answers = []
    while data.startswith(b"HTTP/1.1 "):
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
        answers.append((int(head.split()[1]), rest[:length]))
        data = rest[length:]
    assert not data, data[:200]  # nothing but whole answers
    return answers


def send_raw(port: int, request: bytes) -> list[tuple[int, bytes]]:
    """``request`` sent on a new connection to 127.0.0.1:``port``; the answers (at least one: none is a dropped request)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before taking everything
            sock.sendall(request)
        answers = read_answers(sock)
    assert answers, request[:200]  # every exchange is answered, never just dropped
    return answers


class ValidClients:
    """Threads sending valid requests without pause while the bad ones run; ``ask(client, rng)`` sends one and returns what was wrong."""

    def __init__(self, url: str, ask: Callable[[httpx.Client, random.Random], list[str]], threads: int = 2):
        self.url, self.ask = url, ask
        self.stop = threading.Event()
        self.answered = 0
        self.wrong: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> ValidClients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                self.wrong += self.ask(client, rng)
                self.answered += 1


def raw_http_cases(url: str, ask: Callable[[httpx.Client, random.Random], list[str]], path: str, body: bytes, n: int, check) -> Counter:
    """``n`` raw-wire cases (`wire_case` around ``body`` for ``path``) while valid clients (``ask``) run; every answer passes
    ``check(status, body, case)`` and every valid client gets its right answer. Returns the count of each status."""
    port = int(url.rsplit(":", 1)[1])
    rng = random.Random(SEED + 1)
    codes: Counter = Counter()
    with ValidClients(url, ask) as valid:
        for _ in range(n):
            request = wire_case(rng, path, body)
            for status, answer in send_raw(port, request):
                check(status, answer, request[:200])
                codes[status] += 1
    assert not valid.wrong and valid.answered >= 10, (valid.wrong[:5], valid.answered)
    return codes


def json_cases(url: str, ask: Callable[[httpx.Client, random.Random], list[str]], n: int, make_case, check, check_ok) -> Counter:
    """``n`` requests ``make_case(rng)`` -> (method, path, headers, body) while valid clients (``ask``) run; every answer passes
    ``check(status, body, case)``, a 200 also ``check_ok(method, path, raw, response)``; every valid client gets its right
    answer. Returns the count of each status."""
    rng = random.Random(SEED)
    codes: Counter = Counter()
    with ValidClients(url, ask) as valid, httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(n):
            method, path, headers, raw = make_case(rng)
            r = client.request(method, path, content=raw, headers=headers)
            check(r.status_code, r.content, (method, path, raw[:200]))
            if r.status_code == 200:
                check_ok(method, path, raw, r)
            codes[r.status_code] += 1
    assert not valid.wrong and valid.answered >= 20, (valid.wrong[:5], valid.answered)
    return codes
