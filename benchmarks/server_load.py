"""Load-test ``ticketguard serve`` on loopback with well-behaved and hostile clients at once.

    python benchmarks/server_load.py --requests 300 --workers 16

The server runs in a child process with its default limits, serving a ResNet-20 for CIFAR-shaped inputs
(3x32x32; weights at initialisation, as prediction cost does not depend on training). While a thread pool sends
``--requests`` v2 inferences of 8 images each, other clients send oversized bodies (50 MB declared), malformed
requests (bad Content-Length, deep JSON, binary tensors, unknown routes, too large a batch, NaN pixels),
drip a request one byte every 2 s, or connect and stay silent; then ``--flood`` connections open at once. It
prints what the server answered, by kind; its peak resident memory and threads; and how long a health check
waits idle and under load. Every socket has a timeout and the load has a fixed size, so the run stops by
itself (a guard ends it at 60 s regardless).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ticketguard.core.files import save_tensors
from ticketguard.models import build_model

INFER = "/v2/models/ticket/infer"
HEALTH = "/v2/health/ready"
IMAGES_PER_REQUEST = 8
SHAPE = (3, 32, 32)
GUARD_S = 60  # the whole run, start of the server included
SLOW_CLIENT_S = 35  # a dripping or idle client gives up by then; the server should close it sooner
Address = tuple[str, int]

console = Console(stderr=True)


def _serve(model_file: Path) -> tuple[subprocess.Popen[str], Address]:
    """``ticketguard serve`` in a child process on an OS-chosen port, its log drained so it never blocks."""
    stats = ",".join(["0.5"] * SHAPE[0]), ",".join(["0.25"] * SHAPE[0])
    child = subprocess.Popen(
        [sys.executable, "-m", "ticketguard", "serve", str(model_file), "--port", "0", "--input-size", "32"]
        + ["--mean", stats[0], "--std", stats[1]],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert child.stderr is not None
    for line in child.stderr:
        found = re.search(r"http://(127\.0\.0\.1):(\d+)", line)
        if found:
            threading.Thread(target=child.stderr.read, daemon=True).start()
            return child, (found.group(1), int(found.group(2)))
    raise RuntimeError("the server exited before it listened")


def _proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (Linux): VmHWM and VmRSS in KiB, Threads as a count."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def _request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _post(body: bytes, **headers: str) -> bytes:
    return _request("POST", INFER, body, {"Content-Length": str(len(body)), **headers})


def _v2_body(images: int, value: str | None = None) -> bytes:
    """A v2 request as ``query_labels`` writes it (random pixels / 255 as float32), or filled with ``value``."""
    count = images * SHAPE[0] * SHAPE[1] * SHAPE[2]
    pixels = torch.randint(0, 256, (count,), dtype=torch.uint8).float() / 255
    data = ",".join([value] * count) if value is not None else json.dumps(pixels.tolist())[1:-1]
    return (
        f'{{"inputs":[{{"name":"input","shape":[{images},{SHAPE[0]},{SHAPE[1]},{SHAPE[2]}],'
        f'"datatype":"FP32","data":[{data}]}}]}}'
    ).encode()


def _exchange(address: Address, raw: bytes, timeout: float = 15) -> str:
    """Send one raw request on a new connection; the answer's status, or the name of the error."""
    try:
        with socket.create_connection(address, timeout=timeout) as connection:
            connection.sendall(raw)
            response = http.client.HTTPResponse(connection)
            response.begin()
            response.read()
            return str(response.status)
    except OSError as err:
        return type(err).__name__


def _timed(call: Callable[[], str]) -> tuple[float, str]:
    started = time.perf_counter()
    outcome = call()
    return time.perf_counter() - started, outcome


def _oversized(address: Address) -> str:
    """Declare 50 MB and send it as a client that listens while it sends; stop once the server answers."""
    try:
        with socket.create_connection(address, timeout=10) as connection:
            connection.sendall(_request("POST", INFER, headers={"Content-Length": str(50_000_000)}))
            for _ in range(200):
                if select.select([connection], [], [], 0)[0]:
                    break
                connection.sendall(b" " * (250 << 10))
            response = http.client.HTTPResponse(connection)
            response.begin()
            return str(response.status)
    except OSError as err:
        return type(err).__name__


MALFORMED = {
    "Content-Length: abc": _request("POST", INFER, b"{}", {"Content-Length": "abc"}),
    "JSON nested 100,000 deep": _post(b"[" * 100_000 + b"]" * 100_000),
    "binary tensor header": _post(_v2_body(1), **{"Inference-Header-Content-Length": "100"}),
    "unknown route": _request("POST", "/v2/models/other/infer", b"{}", {"Content-Length": "2"}),
    "batch of 300": _post(_v2_body(300, "0")),
    "NaN pixels": _post(_v2_body(1, "NaN")),
}


def _dripping(address: Address) -> float:
    """Send a request's head, then one byte every 2 s; seconds until the server closes the connection."""
    started = time.monotonic()
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=SLOW_CLIENT_S) as connection:
        connection.sendall(_request("POST", INFER, headers={"Content-Length": "1000"}))
        while time.monotonic() - started < SLOW_CLIENT_S and not select.select([connection], [], [], 2)[0]:
            connection.sendall(b" ")
    return time.monotonic() - started


def _idle(address: Address) -> float:
    """Connect and say nothing; seconds until the server closes the connection."""
    started = time.monotonic()
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=SLOW_CLIENT_S) as connection:
        connection.recv(1)
    return time.monotonic() - started


def _health_while(address: Address, busy: threading.Event, pid: int) -> tuple[list[float], Counter[str], int]:
    """Health checks every 50 ms while ``busy`` is set: their waits, their outcomes, the peak thread count."""
    waits, outcomes, threads = [], Counter[str](), 0
    while busy.is_set():
        wait, outcome = _timed(lambda: _exchange(address, _request("GET", HEALTH)))
        waits.append(wait)
        outcomes[outcome] += 1
        threads = max(threads, _proc_status(pid, "Threads"))
        time.sleep(0.05)
    return waits, outcomes, threads


def _flood(address: Address, count: int, pid: int) -> tuple[Counter[str], float, str, int]:
    """Open ``count`` silent connections at once: how each was treated, a health check meanwhile, threads."""
    connections = [socket.create_connection(address, timeout=5) for _ in range(count)]
    try:
        time.sleep(0.5)
        treated = Counter[str]()
        for connection in connections:
            if select.select([connection], [], [], 0)[0]:
                response = http.client.HTTPResponse(connection)
                response.begin()
                treated[f"answered {response.status} at once"] += 1
            else:
                treated["held open (a thread waits for its request)"] += 1
        wait, outcome = _timed(lambda: _exchange(address, _request("GET", HEALTH)))
        return treated, wait, outcome, _proc_status(pid, "Threads")
    finally:
        for connection in connections:
            connection.close()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _percentiles(waits: list[float]) -> tuple[float, float, float]:
    """Median, 95th percentile and maximum: what the rows of health-check waits show."""
    ordered = sorted(waits)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))], ordered[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="well-formed inferences of 8 images")
    parser.add_argument("--workers", type=int, default=16, help="threads sending them")
    parser.add_argument("--oversized", type=int, default=20)
    parser.add_argument("--malformed", type=int, default=30)
    parser.add_argument("--dripping", type=int, default=10)
    parser.add_argument("--idle", type=int, default=10)
    parser.add_argument("--flood", type=int, default=100, help="connections opened at once at the end")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "resnet20.safetensors"
        torch.manual_seed(0)
        save_tensors(model_file, build_model("resnet20", SHAPE[0], 10).state_dict())
        child, address = _serve(model_file)
        guard = threading.Timer(GUARD_S - (time.monotonic() - started), child.kill)
        guard.daemon = True
        guard.start()
        try:
            table = _load(child.pid, address, args)
        finally:
            guard.cancel()
            child.terminate()
            child.wait(timeout=30)
    table.caption = f"wall time {time.monotonic() - started:.1f} s (server start included)"
    Console(width=150).print(table)


def _load(pid: int, address: Address, args: argparse.Namespace) -> Table:
    """Idle health checks, then the mixed load with health checks alongside, then the connection flood."""
    body = _v2_body(IMAGES_PER_REQUEST)
    _exchange(address, _post(body))  # warm-up: first inference
    idle_waits = []
    for _ in range(30):  # at the same pace as the checks under load
        idle_waits.append(_timed(lambda: _exchange(address, _request("GET", HEALTH)))[0])
        time.sleep(0.05)
    rss_idle = _proc_status(pid, "VmRSS")

    slow_pool = ThreadPoolExecutor(args.dripping + args.idle)
    dripping = [slow_pool.submit(_dripping, address) for _ in range(args.dripping)]
    idle = [slow_pool.submit(_idle, address) for _ in range(args.idle)]
    busy = threading.Event()
    busy.set()
    with ThreadPoolExecutor(1) as checker:
        health = checker.submit(_health_while, address, busy, pid)
        load_started = time.monotonic()
        with ThreadPoolExecutor(args.workers) as pool:
            normal = [
                pool.submit(_timed, lambda: _exchange(address, _post(body))) for _ in range(args.requests)
            ]
            oversized = [pool.submit(_oversized, address) for _ in range(args.oversized)]
            kinds = list(MALFORMED)
            malformed = [
                (kinds[i % len(kinds)], pool.submit(_exchange, address, MALFORMED[kinds[i % len(kinds)]]))
                for i in range(args.malformed)
            ]
            answers = [future.result() for future in normal]
        load_s = time.monotonic() - load_started
        busy.clear()
        load_waits, health_outcomes, load_threads = health.result()
    drip_closed = [future.result() for future in dripping]
    idle_closed = [future.result() for future in idle]
    slow_pool.shutdown()
    flood_treated, flood_wait, flood_outcome, flood_threads = _flood(address, args.flood, pid)

    served = Counter(outcome for _, outcome in answers)
    table = Table(
        title="ticketguard serve under a mixed load on loopback (default ServerLimits)", show_header=False
    )
    table.add_row(
        f"{args.requests} inferences of {IMAGES_PER_REQUEST} CIFAR images ({len(body) >> 10} KiB each)",
        ", ".join(f"{n} x {k}" for k, n in served.most_common()) + f" in {load_s:.1f} s "
        f"({args.requests / load_s:.0f} requests/s, {args.workers} threads)",
    )
    table.add_row(
        "their latency, median / p95 / max", " / ".join(_ms(p) for p in _percentiles([w for w, _ in answers]))
    )
    table.add_row(
        f"{args.oversized} bodies declaring 50 MB",
        ", ".join(f"{n} x {k}" for k, n in Counter(f.result() for f in oversized).most_common()),
    )
    by_kind: dict[str, Counter[str]] = {}
    for kind, future in malformed:
        by_kind.setdefault(kind, Counter())[future.result()] += 1
    for kind, outcomes in by_kind.items():
        table.add_row(f"malformed: {kind}", ", ".join(f"{n} x {k}" for k, n in outcomes.most_common()))
    table.add_row(
        f"{args.dripping} clients dripping a byte every 2 s",
        f"closed by the server after {min(drip_closed):.1f} to {max(drip_closed):.1f} s",
    )
    table.add_row(
        f"{args.idle} silent clients",
        f"closed by the server after {min(idle_closed):.1f} to {max(idle_closed):.1f} s",
    )
    idle_p, load_p = _percentiles(idle_waits), _percentiles(load_waits)
    table.add_row(
        f"health check wait, idle ({len(idle_waits)} checks): median / p95 / max",
        " / ".join(_ms(p) for p in idle_p),
    )
    table.add_row(
        f"health check wait, under load ({len(load_waits)} checks)",
        " / ".join(_ms(p) for p in load_p)
        + "; "
        + ", ".join(f"{n} x {k}" for k, n in health_outcomes.most_common()),
    )
    table.add_row(
        "health check ratio, under load / idle",
        " / ".join(f"{load / idle:.1f}x" for load, idle in zip(load_p, idle_p)),
    )
    table.add_row(
        f"{args.flood} connections opened at once",
        ", ".join(f"{n} x {k}" for k, n in flood_treated.most_common())
        + f"; a health check meanwhile: {flood_outcome} in {_ms(flood_wait)}",
    )
    table.add_row("server threads, peak seen", f"{load_threads} under load, {flood_threads} in the flood")
    table.add_row(
        "server resident memory",
        f"{_proc_status(pid, 'VmHWM') >> 10} MiB peak (VmHWM), {rss_idle >> 10} MiB idle after warm-up",
    )
    return table


if __name__ == "__main__":
    main()
