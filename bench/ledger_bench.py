"""Ledger throughput: events applied per second through Kafka into PostgreSQL (a benchmark, not a test).

Each of --payments payments has three events on bench topics of its own: its request, an accepted
push result and a success callback. --processes ledgers (the real consumer loop, Ledger and outbox
relay, as `python -m services.ledger` runs them) share a fresh consumer group. Two modes:

  backlog (default): all events are produced first, then the ledgers catch up; events/s from the
                     first batch to the last event applied. The three topics are read side by
                     side, so most results and callbacks arrive before their request and wait.
  --rate R:          R events/s are offered in the order they happen (a payment's push result
                     1 s after its request, its callback 1 s after that); reports the rate applied
                     while offering and how long the ledgers took to finish after the last event.

Also reports the ledgers' CPU per event, the WAL PostgreSQL wrote meanwhile and the host's steal.
Loopback only; bounded by --payments and --timeout-s.

    .venv/bin/python bench/ledger_bench.py [--payments 10000] [--processes 1] [--rate 5000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from confluent_kafka import Producer  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from bench.host import HostLoad  # noqa: E402
from services.common.avro import Codec, open_codec  # noqa: E402
from services.common.db import migrate, open_pool  # noqa: E402
from services.common.ids import new_id  # noqa: E402
from services.common.kafka import ConsumerLoop, EventProducer, ensure_topics, new_event_fields, producer_config  # noqa: E402
from services.common.topics import ACCESS, ALL_TOPICS, Topic  # noqa: E402
from services.ledger.relay import OutboxRelay  # noqa: E402
from services.ledger.service import Ledger, payment_of  # noqa: E402
from services.ledger.settings import SETTINGS as LEDGER_SETTINGS  # noqa: E402

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
# Set (as `make bench` does), events are framed the Confluent way; empty, in single-object encoding.
SCHEMA_REGISTRY_URL = os.environ.get("SCHEMA_REGISTRY_URL", "")
DB = os.environ.get("DATABASE_URL", "postgresql://mpesa@127.0.0.1:5433/mpesa")  # password: PGPASSFILE
DEFAULT_LINGER_MS = next(s.default for s in LEDGER_SETTINGS if s.env == "LEDGER_BATCH_LINGER_MS")


def events_for(run: str, i: int) -> list[tuple[str, dict]]:
    channel, pid, checkout = f"bench-{run}-{i % 20}", new_id(), f"ws_CO_{run}{i}"
    body = {"Body": {"stkCallback": {"MerchantRequestID": "m", "CheckoutRequestID": checkout, "ResultCode": 0,
            "ResultDesc": "ok", "CallbackMetadata": {"Item": [
                {"Name": "Amount", "Value": 10.0},
                {"Name": "MpesaReceiptNumber", "Value": f"R{run[:4].upper()}{i:05d}"},
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


def parked_count() -> float:
    return sum(m.value for metric in REGISTRY.collect() if metric.name == "ledger_facts"
               for m in metric.samples if m.name == "ledger_facts_total" and m.labels.get("verdict") == "parked")


async def produce(run: str, payments: int) -> dict[str, Topic]:
    migrate(DB)
    ensure_topics(KAFKA, ALL_TOPICS, 6)
    topics = {s: Topic(f"bench.{run}.{s}", s) for s in ("payment_requested", "stk_push_result", "callback_raw")}
    ensure_topics(KAFKA, topics.values(), 6)
    codec = await open_codec(SCHEMA_REGISTRY_URL, topics.values())
    producer = EventProducer(KAFKA, codec, client_id="bench", linger_ms=20)
    started = time.perf_counter()
    await asyncio.gather(*(producer.publish(topics[s], v) for i in range(payments) for s, v in events_for(run, i)))
    producer.close()
    await codec.close()
    if payments:
        print(f"produced {3 * payments} events in {time.perf_counter() - started:.1f}s")
    return topics


def ledger_process(run: str, topics: dict[str, Topic], in_flight: int, linger_ms: int, shared) -> None:
    """One ledger instance (of --processes, all in one consumer group), as `python -m services.ledger` runs it."""
    asyncio.run(run_ledger(run, topics, in_flight, linger_ms, shared))


async def run_ledger(run: str, topics: dict[str, Topic], in_flight: int, linger_ms: int, shared) -> None:
    applied, first, stop_flag, results, ready = shared
    codec = await open_codec(SCHEMA_REGISTRY_URL, ACCESS["ledger"].writes)
    producer = EventProducer(KAFKA, codec, client_id="bench-ledger")
    pool = await open_pool(DB, max_size=4)
    relay = OutboxRelay(pool, producer)
    ledger = Ledger(pool, codec, on_commit=relay.hand_over)
    cpu_first, batches = None, 0

    async def counting(events):
        nonlocal cpu_first, batches
        batches += 1
        if cpu_first is None:
            cpu_first = time.process_time(), time.thread_time()
            with first.get_lock():
                first.value = first.value or time.time()
        rejections = await ledger.handle_batch(events)
        with applied.get_lock():
            applied.value += len(events)
        return rejections

    loop = ConsumerLoop(bootstrap=KAFKA, group_id=f"bench-{run}", topics=list(topics.values()), codec=codec,
                        handler=counting, dead_letters=producer, max_batch=1000, max_in_flight=in_flight,
                        order_key=payment_of, linger_s=linger_ms / 1000)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(loop.run(stop)), asyncio.create_task(relay.run(stop))]
    while not loop.assigned:
        await asyncio.sleep(0.05)
    with ready.get_lock():
        ready.value += 1
    while not stop_flag.is_set():
        await asyncio.sleep(0.05)
    cpu = (time.process_time() - cpu_first[0], time.thread_time() - cpu_first[1]) if cpu_first else (0.0, 0.0)
    stop.set()
    await asyncio.gather(*tasks)
    await pool.close()
    producer.close()
    await codec.close()
    results.put((*cpu, parked_count(), batches))


async def count_settled(run: str) -> int:
    pool = await open_pool(DB, max_size=1)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM payments WHERE channel_id LIKE %s AND state = 'Settled'",
                                 (f"bench-{run}-%",))
        row = await cur.fetchone()
        settled = row[0] if row else 0
    await pool.close()
    return settled


def wal_written() -> tuple[int, int]:
    """(bytes, full-page images) PostgreSQL has written to its WAL (cluster-wide, since its stats reset)."""
    with psycopg.connect(DB) as conn:
        row = conn.execute("SELECT wal_bytes, wal_fpi FROM pg_stat_wal").fetchone()
    assert row is not None, "pg_stat_wal has one row"
    written, full_pages = row
    return int(written), full_pages


async def encoder(topics) -> Codec:
    codec = await open_codec(SCHEMA_REGISTRY_URL, topics)
    await codec.close()  # the topics' ids are known: encoding asks the registry nothing more
    return codec


def offer_live(run: str, topics: dict[str, Topic], payments: int, rate: float, applied) -> tuple[float, int]:
    """Produces the events at `rate` per second in the order they happen; returns (seconds, applied meanwhile)."""
    codec, per_payment = asyncio.run(encoder(topics.values())), rate / 3
    schedule = sorted(((i / per_payment + step, s, v) for i in range(payments)
                       for step, (s, v) in enumerate(events_for(run, i))), key=lambda e: e[0])
    encoded = [(t, topics[s].name, v["channel_id"].encode(), codec.encode(topics[s], v)) for t, s, v in schedule]
    producer = Producer(producer_config(KAFKA, "bench-live", 15000, 5))
    started, applied_before = time.time(), applied.value
    for t, topic, key, value in encoded:
        if (delay := started + t - time.time()) > 0.001:
            time.sleep(delay)
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    producer.flush()
    return time.time() - started, applied.value - applied_before


def main(payments: int, processes: int, in_flight: int, linger_ms: int, rate: float, timeout_s: float) -> None:
    run = uuid.uuid4().hex[:8]
    topics = asyncio.run(produce(run, payments if not rate else 0))
    host, wal_before = HostLoad(), wal_written()
    ctx = multiprocessing.get_context("spawn")
    shared = (ctx.Value("q", 0), ctx.Value("d", 0.0), ctx.Event(), ctx.Queue(), ctx.Value("i", 0))
    ledgers = [ctx.Process(target=ledger_process, args=(run, topics, in_flight, linger_ms, shared))
               for _ in range(processes)]
    for p in ledgers:
        p.start()
    applied, first, stop_flag, results, ready = shared
    deadline = time.time() + timeout_s
    offered_s, applied_meanwhile, offer_end = 0.0, 0, 0.0
    if rate:
        while ready.value < processes and time.time() < deadline:
            time.sleep(0.05)
        offered_s, applied_meanwhile = offer_live(run, topics, payments, rate, applied)
        offer_end = time.time()
    while applied.value < 3 * payments and time.time() < deadline:
        time.sleep(0.02)
    elapsed = time.time() - (first.value or time.time())
    stop_flag.set()
    cpu = [results.get(timeout=60) for _ in ledgers]
    for p in ledgers:
        p.join()
    settled = asyncio.run(count_settled(run))
    wal = [after - before for after, before in zip(wal_written(), wal_before, strict=True)]
    done = applied.value
    shape = f"ledger ({processes} process(es), {in_flight} batch(es) in flight each, {linger_ms} ms linger)"
    if rate:
        print(f"{shape}: offered {rate:,.0f} events/s in order for {offered_s:.1f}s; applied "
              f"{applied_meanwhile / offered_s:,.0f} events/s meanwhile; all {done} applied "
              f"{elapsed - (offer_end - first.value):.2f}s after the last was produced; {settled}/{payments} Settled")
    else:
        print(f"{shape}: {done} events in {elapsed:.2f}s = {done / elapsed:,.0f} events/s; "
              f"{settled}/{payments} payments Settled (target >= 5,000 events/s)")
    print(f"  CPU per event: {sum(c[0] for c in cpu) / max(done, 1) * 1e6:.0f} us in the ledger processes"
          f" ({sum(c[1] for c in cpu) / max(done, 1) * 1e6:.0f} on their event loops);"
          f" {sum(c[2] for c in cpu):.0f} facts arrived before their payment;"
          f" {done / max(sum(c[3] for c in cpu), 1):.1f} events per batch")
    print(f"  PostgreSQL WAL meanwhile: {wal[0] / max(done, 1) / 1024:.1f} KiB per event, {wal[1]} full-page images"
          " (the whole cluster's, autovacuum and checkpoints included)")
    print(f"  {host.describe()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=1, help="ledger instances in the consumer group")
    parser.add_argument("--in-flight", type=int, default=2, help="LEDGER_MAX_IN_FLIGHT of each ledger")
    parser.add_argument("--linger-ms", type=int, default=DEFAULT_LINGER_MS,
                        help="LEDGER_BATCH_LINGER_MS of each ledger (default: the service's)")
    parser.add_argument("--rate", type=float, default=0, help="events/s offered in order (0: backlog mode)")
    parser.add_argument("--timeout-s", type=float, default=120)
    args = parser.parse_args()
    main(args.payments, args.processes, args.in_flight, args.linger_ms, args.rate, args.timeout_s)
