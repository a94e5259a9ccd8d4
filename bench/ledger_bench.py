"""Ledger throughput: events applied per second through Kafka into PostgreSQL (a benchmark, not a test).

Produces, on bench topics of its own, a payment request, an accepted push result and a success
callback for each of --payments payments, then runs the real consumer loop + Ledger + outbox relay
in this process with a fresh group, and reports events/s from the first batch to the last
payment Settled. Loopback only; bounded by --payments and --timeout-s.

    .venv/bin/python bench/ledger_bench.py [--payments 5000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.avro import Codec  # noqa: E402
from services.common.db import migrate, open_pool  # noqa: E402
from services.common.kafka import ConsumerLoop, EventProducer, ensure_topics, new_event_fields  # noqa: E402
from services.common.topics import ALL_TOPICS, Topic  # noqa: E402
from services.ledger.relay import OutboxRelay  # noqa: E402
from services.ledger.service import Ledger  # noqa: E402

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
DB = os.environ.get("DATABASE_URL", "postgresql://mpesa:mpesa@127.0.0.1:5433/mpesa")


def events_for(run: str, i: int) -> list[tuple[str, dict]]:
    channel, pid, checkout = f"bench-{run}-{i % 20}", str(uuid.uuid4()), f"ws_CO_{run}{i}"
    body = {"Body": {"stkCallback": {"MerchantRequestID": "m", "CheckoutRequestID": checkout, "ResultCode": 0,
            "ResultDesc": "ok", "CallbackMetadata": {"Item": [
                {"Name": "Amount", "Value": 10.0}, {"Name": "MpesaReceiptNumber", "Value": f"R{run[:5]}{i:05d}"},
                {"Name": "Balance"}, {"Name": "TransactionDate", "Value": 20261127102115},
                {"Name": "PhoneNumber", "Value": 254712345678}]}}}}
    return [
        ("payment_requested", {**new_event_fields(channel, pid), "amount": 10, "phone": "254712345678",
                               "account_reference": "BENCH", "description": None, "order_reference": None,
                               "idempotency_key": None, "metadata": {}, "source": "TOPIC"}),
        ("stk_push_result", {**new_event_fields(channel, pid), "outcome": "ACCEPTED", "merchant_request_id": "m",
                             "checkout_request_id": checkout, "error_code": None, "error_message": None,
                             "attempts": 1}),
        ("callback_raw", {**new_event_fields(channel, pid), "received_at": new_event_fields(channel)["occurred_at"],
                          "source_address": "127.0.0.1", "path": "/bench", "path_params": {},
                          "content_type": "application/json", "body": json.dumps(body).encode(),
                          "rejection_reason": None}),
    ]


async def main(payments: int, timeout_s: float) -> None:
    run = uuid.uuid4().hex[:8]
    codec = Codec()
    migrate(DB)
    ensure_topics(KAFKA, ALL_TOPICS, 6)
    topics = {s: Topic(f"bench.{run}.{s}", s) for s in ("payment_requested", "stk_push_result", "callback_raw")}
    ensure_topics(KAFKA, topics.values(), 6)
    producer = EventProducer(KAFKA, codec, client_id="bench", linger_ms=20)
    started = time.perf_counter()
    await asyncio.gather(*(producer.publish(topics[s], v) for i in range(payments) for s, v in events_for(run, i)))
    print(f"produced {3 * payments} events in {time.perf_counter() - started:.1f}s")

    pool = await open_pool(DB, max_size=4)
    relay = OutboxRelay(pool, producer)
    ledger = Ledger(pool, codec, on_commit=relay.wake.set)
    applied, first, cpu_first = 0, None, 0.0

    async def counting(events):
        nonlocal applied, first, cpu_first
        if first is None:
            first, cpu_first = time.perf_counter(), time.process_time()
        rejections = await ledger.handle_batch(events)
        applied += len(events)
        return rejections

    loop = ConsumerLoop(bootstrap=KAFKA, group_id=f"bench-{run}", topics=list(topics.values()), codec=codec,
                        handler=counting, dead_letters=producer, max_batch=1000)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(loop.run(stop)), asyncio.create_task(relay.run(stop))]
    deadline = time.perf_counter() + timeout_s
    while applied < 3 * payments and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - (first or time.perf_counter())
    cpu = time.process_time() - cpu_first
    stop.set()
    await asyncio.gather(*tasks)
    async with pool.connection() as conn:
        settled = (await (await conn.execute("SELECT count(*) FROM payments WHERE channel_id LIKE %s AND state = 'Settled'",
                                             (f"bench-{run}-%",))).fetchone())[0]
    await pool.close()
    producer.close()
    print(f"ledger: {applied} events in {elapsed:.2f}s = {applied / elapsed:,.0f} events/s; "
          f"{settled}/{payments} payments Settled (target >= 5,000 events/s); "
          f"ledger CPU {cpu / max(applied, 1) * 1e6:.0f} us/event")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=5000)
    parser.add_argument("--timeout-s", type=float, default=120)
    args = parser.parse_args()
    asyncio.run(main(args.payments, args.timeout_s))
