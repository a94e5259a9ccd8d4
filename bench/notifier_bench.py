"""Webhook deliveries from one notifier process to a local receiver (a benchmark, not a test).

Starts `services.notifier` as a subprocess on loopback with --endpoints channels, one webhook
endpoint each (real rows, secrets sealed by a vault key made for the run), and a receiver in a
process of its own that notes when each `webhook-id` arrives, answers 204, and verifies the
signature of every 50th delivery with the standardwebhooks library (verifying all would spend the
CPU the notifier is measured on). Two phases:

1. throughput: --backlog status events are produced while the notifier is stopped; it is then
   started, and deliveries/s are counted from the first delivery to the last (one process,
   every event delivered once);
2. latency: status events are produced at --rate per second (open loop: each at its planned time,
   whatever the notifier does) for --seconds; per event, from its production to its arrival at
   the receiver (what an upstream system sees: Kafka, enqueue in PostgreSQL, signing, HTTP).

    .venv/bin/python bench/notifier_bench.py [--backlog 20000] [--rate 500] [--seconds 20]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.host import HostLoad  # noqa: E402
from services.channels.vault import LocalKeyFileProvider  # noqa: E402
from services.common.avro import Codec  # noqa: E402
from services.common.db import migrate  # noqa: E402
from services.common.ids import new_id  # noqa: E402
from services.common.kafka import EventProducer, ensure_topics  # noqa: E402
from services.common.topics import ALL_TOPICS, PAYMENT_STATUS  # noqa: E402
from services.devstack import role_url  # noqa: E402
from services.notifier.secrets import fingerprint, new_secret, seal_secret  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.e2e.stack import wait_for  # noqa: E402
from tests.platform.kafka_helpers import start_group_at_end  # noqa: E402

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
DB = os.environ.get("DATABASE_URL", "postgresql://mpesa@127.0.0.1:5433/mpesa")  # password: PGPASSFILE
VERIFY_EVERY = 50


def receive(port: int, secrets: dict[str, str], ready, stop, results) -> None:
    """The receiver, in a process of its own: {webhook-id: arrival time} and the verification count."""
    from aiohttp import web
    from standardwebhooks.webhooks import Webhook

    verifiers = {path: Webhook(secret) for path, secret in secrets.items()}
    arrivals: dict[str, float] = {}
    counts = {"verified": 0, "bad": 0, "duplicates": 0}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        if webhook_id in arrivals:
            counts["duplicates"] += 1
        else:
            arrivals[webhook_id] = time.time()
        if len(arrivals) % VERIFY_EVERY == 1:
            try:
                verifiers[request.match_info["channel"]].verify(body, dict(request.headers))
                counts["verified"] += 1
            except Exception:
                counts["bad"] += 1
        return web.Response(status=204)

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/hook/{channel}", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await runner.cleanup()

    asyncio.run(serve())
    results.put((arrivals, counts))


def setup_endpoints(run: str, channels: list[str], receiver_port: int, key_file: Path) -> dict[str, str]:
    """A channel row and one endpoint with a sealed secret per channel; {channel: secret}."""
    wrapper = LocalKeyFileProvider.open(key_file, create=True).public_wrapper()
    secrets = {}
    with psycopg.connect(DB) as conn:
        for channel in channels:
            endpoint_id = "ep_" + uuid.uuid4().hex[:20]
            secret = new_secret()
            sealed = seal_secret(secret, endpoint_id, 1, wrapper)
            conn.execute("INSERT INTO channels (channel_id, display_name, shortcode_type, business_shortcode,"
                         " environment) VALUES (%s, 'notifier bench', 'paybill', '174379', 'sandbox')", (channel,))
            conn.execute("INSERT INTO webhook_endpoints (endpoint_id, channel_id, url, event_types, created_by)"
                         " VALUES (%s, %s, %s, %s, 'bench')",
                         (endpoint_id, channel, f"http://127.0.0.1:{receiver_port}/hook/{channel}",
                          ["payment.pending", "payment.settled", "payment.cancelled", "payment.failed",
                           "payment.review"]))
            conn.execute("INSERT INTO webhook_secrets (endpoint_id, version, key_id, wrapped_key, nonce, ciphertext,"
                         " fingerprint, created_by) VALUES (%s, 1, %s, %s, %s, %s, %s, 'bench')",
                         (endpoint_id, sealed.key_id, sealed.wrapped_key, sealed.nonce, sealed.ciphertext,
                          fingerprint(secret)))
            secrets[channel] = secret
    return secrets


def status_event(channel: str, state: str, previous: str | None) -> dict[str, Any]:
    return {"event_id": new_id(), "occurred_at": datetime.now(timezone.utc), "channel_id": channel,
            "payment_id": new_id(), "schema_version": 2, "status": state, "previous_status": previous,
            "amount": 10, "phone_masked": "*********678", "order_reference": "BENCH-1",
            "checkout_request_id": None, "mpesa_receipt": "SBENCH0001" if state == "Settled" else None,
            "transaction_time": None, "result_code": "0" if state == "Settled" else None,
            "reason": None, "metadata": {"order": "1"}, "late_mpesa_receipt": None}


def start_notifier(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.notifier"], cwd=ROOT, env=env)


def percentiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=100) if len(values) > 1 else [values[0] if values else 0.0] * 99


async def wait_delivered(arrived, want: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while arrived() < want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def main(args: argparse.Namespace) -> None:
    run = uuid.uuid4().hex[:8]
    channels = [f"nbench-{run}-{i}" for i in range(args.endpoints)]
    migrate(DB)
    ensure_topics(KAFKA, ALL_TOPICS, 6)
    receiver_port, metrics_port = free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="nbench-"))
    key_file = workdir / "webhooks-kek.json"
    secrets = setup_endpoints(run, channels, receiver_port, key_file)
    group = f"nbench-{run}"
    start_group_at_end(KAFKA, group, [PAYMENT_STATUS.name])
    # The notifier logs in as its own role (infra/postgres.sh), as in production.
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": KAFKA, "DATABASE_URL": role_url(DB, "notifier"),
           "NOTIFIER_GROUP_ID": group,
           "NOTIFIER_METRICS_PORT": str(metrics_port), "NOTIFIER_VAULT_KEY_FILE": str(key_file),
           "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8", "LOG_LEVEL": "WARNING"}

    ctx = multiprocessing.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    receiver = ctx.Process(target=receive, args=(receiver_port, secrets, ready, stop, results))
    receiver.start()
    ready.wait(30)
    producer = EventProducer(KAFKA, Codec(), client_id="nbench", linger_ms=5)
    notifier = None
    produced_at: dict[str, float] = {}
    backlog: list[dict[str, Any]] = []
    try:
        # Phase 1: a backlog, then one notifier process drains it.
        backlog = [status_event(channels[i % len(channels)], "Pending", "Requested") for i in range(args.backlog)]
        for start in range(0, len(backlog), 1000):
            await asyncio.gather(*(producer.publish(PAYMENT_STATUS, e) for e in backlog[start:start + 1000]))
        host = HostLoad()
        notifier = start_notifier(env)
        started = time.monotonic()
        wait_for(f"http://127.0.0.1:{metrics_port}/healthz")
        # The receiver's count is read at the end: here only the notifier's progress by its metrics.
        await wait_delivered(lambda: delivered_so_far(metrics_port), args.backlog, args.timeout_s)
        drained_s = time.monotonic() - started
        drain_cpu_s = cpu_seconds(notifier.pid)
        print(f"throughput: {args.backlog} backlog events to {args.endpoints} endpoints drained in {drained_s:.1f} s "
              f"from the notifier's start, start-up included = {args.backlog / drained_s:.0f} deliveries/s")
        print(f"  notifier CPU: {drain_cpu_s * 1e6 / args.backlog:.0f} µs per delivery (start-up included); "
              f"{host.describe()}")
        await wait_written(channels, args.timeout_s)  # the latency phase starts on a quiet notifier

        # Phase 2: open loop at --rate.
        host = HostLoad()
        total = int(args.rate * args.seconds)
        tasks = []
        began = time.monotonic()
        for i in range(total):
            await asyncio.sleep(max(0.0, began + i / args.rate - time.monotonic()))
            event = status_event(channels[i % len(channels)], "Settled", "Pending")
            produced_at[event["event_id"]] = time.time()
            tasks.append(asyncio.create_task(producer.publish(PAYMENT_STATUS, event)))
        await asyncio.gather(*tasks)
        await wait_delivered(lambda: delivered_so_far(metrics_port), args.backlog + total, args.timeout_s)
        print(f"  (latency phase: {host.describe()})")
    finally:
        producer.close()
        if notifier is not None:
            notifier.terminate()
            notifier.wait(30)
        stop.set()
    arrivals, counts = results.get(timeout=60)
    receiver.join()
    backlog_ids = {e["event_id"] for e in backlog}
    backlog_times = sorted(t for i, t in arrivals.items() if i in backlog_ids)
    if len(backlog_times) > 1:
        span = backlog_times[-1] - backlog_times[0]
        print(f"throughput: {len(backlog_times)} backlog deliveries from the first to the last arrival in {span:.2f} s "
              f"= {len(backlog_times) / span:.0f} deliveries/s from one process (target >= 2000/s)")
    latencies = sorted(arrivals[i] - t for i, t in produced_at.items() if i in arrivals)
    q = percentiles(latencies)
    lost = len(produced_at) - len(latencies)
    print(f"latency: status event produced -> delivered, {len(latencies)}/{len(produced_at)} events at "
          f"{args.rate:.0f}/s: p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, max "
          f"{(latencies[-1] if latencies else 0) * 1000:.1f} ms (target p99 < 50 ms at 500/s); {lost} missing")
    with psycopg.connect(DB) as conn:
        enqueued: dict[str, float] = dict(conn.execute(
            "SELECT event_id, extract(epoch FROM created_at)::float8 FROM webhook_deliveries WHERE event_id = ANY(%s)",
            (list(produced_at),)).fetchall())
    found = [i for i in produced_at if i in arrivals and i in enqueued]
    to_row = percentiles(sorted(enqueued[i] - produced_at[i] for i in found))
    to_receiver = percentiles(sorted(arrivals[i] - enqueued[i] for i in found))
    print(f"  of which (p50/p99 ms): produced -> its delivery row's transaction began (Kafka, the batch before) "
          f"{to_row[49] * 1000:.1f}/{to_row[98] * 1000:.1f}; -> arrived at the receiver (commit, dispatch, "
          f"signing, HTTP) {to_receiver[49] * 1000:.1f}/{to_receiver[98] * 1000:.1f}")
    print(f"receiver: {len(arrivals)} distinct webhook-ids, {counts['duplicates']} duplicates, "
          f"{counts['verified']} signatures verified, {counts['bad']} failed verification")


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_written(channels: list[str], timeout_s: float) -> None:
    """Until every delivery of the run's channels has its result written (none pending), then a second."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with psycopg.connect(DB) as conn:
            row = conn.execute("SELECT count(*) FROM webhook_deliveries WHERE channel_id = ANY(%s)"
                               " AND state = 'pending'", (channels,)).fetchone()
        if row is not None and row[0] == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)


def delivered_so_far(metrics_port: int) -> int:
    """webhook_deliveries_total{outcome="delivered"} summed, from the notifier's /metrics."""
    import urllib.request
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("webhook_deliveries_total{") and 'outcome="delivered"' in line))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=180)
    asyncio.run(main(parser.parse_args()))
