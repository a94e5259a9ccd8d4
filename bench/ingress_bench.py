"""Throughput and latency of one ingress process (a benchmark, not a test).

Starts `python -m services.ingress` as a subprocess on loopback against the real Kafka and
PostgreSQL, creates a channel and an API key of its own, then:

  full speed: --connections keep-alive connections each send the next request as soon as the last
              is answered, until --requests are answered or --duration-s passes: accepted (202)/s;
  fixed rate: --rate requests/s for --rate-duration-s, sent on schedule whatever the answers do
              (open loop); latency is measured from each request's scheduled time, so a stall is
              not hidden (no coordinated omission): p50, p99, max.

Every request is a real payment request with its own Idempotency-Key, so each one claims a key in
PostgreSQL and waits for Kafka's acknowledgement. The events go to a topic of the bench's own
(INGRESS_REQUESTED_TOPIC), deleted at the end with the bench's idempotency rows, so that no ledger
has to read through them. The driver is a minimal HTTP/1.1 client driven by asyncio protocol
callbacks, so that it takes as little of the machine as possible (about 40 µs per request).

Besides the rates it reports the ingress's CPU per request, its main thread's share (the one that
runs all the Python, so the one that caps the rate: 1 / that is what a core of its own would give),
how busy the whole machine was (other work on a shared machine skews every figure), and for the
fixed rate the ingress's own latency histogram, to tell its delays from the driver's.
Targets (issue #5): ≥ 3,000 accepted/s; p99 < 25 ms at 1,000/s.

    .venv/bin/python bench/ingress_bench.py [--requests 60000] [--connections 64] [--duration-s 20]
                                           [--rate 1000] [--rate-duration-s 15] [--profile FILE]
Env: KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL (defaults: the local ones of `make infra`);
BENCH_SERVER_COMMAND replaces `-m services.ingress` (e.g. "-m cProfile -o x.prof -m services.ingress").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from bench.host import HostLoad, cpu_seconds  # noqa: E402
from bench.raw_http import Connection  # noqa: E402
from services.channels import repository as channels_repository  # noqa: E402
from services.channels.apikeys import key_id_of, key_sha256, new_api_key  # noqa: E402
from services.channels.model import Channel  # noqa: E402
from services.common import config  # noqa: E402
from services.common.db import migrate  # noqa: E402
from services.common.kafka import client_config, ensure_topics  # noqa: E402
from services.common.topics import PAYMENT_REQUESTED, Topic  # noqa: E402

TARGET_ACCEPTED_PER_S = 3000
TARGET_P99_MS = 25.0


def machine_busy_seconds() -> float:
    """CPU time spent by everything on the machine (all cores), to see what else competed."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def create_channel_and_key(database_url: str, channel_id: str) -> str:
    key_id, key = new_api_key()
    channel = Channel(channel_id=channel_id, display_name="ingress bench", shortcode_type="paybill",
                      business_shortcode="174379", environment="sandbox", status="active",
                      consent_reference="BENCH", consent_date=date(2025, 1, 1), agreement_reference="BENCH-DPA",
                      agreement_version="1", agreement_signed_on=date(2025, 1, 1), lawful_basis="contract")
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await channels_repository.insert_channel(conn, channel)
        await channels_repository.insert_api_key(conn, key_id, key_sha256(key), "ingress bench", [channel_id], "bench")
    return key


class Requests:
    """Pre-formatted payment requests; only the Idempotency-Key changes from one to the next."""

    def __init__(self, port: int, channel_id: str, api_key: str, run: str):
        body = json.dumps({"channelId": channel_id, "amount": 10, "phone": "0712345678", "accountReference": "BENCH",
                           "description": "bench", "orderReference": "bench-order"}).encode()
        self._head = (f"POST /api/payments HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {api_key}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nIdempotency-Key: ").encode()
        self._tail = b"\r\n\r\n" + body
        self._run = run.encode()
        self._count = 0

    def next(self) -> bytes:
        self._count += 1
        return self._head + self._run + b"-" + str(self._count).encode() + self._tail


async def full_speed(port: int, requests: Requests, connections: int, total: int, duration_s: float) -> dict:
    statuses: dict[int, int] = {}
    done = asyncio.get_running_loop().create_future()
    state = {"sent": 0, "answered": 0}
    deadline = time.perf_counter() + duration_s

    def on_answer(conn: Connection, status: int, body: bytes) -> None:
        statuses[status] = statuses.get(status, 0) + 1
        state["answered"] += 1
        if state["sent"] < total and time.perf_counter() < deadline:
            state["sent"] += 1
            conn.send(requests.next(), 0.0)
        elif state["answered"] == state["sent"] and not done.done():
            done.set_result(None)

    pool = [await Connection.open(port, on_answer) for _ in range(connections)]
    started = time.perf_counter()
    for conn in pool[:total]:
        state["sent"] += 1
        conn.send(requests.next(), 0.0)
    await done
    elapsed = time.perf_counter() - started
    for c in pool:
        c.close()
    return {"answered": state["answered"], "statuses": statuses, "elapsed_s": elapsed,
            "accepted_per_s": statuses.get(202, 0) / elapsed}


async def fixed_rate(port: int, requests: Requests, rate: float, duration_s: float) -> dict:
    latencies_ms: list[float] = []
    statuses: dict[int, int] = {}
    total = int(rate * duration_s)
    done = asyncio.get_running_loop().create_future()
    idle: list[Connection] = []

    def on_answer(conn: Connection, status: int, body: bytes) -> None:
        latencies_ms.append((time.perf_counter() - conn.sent_at) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        idle.append(conn)
        if len(latencies_ms) == total and not done.done():
            done.set_result(None)

    idle.extend([await Connection.open(port, on_answer) for _ in range(32)])
    opened = list(idle)
    interval = 1.0 / rate
    started = time.perf_counter()
    for i in range(total):
        scheduled = started + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if not idle:  # every connection busy: open another rather than delay the schedule
            idle.append(await Connection.open(port, on_answer))
            opened.append(idle[-1])
        # Latency counts from the scheduled time: a late send is the server's backlog too.
        idle.pop().send(requests.next(), scheduled)
    await asyncio.wait_for(done, 60)
    elapsed = time.perf_counter() - started
    for c in opened:
        c.close()
    latencies_ms.sort()

    def pct(p: float) -> float:
        return latencies_ms[min(len(latencies_ms) - 1, int(p * len(latencies_ms)))]

    return {"answered": len(latencies_ms), "statuses": statuses, "achieved_per_s": len(latencies_ms) / elapsed,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": latencies_ms[-1], "connections": len(opened)}


async def server_latency_buckets(port: int) -> dict[float, float]:
    """The ingress's own http_request_seconds histogram for POST /api/payments: {upper bound: count}."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    buckets = {}
    for line in text.splitlines():
        if line.startswith('http_request_seconds_bucket{') and 'route="/api/payments"' in line:
            bound = line.split('le="')[1].split('"')[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def server_share_within(before: dict[float, float], after: dict[float, float], bound_s: float) -> float:
    total = after[float("inf")] - before.get(float("inf"), 0)
    return (after[bound_s] - before.get(bound_s, 0)) / total if total else 0.0


async def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ingress exited with {proc.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if (await reader.read())[9:12] == b"200":
                writer.close()
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("ingress did not become healthy")


async def full_speed_phase(proc: subprocess.Popen, port: int, requests: Requests, args: argparse.Namespace) -> dict:
    cpu_before, busy_before, own_before = cpu_seconds(proc.pid), machine_busy_seconds(), time.process_time()
    host = HostLoad()
    main_before = cpu_seconds(proc.pid, main_thread_only=True)
    fast = await full_speed(port, requests, args.connections, args.requests, args.duration_s)
    cpu, busy = cpu_seconds(proc.pid) - cpu_before, machine_busy_seconds() - busy_before
    own, main = time.process_time() - own_before, cpu_seconds(proc.pid, main_thread_only=True) - main_before
    answered, elapsed = fast["answered"], fast["elapsed_s"]
    print(f"full speed: {answered} answered in {elapsed:.1f}s, statuses {fast['statuses']}: "
          f"{fast['accepted_per_s']:.0f} accepted/s (target ≥ {TARGET_ACCEPTED_PER_S})")
    print(f"            ingress CPU {cpu / elapsed:.2f} cores, {cpu / answered * 1e6:.0f} µs per request, of which its "
          f"main thread {main / answered * 1e6:.0f} µs (so at most {answered / main:.0f}/s on a core of its own); "
          f"driver {own / answered * 1e6:.0f} µs per request; whole machine busy {busy / elapsed:.2f} of "
          f"{os.cpu_count()} cores")
    print(f"            {host.describe()}")
    return fast


async def fixed_rate_phase(proc: subprocess.Popen, port: int, requests: Requests, args: argparse.Namespace) -> dict:
    cpu_before, busy_before, started = cpu_seconds(proc.pid), machine_busy_seconds(), time.perf_counter()
    host = HostLoad()
    main_before = cpu_seconds(proc.pid, main_thread_only=True)
    buckets_before = await server_latency_buckets(port)
    steady = await fixed_rate(port, requests, args.rate, args.rate_duration_s)
    buckets_after = await server_latency_buckets(port)
    cpu, busy = cpu_seconds(proc.pid) - cpu_before, machine_busy_seconds() - busy_before
    main = cpu_seconds(proc.pid, main_thread_only=True) - main_before
    elapsed = time.perf_counter() - started
    print(f"fixed rate: {steady['answered']} at {steady['achieved_per_s']:.0f}/s on {steady['connections']} "
          f"connections, statuses {steady['statuses']}: p50 {steady['p50_ms']:.1f} ms, p99 {steady['p99_ms']:.1f} ms, "
          f"max {steady['max_ms']:.1f} ms (target p99 < {TARGET_P99_MS:.0f} ms)")
    print(f"            ingress CPU {cpu / elapsed:.2f} cores (main thread {main / elapsed:.2f}, "
          f"{main / steady['answered'] * 1e6:.0f} µs per request); whole machine busy {busy / elapsed:.2f} of "
          f"{os.cpu_count()} cores")
    shares = ", ".join(f"{server_share_within(buckets_before, buckets_after, b):.1%} ≤ {b * 1000:.0f} ms"
                       for b in (0.005, 0.01, 0.02, 0.05))
    print(f"            as the ingress measured them: {shares}")
    print(f"            {host.describe()}")
    return steady


async def main(args: argparse.Namespace) -> int:
    cfg = config.load([config.KAFKA_BOOTSTRAP, config.DATABASE_URL])
    migrate(cfg["DATABASE_URL"])
    run = uuid.uuid4().hex[:10]
    channel_id = f"bench-{run}"
    api_key = await create_channel_and_key(cfg["DATABASE_URL"], channel_id)
    port = free_port()
    # A topic of its own: the bench's events must not flood the topic every ledger reads.
    topic = f"bench.payment.requested.{run}"
    ensure_topics(cfg["KAFKA_BOOTSTRAP_SERVERS"], [Topic(topic, PAYMENT_REQUESTED.schema)], 3)
    env = {**os.environ, **{k: str(v) for k, v in cfg.items()}, "INGRESS_PORT": str(port), "LOG_LEVEL": "WARNING",
           "PYTHONUNBUFFERED": "1", "INGRESS_REQUESTED_TOPIC": topic}
    command = [sys.executable, "-m", "services.ingress"]
    if os.environ.get("BENCH_SERVER_COMMAND"):  # experiments: e.g. another server, or cProfile
        command = [sys.executable, *os.environ["BENCH_SERVER_COMMAND"].split()]
    if args.profile:
        command = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", args.profile, "-m", "services.ingress"]
    proc = subprocess.Popen(command, env=env, cwd=ROOT)
    try:
        await wait_healthy(port, proc)
        requests = Requests(port, channel_id, api_key, run)
        await full_speed(port, requests, 16, 2000, 15)  # warm-up: caches, prepared statements, producer
        fast = await full_speed_phase(proc, port, requests, args)
        await asyncio.sleep(1)
        steady = await fixed_rate_phase(proc, port, requests, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        with psycopg.connect(cfg["DATABASE_URL"], autocommit=True) as conn:  # what the bench made, and only that
            conn.execute("DELETE FROM ingress_requests WHERE channel_id = %s", (channel_id,))
            conn.execute("DELETE FROM api_keys WHERE key_id = %s", (key_id_of(api_key),))
            conn.execute("DELETE FROM channels WHERE channel_id = %s", (channel_id,))
        admin = AdminClient(client_config({"bootstrap.servers": cfg["KAFKA_BOOTSTRAP_SERVERS"]}))
        for deleted in admin.delete_topics([topic], operation_timeout=30).values():
            deleted.result(60)
    ok = fast["accepted_per_s"] >= TARGET_ACCEPTED_PER_S and steady["p99_ms"] < TARGET_P99_MS
    print("targets met" if ok else "below target")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60_000, help="full-speed phase: requests at most")
    parser.add_argument("--connections", type=int, default=64, help="full-speed phase: concurrent connections")
    parser.add_argument("--duration-s", type=float, default=20.0, help="full-speed phase: seconds at most")
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed-rate phase: requests per second")
    parser.add_argument("--rate-duration-s", type=float, default=15.0, help="fixed-rate phase: seconds")
    parser.add_argument("--profile", metavar="FILE", help="run the ingress under pyinstrument, write its report here")
    sys.exit(asyncio.run(main(parser.parse_args())))
