"""STK worker throughput with Daraja answering after 300 ms (a benchmark, not a test).

Starts the Daraja sandbox (--latency-ms, no callbacks) and `python -m services.stk_worker` as
subprocesses on loopback, onboards a channel on the sandbox's demo app (vault key file in a temp
folder), produces --payments payment requests (all at once, or --rate per second in an open loop),
and reports push results per second from the first to the last, with the sandbox's own count of
accepted pushes, and the worker's CPU per push (its process and threads, /proc, from the first
request produced to the last result read: the figure that holds on a shared machine, where rates
swing), with how often per push its threads slept and were preempted. Bounded by --payments and --timeout-s.
BENCH_WORKER_COMMAND replaces `-m services.stk_worker` (e.g. "-m cProfile -o w.prof -m services.stk_worker").

    .venv/bin/python bench/worker_bench.py [--payments 5000] [--latency-ms 300] [--in-flight 400] [--rate 300]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from bench.host import HostLoad, context_switches, cpu_seconds  # noqa: E402
from services.common.avro import Codec  # noqa: E402
from services.common.db import migrate, open_pool  # noqa: E402
from services.common.kafka import EventProducer, client_config, ensure_topics, new_event_fields, take  # noqa: E402
from services.common.topics import ALL_TOPICS, PAYMENT_REQUESTED, STK_PUSH_RESULT, STK_QUERY_REQUESTED  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.e2e.stack import wait_for  # noqa: E402
from tests.platform.kafka_helpers import end_offsets, start_group_at_end  # noqa: E402

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
DB = os.environ.get("DATABASE_URL", "postgresql://mpesa@127.0.0.1:5433/mpesa")  # password: PGPASSFILE


async def onboard(key_file: Path, channel_id: str) -> None:
    from tests.e2e.stack import Stack
    pool = await open_pool(DB, max_size=2)
    stack = Stack.__new__(Stack)
    stack.key_file = key_file
    await Stack.onboard(stack, pool, channel_id)
    await pool.close()


def count_results(channel: bytes, since: dict[int, int], expected: int, timeout_s: float) -> tuple[int, float, float]:
    consumer = Consumer(client_config({"bootstrap.servers": KAFKA, "group.id": "bench-reader",
                                       "enable.auto.commit": False}))
    consumer.assign([TopicPartition(STK_PUSH_RESULT.name, p, o) for p, o in since.items()])
    seen, first, last = 0, None, None
    deadline = time.monotonic() + timeout_s
    while seen < expected and time.monotonic() < deadline:
        for msg in take(consumer, 1000, 0.2):
            if msg.error() is None and msg.key() == channel:
                seen += 1
                first = first or time.monotonic()
                last = time.monotonic()
    consumer.close()
    return seen, first or 0, last or 0


async def main(args) -> None:
    host = HostLoad()
    run = uuid.uuid4().hex[:8]
    channel_id = f"wbench-{run}"
    tmp = Path(tempfile.mkdtemp())
    key_file = tmp / "kek.json"
    migrate(DB)
    ensure_topics(KAFKA, ALL_TOPICS, 6)
    sandbox_port, metrics_port = free_port(), free_port()
    admin_token = secrets.token_urlsafe(32)
    admin = {"Authorization": f"Bearer {admin_token}"}  # what the sandbox's admin API needs
    sandbox = subprocess.Popen([sys.executable, "-m", "services.daraja_sandbox", "--port", str(sandbox_port),
                                "--latency-ms", str(args.latency_ms), "--no-subscriber-lock"], cwd=ROOT,
                               env={**os.environ, "DARAJA_SANDBOX_ADMIN_TOKEN": admin_token},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(f"http://127.0.0.1:{sandbox_port}/sandbox/health")
    httpx.post(f"http://127.0.0.1:{sandbox_port}/sandbox/scenarios", json={"default": True, "scenario": "no_callback"},
               headers=admin).raise_for_status()
    from services.channels.vault import LocalKeyFileProvider
    LocalKeyFileProvider.open(key_file, create=True)
    await onboard(key_file, channel_id)
    group = f"wbench-{run}"
    start_group_at_end(KAFKA, group, [PAYMENT_REQUESTED.name])
    # The worker's query consumer too: left at the topic's start, it would take up (and retry, under
    # keys this run's vault lacks) every query the tests and earlier runs left there, and bill them to the pushes.
    start_group_at_end(KAFKA, f"{group}-queries", [STK_QUERY_REQUESTED.name])
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": KAFKA, "DATABASE_URL": DB, "VAULT_KEY_FILE": str(key_file),
           "DARAJA_BASE_URL": f"http://127.0.0.1:{sandbox_port}", "STK_WORKER_GROUP_ID": group,
           "STK_WORKER_METRICS_PORT": str(metrics_port), "WEBHOOK_TOKEN_SECRETS": secrets.token_hex(32),
           "STK_MAX_IN_FLIGHT": str(args.in_flight), "STK_RATE_PER_SHORTCODE": "100000", "LOG_LEVEL": "WARNING"}
    command = os.environ.get("BENCH_WORKER_COMMAND", "-m services.stk_worker").split()
    worker = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env)
    try:
        wait_for(f"http://127.0.0.1:{metrics_port}/healthz")
        mark = end_offsets(KAFKA, STK_PUSH_RESULT.name)
        producer = EventProducer(KAFKA, Codec(), client_id="wbench", linger_ms=20)
        started, cpu_before, switches_before = time.monotonic(), cpu_seconds(worker.pid), context_switches(worker.pid)
        def request(i: int) -> dict:
            return {**new_event_fields(channel_id, str(uuid.uuid4())), "amount": 10, "phone": f"254713{i:06d}",
                    "account_reference": f"W{i}", "description": None, "order_reference": None,
                    "idempotency_key": None, "metadata": {}, "source": "TOPIC"}
        if args.rate:  # open loop: each request at its time, whatever the acknowledgements do
            sent = []
            for i in range(args.payments):
                await asyncio.sleep(max(0.0, started + i / args.rate - time.monotonic()))
                sent.append(asyncio.create_task(producer.publish(PAYMENT_REQUESTED, request(i))))
            await asyncio.gather(*sent)
        else:
            await asyncio.gather(*(producer.publish(PAYMENT_REQUESTED, request(i)) for i in range(args.payments)))
        producer.close()
        print(f"produced {args.payments} requests in {time.monotonic() - started:.1f}s")
        seen, first, last = await asyncio.to_thread(count_results, channel_id.encode(), mark, args.payments,
                                                    args.timeout_s)
        cpu_s = cpu_seconds(worker.pid) - cpu_before
        slept, preempted = (after - before for after, before in zip(context_switches(worker.pid), switches_before,
                                                                    strict=True))
        accepted = httpx.get(f"http://127.0.0.1:{sandbox_port}/sandbox/stats", headers=admin).json()
        rate = seen / (last - first) if last > first else 0
        pace = (f"{seen} push results of requests offered at {args.rate:,.0f}/s" if args.rate  # read after the fact
                else f"{seen} push results in {last - first:.2f}s = {rate:,.0f} pushes/s")
        print(f"worker: {pace} at {args.latency_ms} ms Daraja latency, {args.in_flight} in flight (target >= 500/s);"
              f" sandbox stats: {accepted}")
        print(f"  CPU per push: {cpu_s / max(seen, 1) * 1e6:.0f} us in the worker process ({cpu_s:.2f} s); its threads"
              f" slept {slept / max(seen, 1):.2f} and were preempted {preempted / max(seen, 1):.2f} times per push")
        print(f"  {host.describe()}")
    finally:
        worker.terminate()
        sandbox.terminate()
        worker.wait(30)
        sandbox.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=5000)
    parser.add_argument("--latency-ms", type=int, default=300)
    parser.add_argument("--in-flight", type=int, default=400)
    parser.add_argument("--rate", type=float, default=0,
                        help="requests/s produced in an open loop (0: all at once, a backlog)")
    parser.add_argument("--timeout-s", type=float, default=120)
    asyncio.run(main(parser.parse_args()))
