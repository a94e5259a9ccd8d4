"""Throughput of the Daraja sandbox and of the Daraja client (a benchmark, not a test).

Starts the sandbox as a subprocess (its own core) and a callback sink in this process, then:

  sandbox phase: a lean keep-alive driver (services.daraja_sandbox.rawhttp) sends pre-built STK
                 pushes as fast as the sandbox answers (no added latency, callbacks at once):
                 pushes/s and callbacks/s of the sandbox;
  client phase:  services.daraja.client.DarajaClient pushes with hundreds in flight while the
                 sandbox answers after --latency-ms: pushes/s of the client, callbacks/s.

Also reported: CPU milliseconds per push of the sandbox process and of this process, which say
more than rates on a machine shared with other work. Loopback only; bounded by --pushes and
--timeout-s (per phase).

    .venv/bin/python bench/daraja_bench.py [--pushes 20000] [--concurrency 500] [--latency-ms 300]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.host import HostLoad  # noqa: E402
from services.daraja.client import DarajaClient, DarajaTimeouts  # noqa: E402
from services.daraja.errors import DarajaError  # noqa: E402
from services.daraja.models import AppCredentials, Shortcode, StkPushRequest  # noqa: E402
from services.daraja.payloads import build_push_payload, nairobi_timestamp  # noqa: E402
from services.daraja_sandbox.rawhttp import HttpFailure, RawHttpClient, build_post  # noqa: E402
from services.daraja_sandbox.settings import (  # noqa: E402
    ADMIN_TOKEN_ENV,
    DEMO_CONSUMER_KEY,
    DEMO_CONSUMER_SECRET,
    SANDBOX_PASSKEY,
    SANDBOX_SHORTCODE,
)
from tests.e2e.stack import wait_for  # noqa: E402

APP = AppCredentials(DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY)
SHORTCODE = Shortcode(SANDBOX_SHORTCODE)
FIRST_PHONE = 254_710_000_000  # outside the sandbox's scenario selectors: every push succeeds
MAX_PUSHES = 200_000  # the sandbox phase pre-builds every request in memory


ACCEPTED = b'{"ResultCode":0,"ResultDesc":"Accepted"}'
SINK_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (len(ACCEPTED), ACCEPTED))


@dataclass
class Sink:
    """Counts callbacks and remembers when the last one arrived (a lean HTTP server: a measuring
    instrument that must cost far less than the sandbox it measures)."""

    received: int = 0
    last_at: float = 0.0
    expected: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def arrived(self) -> None:
        self.received += 1
        self.last_at = time.perf_counter()
        if self.received >= self.expected:
            self.done.set()

    def expect(self, count: int) -> None:
        self.received, self.expected, self.last_at = 0, count, 0.0
        self.done.clear()


class SinkProtocol(asyncio.Protocol):
    def __init__(self, sink: Sink):
        self._sink = sink
        self._buffer = bytearray()
        self._transport: asyncio.Transport  # set by connection_made, before any data_received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport), "a TCP connection"
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self._buffer[:end]).lower()
            start = head.find(b"content-length:")
            length = int(head[start + 15:].split(b"\r\n", 1)[0]) if start >= 0 else 0
            if len(self._buffer) < end + 4 + length:
                return
            del self._buffer[:end + 4 + length]
            self._sink.arrived()
            self._transport.write(SINK_ANSWER)


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc; this process when pid is None."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The sandbox's admin token: the one in the environment (for --sandbox-url), else one for the sandbox started here.
ADMIN_TOKEN = os.environ.get(ADMIN_TOKEN_ENV) or secrets.token_urlsafe(32)


def start_sandbox(port: int, cpu: int | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "services.daraja_sandbox", "--port", str(port), "--callback-delay-ms", "0",
               "--callback-concurrency", "64", "--log-level", "WARNING"]
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, ADMIN_TOKEN_ENV: ADMIN_TOKEN}, preexec_fn=pin)


async def admin(session: aiohttp.ClientSession, base: str, method: str, path: str, body: dict | None = None) -> dict:
    async with session.request(method, f"{base}{path}", json=body,
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as response:
        response.raise_for_status()
        return await response.json()


async def sandbox_phase(base: str, sink_url: str, sink: Sink, pushes: int, concurrency: int,
                        timeout_s: float, first_phone: int) -> dict:
    """The sandbox alone: one token, pre-built requests, a lean keep-alive driver."""
    async with aiohttp.ClientSession() as session:
        token = await _token(session, base)
    timestamp = nairobi_timestamp(datetime.now(timezone.utc))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    built = [build_post(f"{base}/mpesa/stkpush/v1/processrequest", headers, json.dumps(build_push_payload(
        SHORTCODE, StkPushRequest(1, str(first_phone + i), "BENCH", "bench", f"{sink_url}/{i}"),
        SANDBOX_PASSKEY, timestamp)).encode()) for i in range(pushes)]
    requests = [r for r in built if r is not None]
    assert len(requests) == pushes, f"the raw driver cannot post to {base}"
    driver = RawHttpClient(timeout_s=30)
    next_index, accepted, failed = 0, 0, 0

    async def worker() -> None:
        nonlocal next_index, accepted, failed
        while next_index < pushes:
            request = requests[next_index]
            next_index += 1
            try:
                status = await driver.post(*request)
            except HttpFailure:
                status = 0
            accepted, failed = (accepted + 1, failed) if status == 200 else (accepted, failed + 1)

    sink.expect(pushes)
    started = time.perf_counter()
    try:
        await _bounded(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s)
    finally:
        driver.close()
    pushed_at = time.perf_counter()
    await _wait_callbacks(sink, timeout_s)
    return _figures("sandbox", pushes, accepted, failed, started, pushed_at, sink, concurrency, 0)


async def client_phase(base: str, sink_url: str, sink: Sink, pushes: int, concurrency: int, latency_ms: int,
                       timeout_s: float, first_phone: int) -> dict:
    """The Daraja client with `concurrency` pushes in flight against a sandbox answering after latency_ms."""
    client = DarajaClient(base, max_connections=concurrency, timeouts=DarajaTimeouts(read_s=30, pool_s=60))
    requests = [StkPushRequest(1, str(first_phone + i), "BENCH", "bench", f"{sink_url}/{i}") for i in range(pushes)]
    next_index, accepted, failed = 0, 0, 0
    errors: dict[str, int] = {}

    async def worker() -> None:
        nonlocal next_index, accepted, failed
        while next_index < pushes:
            request = requests[next_index]
            next_index += 1
            try:
                await client.push(APP, SHORTCODE, request)
                accepted += 1
            except DarajaError as exc:
                failed += 1
                errors[str(exc)] = errors.get(str(exc), 0) + 1

    try:
        await client.fetch_token(APP)
        sink.expect(pushes)
        started = time.perf_counter()
        await _bounded(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s)
        pushed_at = time.perf_counter()
        await _wait_callbacks(sink, timeout_s)
    finally:
        await client.aclose()
    figures = _figures("client", pushes, accepted, failed, started, pushed_at, sink, concurrency, latency_ms)
    figures["errors"] = dict(list(errors.items())[:5])
    return figures


async def _token(session: aiohttp.ClientSession, base: str) -> str:
    basic = base64.b64encode(f"{DEMO_CONSUMER_KEY}:{DEMO_CONSUMER_SECRET}".encode()).decode()
    async with session.get(f"{base}/oauth/v1/generate?grant_type=client_credentials",
                           headers={"Authorization": f"Basic {basic}"}) as response:
        return (await response.json())["access_token"]


async def _bounded(work, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(work, timeout_s)
    except TimeoutError:
        print(f"phase stopped after {timeout_s} s", file=sys.stderr)  # figures show what was done


async def _wait_callbacks(sink: Sink, timeout_s: float) -> None:
    await _bounded(sink.done.wait(), timeout_s)  # missing callbacks show as callbacks < pushes


def _figures(phase: str, pushes: int, accepted: int, failed: int, started: float, pushed_at: float, sink: Sink,
             concurrency: int, latency_ms: int) -> dict:
    push_s = pushed_at - started
    callbacks_s = (sink.last_at or pushed_at) - started
    return {"phase": phase, "pushes": pushes, "accepted": accepted, "failed": failed, "in_flight": concurrency,
            "sandbox_latency_ms": latency_ms, "seconds": round(push_s, 2),
            "pushes_per_s": round(accepted / push_s), "callbacks": sink.received,
            "callbacks_per_s": round(sink.received / callbacks_s) if callbacks_s > 0 else 0}


async def measured(sandbox_pid: int | None, phase) -> dict:
    """Adds the CPU seconds the sandbox and this process spent per push during the phase."""
    sandbox_before, bench_before = (process_cpu_s(sandbox_pid) if sandbox_pid else 0.0), process_cpu_s(None)
    figures = await phase
    if sandbox_pid:
        sandbox_cpu_s = process_cpu_s(sandbox_pid) - sandbox_before
        figures["sandbox_cpu_ms_per_push"] = round(1000 * sandbox_cpu_s / max(1, figures["accepted"]), 3)
    bench_cpu_s = process_cpu_s(None) - bench_before
    figures["bench_cpu_ms_per_push"] = round(1000 * bench_cpu_s / max(1, figures["accepted"]), 3)
    return figures


async def run(args: argparse.Namespace) -> list[dict]:
    cpus = sorted(os.sched_getaffinity(0))
    pin = len(cpus) >= 2 and not args.no_pin
    if pin:  # sandbox on one core, this process (driver/client + callback sink) on another
        os.sched_setaffinity(0, {cpus[0]})
    if args.sandbox_url:
        base, sandbox = args.sandbox_url.rstrip("/"), None
    else:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        sandbox = start_sandbox(port, cpus[1] if pin else None)
    sink = Sink()
    sink_server = await asyncio.get_running_loop().create_server(lambda: SinkProtocol(sink), "127.0.0.1", 0,
                                                                 backlog=4096)
    sink_url = f"http://127.0.0.1:{sink_server.sockets[0].getsockname()[1]}/cb"
    results = []
    try:
        async with aiohttp.ClientSession() as session:
            wait_for(f"{base}/sandbox/health")
            pid = sandbox.pid if sandbox is not None else None
            if args.phase in ("both", "sandbox"):
                await admin(session, base, "POST", "/sandbox/reset")
                results.append(await measured(pid, sandbox_phase(
                    base, sink_url, sink, args.pushes, args.sandbox_concurrency, args.timeout_s, FIRST_PHONE)))
            if args.phase in ("both", "client"):
                await admin(session, base, "POST", "/sandbox/reset")
                await admin(session, base, "PATCH", "/sandbox/settings", {"latency_ms": args.latency_ms})
                results.append(await measured(pid, client_phase(
                    base, sink_url, sink, args.pushes, args.concurrency, args.latency_ms, args.timeout_s,
                    FIRST_PHONE + args.pushes)))
            stats = await admin(session, base, "GET", "/sandbox/stats")
            results.append({"phase": "sandbox stats (last phase)", **stats})
    finally:
        sink_server.close()
        if sandbox is not None:
            sandbox.terminate()
            sandbox.wait(timeout=10)
    return results


def _is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pushes", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=500, help="client pushes in flight")
    parser.add_argument("--sandbox-concurrency", type=int, default=64, help="driver connections, sandbox phase")
    parser.add_argument("--latency-ms", type=int, default=300, help="sandbox answer latency in the client phase")
    parser.add_argument("--phase", choices=("both", "sandbox", "client"), default="both")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="bound on each phase")
    parser.add_argument("--sandbox-url", help="use this running sandbox (loopback) instead of starting one")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the processes to separate cores")
    args = parser.parse_args()
    if not 0 < args.pushes <= MAX_PUSHES:
        parser.error(f"--pushes must be between 1 and {MAX_PUSHES}")
    if args.sandbox_url and not _is_loopback_url(args.sandbox_url):
        parser.error("--sandbox-url must point at a loopback address (this benchmark never leaves the machine)")
    host = HostLoad()
    for line in asyncio.run(run(args)):
        print(json.dumps(line))
    print(json.dumps({"phase": "host", **host.figures()}))


if __name__ == "__main__":
    main()
