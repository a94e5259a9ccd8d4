"""Throughput and latency of the webhook gateway (a benchmark, not a test).

Starts `python -m services.webhook_consumer` as a subprocess on loopback against the configured
Kafka (KAFKA_BOOTSTRAP_SERVERS, default 127.0.0.1:9092), then drives it with valid, distinct
callbacks (pre-built URLs and Daraja-sized bodies, 50 channels) over keep-alive connections:

  throughput phase: --callbacks callbacks with --concurrency in flight, as fast as answers come;
                    callbacks/s (each answered 200 only after Kafka's ack);
  rate phase:       an open loop at --rate callbacks/s for --rate-seconds; latency is measured
                    from each callback's scheduled send time, so a stall counts against it.

Also reports the gateway's and the driver's CPU use and, per phase, the CPU the hypervisor stole and
the CPU pressure (a busy or shared machine shows there first), and checks the raw topic grew by at
least the accepted count.
Bounded by --callbacks, --rate-seconds and --timeout-s.

The default driver writes pre-encoded HTTP/1.1 requests on plain asyncio streams: on a 2-core box
that also runs Kafka, an aiohttp client needs half a core or more at these rates and starves the
gateway it measures. `--driver aiohttp` drives it with aiohttp's client instead.

    .venv/bin/python bench/gateway_bench.py [--callbacks 20000] [--concurrency 64] [--rate 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from bench.host import HostLoad, cpu_pressure, cpu_seconds  # noqa: E402
from bench.raw_http import HEADERS, RawDriver  # noqa: E402
from services.common.callback_token import callback_url  # noqa: E402
from services.common.kafka import client_config, ensure_topics  # noqa: E402
from services.common.topics import ALL_TOPICS, CALLBACK_RAW  # noqa: E402
from tests.e2e.stack import wait_for  # noqa: E402

CHANNELS = 50
BODY = ('{"Body":{"stkCallback":{"MerchantRequestID":"29115-34620561-1","CheckoutRequestID":"ws_CO_%s",'
        '"ResultCode":0,"ResultDesc":"The service request is processed successfully.","CallbackMetadata":{"Item":['
        '{"Name":"Amount","Value":1.00},{"Name":"MpesaReceiptNumber","Value":"NLJ7RT61SV"},{"Name":"Balance"},'
        '{"Name":"TransactionDate","Value":20191219102115},{"Name":"PhoneNumber","Value":254708374149}]}}}}')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(port: int, bootstrap: str, secret: str, linger_ms: int, cpu: int | None) -> subprocess.Popen:
    env = {**os.environ, "WEBHOOK_PORT": str(port), "WEBHOOK_TOKEN_SECRETS": secret,
           "WEBHOOK_KAFKA_LINGER_MS": str(linger_ms),
           "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "WEBHOOK_ALLOWED_SOURCES": "127.0.0.1", "WEBHOOK_TRUSTED_PROXIES": "",
           "WEBHOOK_RATE_PER_SOURCE": "1000000000", "WEBHOOK_RATE_BURST": "1000000000", "LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "services.webhook_consumer"], cwd=ROOT, env=env,
                            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)


class CpuMeter:
    """CPU used by the gateway and by this driver since creation: who was the bottleneck."""

    def __init__(self, gateway_pid: int):
        self.gateway_pid = gateway_pid
        self.gateway_before, self.driver_before = cpu_seconds(gateway_pid), time.process_time()
        self.started = time.perf_counter()
        self._elapsed = 0.0
        self.host = HostLoad()

    def elapsed(self) -> float:
        self._elapsed = time.perf_counter() - self.started
        return self._elapsed

    def figures(self, callbacks: int) -> dict:
        gateway_s = cpu_seconds(self.gateway_pid) - self.gateway_before
        driver_s = time.process_time() - self.driver_before
        return {"gateway_cpu_percent": round(100 * gateway_s / self._elapsed),
                "gateway_cpu_us_per_callback": round(1e6 * gateway_s / callbacks),
                "driver_cpu_percent": round(100 * driver_s / self._elapsed), **self.host.figures()}


def raw_topic_size(bootstrap: str) -> int:
    consumer = Consumer(client_config({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}"}))
    try:
        partitions = consumer.list_topics(CALLBACK_RAW.name, timeout=10).topics[CALLBACK_RAW.name].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(CALLBACK_RAW.name, p), timeout=10)[1]
                   for p in partitions)
    finally:
        consumer.close()


def build_callbacks(base: str, secret: str, count: int, run: str) -> list[tuple[str, bytes]]:
    return [(callback_url(base, secret.encode(), f"bench-{run}-{i % CHANNELS}", f"pay-{run}-{i}"),
             (BODY % f"{run}{i:08d}").encode()) for i in range(count)]


class AiohttpDriver:
    def __init__(self, session: aiohttp.ClientSession):
        self.session = session

    async def post(self, url: str, body: bytes) -> int:
        async with self.session.post(url, data=body, headers=HEADERS) as response:
            await response.read()
            return response.status

    async def close(self) -> None:
        pass


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def latency_figures(latencies_s: list[float]) -> dict:
    ordered = sorted(latencies_s)
    return {f"{name}_ms": round(percentile(ordered, q) * 1000, 2)
            for name, q in (("p50", 0.50), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))}


async def throughput_phase(driver, callbacks: list[tuple[str, bytes]], concurrency: int,
                           timeout_s: float, gateway_pid: int) -> dict:
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(callbacks):
            url, body = callbacks[next_index]
            next_index += 1
            sent = time.perf_counter()
            status = await driver.post(url, body)
            latencies.append(time.perf_counter() - sent)
            statuses[status] = statuses.get(status, 0) + 1

    cpu = CpuMeter(gateway_pid)
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s)
    elapsed = cpu.elapsed()
    return {"phase": "throughput", "callbacks": len(callbacks), "in_flight": concurrency,
            "seconds": round(elapsed, 2), "statuses": statuses,
            "callbacks_per_s": round(statuses.get(200, 0) / elapsed), **cpu.figures(len(callbacks)),
            **latency_figures(latencies)}


async def rate_phase(driver, callbacks: list[tuple[str, bytes]], rate: float,
                     timeout_s: float, gateway_pid: int) -> dict:
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    failures: list[str] = []

    async def one(url: str, body: bytes, due: float) -> None:
        try:
            status = await driver.post(url, body)
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            failures.append(type(exc).__name__)
            return
        latencies.append(time.perf_counter() - due)  # from when it should have been sent
        statuses[status] = statuses.get(status, 0) + 1

    tasks = []
    cpu = CpuMeter(gateway_pid)
    started = cpu.started
    for i, (url, body) in enumerate(callbacks):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(url, body, due)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)
    elapsed = cpu.elapsed()
    return {"phase": "fixed rate", "target_per_s": rate, "callbacks": len(callbacks), "seconds": round(elapsed, 2),
            "achieved_per_s": round(statuses.get(200, 0) / elapsed), "statuses": statuses,
            "client_errors": len(failures), **cpu.figures(len(callbacks)), **latency_figures(latencies)}


async def run(args: argparse.Namespace) -> list[dict]:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    ensure_topics(bootstrap, ALL_TOPICS, int(os.environ.get("KAFKA_TOPIC_PARTITIONS", "6")))
    cpus = sorted(os.sched_getaffinity(0))
    pin = len(cpus) >= 2 and not args.no_pin
    if pin:  # the gateway on one core, this driver on another (Kafka shares them)
        os.sched_setaffinity(0, {cpus[0]})
    port, secret, run_id = free_port(), secrets.token_urlsafe(32), uuid.uuid4().hex[:8]
    base = f"http://127.0.0.1:{port}"
    gateway = start_gateway(port, bootstrap, secret, args.linger_ms, cpus[1] if pin else None)
    results = [{"phase": "setup", "driver": args.driver, "pinned": pin, "cpus": len(cpus),
                "linger_ms": args.linger_ms, "host_cpu_pressure_before": cpu_pressure()}]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(args.concurrency, 256))) as session:
            wait_for(f"{base}/healthz")
            driver = AiohttpDriver(session) if args.driver == "aiohttp" else RawDriver("127.0.0.1", port)
            try:
                await throughput_phase(driver, build_callbacks(base, secret, 1000, f"{run_id}w"), 16, args.timeout_s,
                                       gateway.pid)  # warm-up
                size_before = raw_topic_size(bootstrap)
                throughput = build_callbacks(base, secret, args.callbacks, f"{run_id}t")
                results.append(await throughput_phase(driver, throughput, args.concurrency, args.timeout_s,
                                                      gateway.pid))
                fixed = build_callbacks(base, secret, int(args.rate * args.rate_seconds), f"{run_id}r")
                results.append(await rate_phase(driver, fixed, args.rate, args.timeout_s, gateway.pid))
            finally:
                await driver.close()
        accepted = sum(r["statuses"].get(200, 0) for r in results[1:])
        grown = raw_topic_size(bootstrap) - size_before
        results.append({"phase": "check", "accepted": accepted, "raw_topic_grew_by": grown,
                        "every_accepted_callback_is_on_the_topic": grown >= accepted})
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callbacks", type=int, default=20_000, help="callbacks in the throughput phase")
    parser.add_argument("--concurrency", type=int, default=64, help="callbacks in flight, throughput phase")
    parser.add_argument("--rate", type=float, default=1000.0, help="callbacks per second, rate phase")
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="duration of the rate phase")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="bound on each phase")
    parser.add_argument("--no-pin", action="store_true", help="do not pin gateway and driver to separate cores")
    parser.add_argument("--driver", choices=("raw", "aiohttp"), default="raw",
                        help="raw: pre-encoded keep-alive HTTP/1.1 (light); aiohttp: aiohttp's client")
    parser.add_argument("--linger-ms", type=int, default=5, help="WEBHOOK_KAFKA_LINGER_MS of the gateway")
    args = parser.parse_args()
    if args.callbacks > 1_000_000 or args.rate * args.rate_seconds > 1_000_000:
        parser.error("at most 1,000,000 callbacks per phase")
    for line in asyncio.run(run(args)):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
