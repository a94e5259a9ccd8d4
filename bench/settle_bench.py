"""Callback-to-Settled latency through the webhook gateway and the ledger (a benchmark, not a test).

Starts `services.webhook_consumer` and `services.ledger` as subprocesses on loopback (consumer
groups starting at the topics' end), puts --payments payments in Pending by producing their request
and accepted push result, then posts their success callbacks to the gateway at --rate per second and
measures, per payment, from sending the callback to its Settled event on the payment-status topic
(what upstream and analytics see), with the CPU the gateway and the ledger spent per callback meanwhile
(their processes and threads, /proc, from the first callback to the last Settled read). Bounded by
--payments and --timeout-s; loopback only.

    .venv/bin/python bench/settle_bench.py [--payments 5000] [--rate 500]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from bench.host import HostLoad, cpu_seconds  # noqa: E402
from bench.raw_http import RawDriver  # noqa: E402
from services.common.avro import Codec, open_codec  # noqa: E402
from services.common.callback_token import callback_url  # noqa: E402
from services.common.db import migrate, open_pool  # noqa: E402
from services.common.ids import new_id  # noqa: E402
from services.common.kafka import EventProducer, client_config, ensure_topics, new_event_fields, take  # noqa: E402
from services.common.topics import (  # noqa: E402
    ALL_TOPICS,
    CALLBACK_RAW,
    PAYMENT_REQUESTED,
    PAYMENT_STATUS,
    STK_PUSH_RESULT,
    STK_QUERY_RESULT,
)
from tests.conftest import free_port  # noqa: E402
from tests.e2e.stack import wait_for  # noqa: E402
from tests.platform.kafka_helpers import end_offsets, start_group_at_end  # noqa: E402

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
DB = os.environ.get("DATABASE_URL", "postgresql://mpesa@127.0.0.1:5433/mpesa")  # password: PGPASSFILE


def callback_body(checkout: str, receipt: str) -> bytes:
    return json.dumps({"Body": {"stkCallback": {
        "MerchantRequestID": "m", "CheckoutRequestID": checkout, "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.", "CallbackMetadata": {"Item": [
            {"Name": "Amount", "Value": 10.0}, {"Name": "MpesaReceiptNumber", "Value": receipt},
            {"Name": "Balance"}, {"Name": "TransactionDate", "Value": 20261127102115},
            {"Name": "PhoneNumber", "Value": 254712345678}]}}}}).encode()


async def status_reader() -> Codec:
    """Reads the ledger's status events: with a registry, the id of the current PaymentStatus schema
    (the one the ledger registered) is known once it is registered here too."""
    codec = await open_codec(os.environ.get("SCHEMA_REGISTRY_URL", ""), [PAYMENT_STATUS])
    await codec.close()
    return codec


def watch_settled(channels: set[bytes], since: dict[int, int], stop, results) -> None:
    """In a process of its own, so the driver's HTTP work does not delay the reading: notes when each
    payment's Settled event is read from the status topic, with when the ledger built it and when
    the relay produced it, and sends {payment: (read, built, produced)} once stopped."""
    codec, seen = asyncio.run(status_reader()), {}
    consumer = Consumer(client_config({"bootstrap.servers": KAFKA, "group.id": "settle-bench",
                                       "enable.auto.commit": False, "fetch.wait.max.ms": 5}))
    consumer.assign([TopicPartition(PAYMENT_STATUS.name, p, o) for p, o in since.items()])
    consumer.consume(1, 1.0)  # connected and fetching: the driver may start
    results.put(0)
    while not stop.is_set():
        for msg in take(consumer, 500, 0.05):
            if msg.error() is None and msg.key() in channels:
                value = codec.decode(msg.value())[1]
                if value["status"] == "Settled" and value["payment_id"] not in seen:
                    seen[value["payment_id"]] = (time.time(), value["occurred_at"].timestamp(),
                                                 msg.timestamp()[1] / 1000)
                    results.put(len(seen))
    consumer.close()
    results.put(seen)


async def batch_summary(http_port: int) -> str:
    """Batches the ledger handled and their mean time, from its own /metrics."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{http_port}/metrics") as answer:
            text = await answer.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("pipeline_batch_handle_seconds_count", "pipeline_batch_handle_seconds_sum"):
            if line.startswith(name + "{"):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    count = values.get("pipeline_batch_handle_seconds_count", 0)
    total = values.get("pipeline_batch_handle_seconds_sum", 0)
    return f"{count:.0f} batches, {total / max(count, 1) * 1000:.1f} ms each on average"


def percentiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=100) if len(values) > 1 else [0.0] * 99


async def main(args) -> None:
    run = uuid.uuid4().hex[:8]
    channels = [f"sbench-{run}-{i}" for i in range(20)]
    migrate(DB)
    ensure_topics(KAFKA, ALL_TOPICS, 6)
    secret = secrets.token_hex(32)
    gateway_port, ledger_port = free_port(), free_port()
    group = f"sbench-{run}"
    start_group_at_end(KAFKA, group,
                       [t.name for t in (PAYMENT_REQUESTED, STK_PUSH_RESULT, CALLBACK_RAW, STK_QUERY_RESULT)])
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": KAFKA, "DATABASE_URL": DB, "WEBHOOK_TOKEN_SECRETS": secret,
           "WEBHOOK_PORT": str(gateway_port), "WEBHOOK_ALLOWED_SOURCES": "127.0.0.1", "LEDGER_GROUP_ID": group,
           "LEDGER_METRICS_PORT": str(ledger_port),
           "WEBHOOK_RATE_PER_SOURCE": "100000", "WEBHOOK_RATE_BURST": "100000", "LOG_LEVEL": "WARNING"}
    procs = [subprocess.Popen([sys.executable, "-m", m], cwd=ROOT, env=env)
             for m in ("services.webhook_consumer", "services.ledger")]
    try:
        wait_for(f"http://127.0.0.1:{gateway_port}/healthz")
        wait_for(f"http://127.0.0.1:{ledger_port}/healthz")
        payments = [(channels[i % len(channels)], new_id(), f"ws_CO_{run}{i}", f"S{run[:4].upper()}{i:05d}")
                    for i in range(args.payments)]
        producer = EventProducer(KAFKA, Codec(), client_id="sbench", linger_ms=20)
        await asyncio.gather(*(producer.publish(t, v) for ch, pid, co, _ in payments for t, v in (
            (PAYMENT_REQUESTED, {**new_event_fields(ch, pid), "amount": 10, "phone": "254712345678",
                                 "account_reference": "SB", "description": None, "order_reference": None,
                                 "idempotency_key": None, "metadata": {}, "source": "TOPIC"}),
            (STK_PUSH_RESULT, {**new_event_fields(ch, pid), "outcome": "ACCEPTED", "merchant_request_id": "m",
                               "checkout_request_id": co, "error_code": None, "error_message": None, "attempts": 1}))))
        producer.close()
        pool = await open_pool(DB, max_size=1)
        deadline = time.monotonic() + args.timeout_s
        pending = 0
        while time.monotonic() < deadline:
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT count(*) FROM payments WHERE channel_id LIKE %s AND"
                                                " state = 'Pending'", (f"sbench-{run}-%",))).fetchone()
                pending = row[0] if row else 0
            if pending == args.payments:
                break
            await asyncio.sleep(0.2)
        await pool.close()
        print(f"{pending} payments Pending; posting callbacks at {args.rate}/s")

        ctx = multiprocessing.get_context("spawn")
        stop_watching, from_watcher = ctx.Event(), ctx.Queue()
        watcher = ctx.Process(target=watch_settled,
                              args=({c.encode() for c in channels}, end_offsets(KAFKA, PAYMENT_STATUS.name),
                                    stop_watching, from_watcher))
        watcher.start()
        from_watcher.get(timeout=60)  # its startup must not count as latency
        sent_at, failures, host = {}, 0, HostLoad()
        cpu_before = [cpu_seconds(p.pid) for p in procs]
        base = f"http://127.0.0.1:{gateway_port}"
        driver = RawDriver("127.0.0.1", gateway_port)  # light: the system under test keeps the CPU

        async def post(ch, pid, co, receipt):
            nonlocal failures
            url, body = callback_url(base, secret.encode(), ch, pid), callback_body(co, receipt)
            sent_at[pid] = time.time()
            failures += await driver.post(url, body) != 200
        started, tasks = time.monotonic(), []
        for i, p in enumerate(payments):
            await asyncio.sleep(max(0.0, started + i / args.rate - time.monotonic()))
            tasks.append(asyncio.create_task(post(*p)))
        await asyncio.gather(*tasks)
        await driver.close()
        read = 0
        while read < args.payments and time.monotonic() < deadline:
            while not from_watcher.empty():
                read = from_watcher.get()
            await asyncio.sleep(0.1)
        cpu_spent = [cpu_seconds(p.pid) - before for p, before in zip(procs, cpu_before, strict=True)]
        stop_watching.set()
        while not isinstance(seen := from_watcher.get(timeout=30), dict):
            pass
        watcher.join()
        done = [pid for pid in seen if pid in sent_at]
        latencies = sorted(seen[pid][0] - sent_at[pid] for pid in done)
        q = percentiles(latencies)
        print(f"callback -> Settled event: {len(latencies)}/{args.payments} settled, {failures} callbacks refused; "
              f"p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms at "
              f"{args.rate}/s (target p99 < 250 ms at 500/s)")
        applying = percentiles(sorted(seen[pid][1] - sent_at[pid] for pid in done))
        relaying = percentiles(sorted(seen[pid][2] - seen[pid][1] for pid in done))
        reading = percentiles(sorted(seen[pid][0] - seen[pid][2] for pid in done))
        print(f"  ledger: {await batch_summary(http_port=ledger_port)}")
        print("  CPU per callback: " + ", ".join(f"{name} {spent / args.payments * 1e6:.0f} us" for name, spent in
                                                zip(("gateway", "ledger"), cpu_spent, strict=True)))
        print("  of which (p50/p99 ms): callback -> ledger applies it "
              f"{applying[49] * 1000:.0f}/{applying[98] * 1000:.0f}; -> committed and handed to Kafka by the relay "
              f"{relaying[49] * 1000:.0f}/{relaying[98] * 1000:.0f}; -> read from the status topic "
              f"{reading[49] * 1000:.0f}/{reading[98] * 1000:.0f}")
        print(f"  {host.describe()}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--timeout-s", type=float, default=120)
    asyncio.run(main(parser.parse_args()))
