"""The whole pipeline under load, from request to `Settled` (a benchmark, not a test).

Starts every service as `make run` does (services/devstack.py `stack_processes`, --workers/--gateways/
--ledgers processes of the scalable ones) on free ports, with consumer groups of its own starting at the
topics' end, and the Daraja sandbox answering each push after --latency-ms and sending its callback
--callback-delay-ms later. A channel and an API key of its own (made per run) then offer payments to the
ingress at --rate per second for --duration-s, open loop: each request leaves at its scheduled time
whatever earlier answers do, and latency counts from that time, so a stall is never hidden (no
coordinated omission). Before it measures, it warms up: 50 payments at 25/s (caches, connections), then
--warmup-s at the load's rate (a broker just started spends about 14 s of CPU compiling in its first minute
under load). After a drain (all payments final, or --drain-timeout-s) it reports:

  settled/s        payments reaching Settled per second, from the first Settled to the last;
  none lost        offered, accepted (202), Settled, other final states, missing (accepted, never final);
  request→Pending  p50/p99/max from a request's scheduled time to its Pending event on
                   mpesa.payment.status.v1, as an upstream reading that topic sees it (read here);
  callback→Settled p50/p99/max from the moment the sandbox started sending the callback (its push log,
                   `callbacksSentAt`) to the Settled event read the same way;
  CPU ms/payment   of each process (every service instance, the sandbox, Kafka's JVM, the schema
                   registry, PostgreSQL: the postmaster and all its backends, exited ones too) from the
                   first request to the end of the drain, divided by the payments accepted; the
                   project's own (ingress, STK worker, webhook gateway, ledger) summed, against ≤ 2.5 ms;
                   beside it, how often per payment each process's threads slept (then were woken) and
                   were preempted (live threads; PostgreSQL's exited backends are not counted);
  host             the hypervisor's steal and the CPU pressure meanwhile, and a fixed speed probe run
                   before the load (bench/host.py), so runs on different hosts can be compared.

--step raises the rate (--step-start, + --step-increment, each for --step-duration-s) until p99
callback→Settled ≥ 250 ms, p99 request→Pending ≥ 1 s, or a payment is refused or lost, and prints the
highest rate held. --json FILE writes every figure. Everything it started is stopped at the end.

    .venv/bin/python bench/pipeline_bench.py [--rate 300] [--duration-s 60] [--workers 1] [--json out.json]
Env: what `infra/up.sh` prints (`make bench` exports it); run alone: `set -a; eval "$(bash infra/up.sh)"`.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
from confluent_kafka import Consumer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from bench.host import HostLoad, context_switches, cpu_seconds, host_speed_s  # noqa: E402
from bench.raw_http import Connection  # noqa: E402
from services.channels.onboarding import Onboarding  # noqa: E402
from services.channels.vault import public_key_path  # noqa: E402
from services.cli import RUN_SETTINGS, RunSettings  # noqa: E402
from services.common import config  # noqa: E402
from services.common.avro import DecodeError, open_codec  # noqa: E402
from services.common.db import open_pool  # noqa: E402
from services.common.kafka import client_config, ensure_topics, take  # noqa: E402
from services.common.topics import ACCESS, ALL_TOPICS, PAYMENT_REQUESTED, PAYMENT_STATUS, STK_QUERY_REQUESTED  # noqa: E402
from services.daraja_sandbox import settings as sandbox_settings  # noqa: E402
from services.daraja_sandbox.scenarios import SELECTOR_PHONE_PREFIX, SELECTORS  # noqa: E402
from services.devstack import (  # noqa: E402
    ADMIN_LOGIN,
    METRICS_ENDPOINTS,
    SCALABLE,
    SERVICE_ROLES,
    StackProcess,
    metrics_targets,
    onboard_sandbox_channel,
    prepare,
    role_url,
    stack_processes,
)
from services.webhook_consumer import settings as gateway_settings  # noqa: E402
from tests.platform.kafka_helpers import end_offsets, start_group_at_end  # noqa: E402

TARGET_SETTLED_PER_S = 300.0
TARGET_REQUEST_TO_PENDING_P99_MS = 1000.0
TARGET_CALLBACK_TO_SETTLED_P99_MS = 250.0
TARGET_OWN_CPU_MS = 2.5
OWN_SERVICES = ("ingress", "stk-worker", "webhook-gateway", "ledger")  # the project's own, in the CPU target
OTHER_FINAL = ("Cancelled", "Failed", "Review")  # Review: final until a person acts
PHONE = "254712345678"  # outside the sandbox's scenario selectors: its default outcome, success
LISTEN_PORTS = (20000, 30000)  # where the services of the run listen (the ports' step is 100)
CONNECTIONS_MAX = 2000  # the driver's keep-alive connections; beyond, a request counts as refused
# Answers that are no HTTP status, by the code the driver notes them under.
DRIVER_REFUSED, UNANSWERED, CONNECTION_LOST = -1, -2, 0
ANSWER_NAMES = {DRIVER_REFUSED: "refused by the driver (too many in flight)", UNANSWERED: "unanswered",
                CONNECTION_LOST: "connection lost"}
# The sandbox is one shortcode and one source address, while production spreads its load over many
# merchants' shortcodes and Safaricom's callback addresses: the bench lifts these two per-tenant guards
# so that it measures the pipeline, not them (their defaults, 50 pushes/s and 100 callbacks/s, would cap it).
LIFTED_GUARDS = {"STK_RATE_PER_SHORTCODE": "1000000", "WEBHOOK_RATE_PER_SOURCE": "1000000",
                 "WEBHOOK_RATE_BURST": "100000"}


# --- the stack -----------------------------------------------------------------------------------

def free_port_block(instances: int, taken: set[int]) -> int:
    """A port p free for p, p + 100, …: the n-th process of a service listens at + 100 × (n - 1). Taken
    below Linux's ephemeral range (32768-60999), where the services' own outgoing connections would
    take it before the service listens on it."""
    while True:
        first = random.randrange(*LISTEN_PORTS)
        block = {first + 100 * n for n in range(instances)}
        if not block & taken and all(_bindable(port) for port in block):
            taken |= block
            return first


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _die_with_parent() -> None:
    # If the bench is killed outright, its services get SIGTERM instead of running on (Linux prctl).
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Stack:
    """The processes of `mpesa-pipeline run`, on ports and consumer groups of this run's own."""

    def __init__(self, run: str, instances: dict[str, int], log_level: str, logs: Path):
        self.run, self.instances, self.logs = run, instances, logs
        taken: set[int] = set()
        self.ports = {port_env: free_port_block(instances.get(service, 1), taken)
                      for service, (_, _, port_env) in METRICS_ENDPOINTS.items()}
        self.ports[sandbox_settings.PORT.env] = free_port_block(1, taken)
        # Several gateways share WEBHOOK_PORT and serve their metrics on ports of their own (instance_ports).
        self.ports[gateway_settings.METRICS_PORT.env] = free_port_block(instances.get("webhook-gateway", 1), taken)
        self.groups = {"LEDGER_GROUP_ID": f"ledger-bench-{run}", "STK_WORKER_GROUP_ID": f"stk-worker-bench-{run}",
                       "NOTIFIER_GROUP_ID": f"notifier-bench-{run}"}
        self.env = {**{k: str(v) for k, v in self.ports.items()}, **self.groups, **LIFTED_GUARDS,
                    "DARAJA_BASE_URL": self.sandbox_url, "CALLBACK_PUBLIC_BASE_URL": self.url("WEBHOOK_PORT"),
                    "LOG_LEVEL": log_level, "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.plan: list[StackProcess] = []

    def url(self, port_env: str) -> str:
        return f"http://127.0.0.1:{self.ports[port_env]}"

    sandbox_url = property(lambda self: self.url(sandbox_settings.PORT.env))
    ingress_port = property(lambda self: self.ports["INGRESS_PORT"])

    def consumer_groups(self) -> dict[str, list[str]]:
        """Each group of the run and the topics it reads, to start at their end: the bench's payments
        only, not the backlog a development database's topics hold."""
        ledger, worker, notifier = (self.groups[k] for k in ("LEDGER_GROUP_ID", "STK_WORKER_GROUP_ID",
                                                              "NOTIFIER_GROUP_ID"))
        return {ledger: [t.name for t in ACCESS["ledger"].reads], worker: [PAYMENT_REQUESTED.name],
                f"{worker}-queries": [STK_QUERY_REQUESTED.name], notifier: [PAYMENT_STATUS.name]}

    def start(self, database_url: str, dev_env: dict[str, str]) -> None:
        os.environ.update(self.env)  # instance_ports reads the first instance's port from here
        self.plan = stack_processes(database_url, self.instances)
        # The services log in to Kafka as themselves (kafka_logins), not as the admin the bench reads as,
        # and to PostgreSQL as their own roles, not as the schema's owner.
        shared = {k: v for k, v in os.environ.items() if k not in (*ADMIN_LOGIN, "DATABASE_URL")}
        for p in self.plan:
            with open(self.logs / f"{p.name}.log", "wb") as log:
                self.procs[p.name] = subprocess.Popen(p.argv, cwd=ROOT, env={**shared, **dev_env, **p.env},
                                                      stdout=log, stderr=subprocess.STDOUT,
                                                      preexec_fn=_die_with_parent)

    def wait_ready(self, timeout_s: float = 120) -> None:
        addresses = {p.name: metrics_targets({**os.environ, **p.env})[p.service][0] for p in self.plan
                     if p.service in METRICS_ENDPOINTS}
        urls = {name: f"http://{address}/readyz" for name, address in addresses.items()}
        urls[self.sandbox_name] = f"{self.sandbox_url}/sandbox/health"
        deadline = time.monotonic() + timeout_s
        for name, url in urls.items():
            while not _answers_200(url):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} not ready after {timeout_s:.0f}s ({url}); its log: {self.logs}")
                time.sleep(0.3)

    sandbox_name = property(lambda self: next(p.name for p in self.plan if p.service == "daraja-sandbox"))

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise SystemExit(f"{name} exited with {proc.returncode}; the end of its log "
                                 f"({self.logs / (name + '.log')}):\n  " + "\n  ".join(tail))

    def stop(self, timeout_s: float = 20) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def service_of(self, name: str) -> str:
        return next(p.service for p in self.plan if p.name == name)


def _answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def onboard(database_url: str, key_file: Path, channel_ids: list[str]) -> tuple[str, str]:
    """The run's own channels on the sandbox's demo app, and an API key for them: (key id, key)."""
    pool = await open_pool(role_url(database_url, SERVICE_ROLES["onboarding-api"]), max_size=2)
    try:
        onboarding = Onboarding(pool, public_key_file=public_key_path(key_file))
        for channel_id in channel_ids:
            await onboard_sandbox_channel(onboarding, channel_id, "pipeline bench", "pipeline-bench")
        record, key = await onboarding.issue_api_key({"label": "pipeline bench", "channelIds": channel_ids},
                                                     "pipeline-bench")
        return record["keyId"], key
    finally:
        await pool.close()


async def retire(database_url: str, key_file: Path, channel_ids: list[str], key_id: str) -> None:
    """The run's key revoked and its channels suspended: nothing can use them after the run."""
    pool = await open_pool(role_url(database_url, SERVICE_ROLES["onboarding-api"]), max_size=2)
    try:
        onboarding = Onboarding(pool, public_key_file=public_key_path(key_file))
        await onboarding.revoke_api_key(key_id, "pipeline-bench")
        for channel_id in channel_ids:
            await onboarding.suspend(channel_id, "pipeline-bench")
    finally:
        await pool.close()


# --- CPU -----------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children(root: int) -> list[tuple[int, list[str]]]:
    """(pid, stat fields) of a process's live children (PostgreSQL's backends)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat_fields(int(entry.name))
            except OSError:  # gone meanwhile
                continue
            if fields[1] == str(root):
                children.append((int(entry.name), fields))
    return children


def tree_cpu_seconds(root: int) -> float:
    """A process, its live children and the children it has reaped (cutime, cstime): PostgreSQL's
    postmaster and every backend, including the ones that exited meanwhile: a child live at the first
    reading and reaped by the second is counted first as itself, then in its parent's cutime, so the
    difference is what it spent in between."""
    total = sum(int(v) for v in _stat_fields(root)[11:15])
    total += sum(int(child[11]) + int(child[12]) for _, child in _children(root))
    return total / os.sysconf("SC_CLK_TCK")


def tree_context_switches(root: int) -> tuple[int, int]:
    """A process's and its live children's context switches (PostgreSQL's postmaster and backends)."""
    voluntary, involuntary = context_switches(root)
    for pid, _ in _children(root):
        try:
            child = context_switches(pid)
        except OSError:  # gone meanwhile
            continue
        voluntary, involuntary = voluntary + child[0], involuntary + child[1]
    return voluntary, involuntary


def infra_pids(database_url: str) -> dict[str, int]:
    """Kafka's and the schema registry's JVMs (their pid files, infra/*.sh) and PostgreSQL's
    postmaster: the parent of a backend of ours."""
    pids = {}
    for name, pid_file in (("kafka", Path(os.environ.get("KAFKA_DIR", ROOT / ".local/kafka")) / "kafka.pid"),
                           ("schema-registry", ROOT / ".local/registry/registry.pid")):
        try:
            pids[name] = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            print(f"  ({name}: no pid file at {pid_file}; its CPU is left out)")
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None, "a function's one row"
        # Read while connected: the backend exits with the connection, and its /proc entry with it.
        pids["postgresql"] = int(_stat_fields(row[0])[1])
    return pids


T = TypeVar("T")


class CpuMeter:
    """CPU seconds of every process of the run, read together."""

    def __init__(self, stack: Stack, infra: dict[str, int]):
        self.stack, self.infra = stack, infra

    def read(self) -> dict[str, float]:
        return self._each(cpu_seconds, tree_cpu_seconds)

    def switches(self) -> dict[str, tuple[int, int]]:
        """(voluntary, involuntary) context switches of the same processes' live threads (PostgreSQL:
        the postmaster and its live backends; a backend that exited meanwhile is not counted)."""
        return self._each(context_switches, tree_context_switches)

    def _each(self, of_process: Callable[[int], T], of_tree: Callable[[int], T]) -> dict[str, T]:
        """A figure of every process of the run; PostgreSQL's is of the postmaster and its backends."""
        figures = {name: of_process(proc.pid) for name, proc in self.stack.procs.items()}
        for name, pid in self.infra.items():
            try:
                figures[name] = of_tree(pid) if name == "postgresql" else of_process(pid)
            except OSError:
                pass  # stopped meanwhile: left out rather than counted as zero
        figures["bench driver"] = of_process(os.getpid())
        return figures


# --- status events -------------------------------------------------------------------------------

class StatusReader:
    """Reads mpesa.payment.status.v1 from its end on a thread of its own, as an upstream would, and
    notes when each of the run's payments was first seen Pending and final (wall clock, epoch seconds)."""

    def __init__(self, bootstrap: str, codec, run: str, channel_ids: list[str]):
        self.codec, self.keys = codec, frozenset(c.encode() for c in channel_ids)
        self.pending_at: dict[str, float] = {}
        self.final: dict[str, tuple[str, float]] = {}
        self.why: dict[str, str] = {}  # of a final state other than Settled: its result code and reason
        self.undecodable = 0
        self._consumer = Consumer(client_config({
            "bootstrap.servers": bootstrap, "group.id": f"pipeline-bench-reader-{run}",
            "enable.auto.commit": False, "fetch.wait.max.ms": 20}))
        self._consumer.assign([TopicPartition(PAYMENT_STATUS.name, p, offset)
                               for p, offset in end_offsets(bootstrap, PAYMENT_STATUS.name).items()])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="status-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            messages = take(self._consumer, 500, 0.1)  # consume(500, 0.1) held each event back up to 0.1 s
            seen_at = time.time()  # when they were handed over, not after the decoding of the others
            for msg in messages:
                value = msg.value()
                if msg.error() is None and msg.key() in self.keys and value is not None:
                    self._note(value, seen_at)

    def _note(self, value: bytes, seen_at: float) -> None:
        try:
            _, event = self.codec.decode(value)
        except DecodeError:
            self.undecodable += 1
            return
        payment_id, state = event["payment_id"], event["status"]
        if state == "Pending":
            self.pending_at.setdefault(payment_id, seen_at)
        elif (state == "Settled" or state in OTHER_FINAL) and payment_id not in self.final:
            self.final[payment_id] = (state, seen_at)
            if state != "Settled":
                self.why[payment_id] = f"{state} {event['result_code']}: {event['reason']}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


# --- the load ------------------------------------------------------------------------------------

def scenario_phones(mix: dict[str, float]) -> list[str]:
    """100 phones, one per percent: the sandbox's selector phone of each scenario of the mix, the rest
    the default (success)."""
    selector = {name: s for s, name in SELECTORS.items()}
    phones = []
    for name, percent in mix.items():
        phones += [f"{SELECTOR_PHONE_PREFIX}{selector[name]:04d}"] * round(percent)
    return (phones + [PHONE] * 100)[:100]


class Offer:
    """The payments of one phase: each one's scheduled time, answer and payment id, by index. Its
    AccountReference is the phase's tag and the index, which is how the sandbox's push log names it."""

    def __init__(self, tag: str, ingress_port: int, channel_ids: list[str], api_key: str, phones: list[str]):
        self.tag = tag
        self.scheduled_at: list[float] = []  # epoch seconds
        self.payment_ids: list[str | None] = []
        self.statuses: Counter[int] = Counter()
        self.index_of: dict[str, int] = {}
        self.send_lag_max_s = 0.0
        self._phones, self._channels = phones, channel_ids
        self._head = (f"POST /api/payments HTTP/1.1\r\nHost: 127.0.0.1:{ingress_port}\r\n"
                      f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n").encode()

    def request(self, index: int) -> bytes:
        channel = self._channels[index % len(self._channels)]
        phone = self._phones[index * 37 % 100]  # 37 is prime to 100: a mix's scenarios spread, not in runs
        body = (f'{{"channelId":"{channel}","amount":10,"phone":"{phone}",'
                f'"accountReference":"{self.tag}{index}","description":"bench"}}').encode()
        return (self._head + b"Content-Length: " + str(len(body)).encode() + b"\r\nIdempotency-Key: "
                + f"{self.tag}{index}-{uuid.uuid4().hex[:8]}".encode() + b"\r\n\r\n" + body)

    def answered(self, index: int, status: int, body: bytes) -> None:
        self.statuses[status] += 1
        if status == 202:
            # The ingress answers {"paymentId": "<uuid>", ...}: sliced, not parsed (the driver stays lean).
            at = body.find(b'"paymentId": "') + 14
            payment_id = body[at:at + 36].decode() if at >= 14 else None
            self.payment_ids[index] = payment_id
            if payment_id:
                self.index_of[payment_id] = index

    @property
    def offered(self) -> int:
        return len(self.scheduled_at)

    def accepted_ids(self) -> list[str]:
        return [p for p in self.payment_ids if p]


async def offer(o: Offer, port: int, rate: float, duration_s: float) -> None:
    """Sends round(rate × duration_s) requests, the i-th at start + i / rate, whatever the answers."""
    idle: list[Connection] = []
    opened: list[Connection] = []
    index_on: dict[Connection, int] = {}

    def on_answer(conn: Connection, status: int, body: bytes) -> None:
        index = index_on.pop(conn, None)
        if index is None:  # closed below, unanswered: counted already
            return
        o.answered(index, status, body)
        if status != CONNECTION_LOST:
            idle.append(conn)

    wall_offset = time.time() - time.perf_counter()
    started = time.perf_counter()
    for i in range(round(rate * duration_s)):
        scheduled = started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        o.send_lag_max_s = max(o.send_lag_max_s, -delay)
        o.scheduled_at.append(scheduled + wall_offset)
        o.payment_ids.append(None)
        if not idle and len(opened) < CONNECTIONS_MAX:  # all busy: another one, rather than delay the schedule
            try:
                opened.append(await Connection.open(port, on_answer))
                idle.append(opened[-1])
            except OSError:
                pass
        if not idle:
            o.statuses[DRIVER_REFUSED] += 1
            continue
        conn = idle.pop()
        index_on[conn] = i
        conn.send(o.request(i), scheduled)
    deadline = time.monotonic() + 30
    while index_on and time.monotonic() < deadline:  # the last answers
        await asyncio.sleep(0.05)
    if index_on:
        o.statuses[UNANSWERED] += len(index_on)
        index_on.clear()
    for conn in opened:
        conn.close()


# --- one phase: offer, drain, measure ------------------------------------------------------------

def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)

    def at(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 1)

    return {"n": len(ordered), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 1)}


def by_second(pairs: list[tuple[float, float]], origin: float) -> list[dict]:
    """(when, latency) pairs as one row of percentiles per second since `origin`: a stall shows as
    the seconds whose p99 stands out, where one p99 over the whole run cannot say when or how often."""
    seconds: dict[int, list[float]] = {}
    for when, latency in pairs:
        seconds.setdefault(max(int(when - origin), 0), []).append(latency)
    return [{"second": k, **percentiles(v)} for k, v in sorted(seconds.items())]


def push_log(sandbox_url: str, admin_token: str, o: Offer) -> tuple[dict[int, float], float | None, int]:
    """From the sandbox's push log: when it started sending each payment's first callback (by index),
    the pushes per second it received, and how many payments it accepted a push of more than once."""
    answer = httpx.get(f"{sandbox_url}/sandbox/pushes", timeout=120, headers={"Authorization": f"Bearer {admin_token}"})
    answer.raise_for_status()
    sent: dict[int, float] = {}
    received: list[float] = []
    pushes: Counter[int] = Counter()
    for push in answer.json()["pushes"]:
        reference = str(push.get("AccountReference", ""))
        if not (reference.startswith(o.tag) and reference[len(o.tag):].isdigit()):
            continue
        index = int(reference[len(o.tag):])
        # Only pushes Daraja took count as a push: one refused (spike arrest) reached no payer.
        pushes[index] += push.get("status") == "accepted"
        received.append(datetime.fromisoformat(push["receivedAt"]).timestamp())
        if push.get("callbacksSentAt") and index not in sent:
            sent[index] = datetime.fromisoformat(push["callbacksSentAt"][0]).timestamp()
    span = max(received) - min(received) if len(received) > 1 else 0.0
    return sent, round(len(received) / span, 1) if span else None, sum(1 for n in pushes.values() if n > 1)


async def run_phase(ctx: dict, tag: str, rate: float, duration_s: float, drain_timeout_s: float,
                    progress_s: float = 5.0) -> dict:
    stack, reader, meter = ctx["stack"], ctx["reader"], ctx["meter"]
    o = Offer(tag, stack.ingress_port, ctx["channel_ids"], ctx["api_key"], ctx["phones"])
    host, cpu_before, switches_before, started = HostLoad(), meter.read(), meter.switches(), time.monotonic()
    progress = asyncio.create_task(_report_progress(o, reader, stack, started, progress_s))
    try:
        await offer(o, stack.ingress_port, rate, duration_s)
        accepted = o.accepted_ids()
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and any(p not in reader.final for p in accepted):
            await asyncio.sleep(0.2)
    finally:
        progress.cancel()
    cpu_after, switches_after, elapsed = meter.read(), meter.switches(), time.monotonic() - started
    sent, pushes_per_s, pushed_twice = push_log(stack.sandbox_url, ctx["admin_token"], o)
    # Threads that ended meanwhile take their counts with them: a difference may come out below 0.
    switched = {n: (max(after[0] - switches_before[n][0], 0), max(after[1] - switches_before[n][1], 0))
                for n, after in switches_after.items() if n in switches_before}
    result = measure(o, reader, sent, {n: cpu_after[n] - cpu_before[n] for n in cpu_after if n in cpu_before},
                     stack, rate, duration_s, elapsed, host, switched)
    result.update(pushes_per_s=pushes_per_s, pushed_twice=pushed_twice)
    result["held"] = result["held"] and pushed_twice == 0
    return result


async def _report_progress(o: Offer, reader: StatusReader, stack: Stack, started: float, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        stack.check_alive()
        ids = o.accepted_ids()
        settled = sum(1 for p in ids if reader.final.get(p, ("",))[0] == "Settled")
        errors = sum(n for status, n in o.statuses.items() if status != 202)
        print(f"  {time.monotonic() - started:5.0f}s  offered {o.offered}  accepted {len(ids)}  "
              f"Pending seen {sum(1 for p in ids if p in reader.pending_at)}  Settled seen {settled}  "
              f"errors {errors}", flush=True)


def measure(o: Offer, reader: StatusReader, sent: dict[int, float], cpu: dict[str, float], stack: Stack,
            rate: float, duration_s: float, elapsed_s: float, host: HostLoad,
            switches: dict[str, tuple[int, int]]) -> dict:
    accepted = o.accepted_ids()
    to_pending = [reader.pending_at[p] - o.scheduled_at[o.index_of[p]] for p in accepted if p in reader.pending_at]
    finals = {p: reader.final[p] for p in accepted if p in reader.final}
    settled_at = sorted(at for state, at in finals.values() if state == "Settled")
    settled_pairs = [(sent[o.index_of[p]], reader.final[p][1] - sent[o.index_of[p]]) for p in accepted
                     if finals.get(p, ("",))[0] == "Settled" and o.index_of[p] in sent]
    to_settled = [latency for _, latency in settled_pairs]
    origin = o.scheduled_at[0] if o.scheduled_at else 0.0
    other = Counter(state for state, _ in finals.values() if state != "Settled")
    span = settled_at[-1] - settled_at[0] if len(settled_at) > 1 else 0.0
    per_payment = {name: round(seconds * 1000 / len(accepted), 3) for name, seconds in cpu.items()} if accepted else {}
    own = [n for n in per_payment if n in stack.procs and stack.service_of(n) in OWN_SERVICES]
    result = {
        "rate": rate, "duration_s": duration_s, "offered": o.offered,
        "offered_per_s": round(o.offered / duration_s, 1), "send_lag_max_ms": round(o.send_lag_max_s * 1000, 1),
        "answers": {ANSWER_NAMES.get(k, str(k)): v for k, v in sorted(o.statuses.items())}, "accepted": len(accepted),
        "refused": o.offered - len(accepted), "pending_seen": len(to_pending), "settled": len(settled_at),
        "other_final": dict(other), "missing": len(accepted) - len(finals),
        "other_final_reasons": dict(Counter(reader.why[p] for p in finals if p in reader.why).most_common(5)),
        "settled_per_s": round(len(settled_at) / span, 1) if span else None,
        "request_to_pending": percentiles(to_pending), "callback_to_settled": percentiles(to_settled),
        "by_second": {  # by the second of the offer the request was scheduled, or the callback sent, in
            "request_to_pending": by_second([(o.scheduled_at[o.index_of[p]], reader.pending_at[p] - o.scheduled_at[
                o.index_of[p]]) for p in accepted if p in reader.pending_at], origin),
            "callback_to_settled": by_second(settled_pairs, origin)},
        "cpu_ms_per_payment": per_payment,
        "cpu_ms_per_payment_by_service": _by_service(per_payment, stack),
        # How often each process slept and was woken, and was preempted, per payment: on a virtual
        # machine where both cost CPU, what the CPU figures follow (docs/cpu-per-payment.md, "Fourth round").
        "switches_per_payment": {name: {"slept": round(v / len(accepted), 2), "preempted": round(i / len(accepted), 2)}
                                 for name, (v, i) in switches.items()} if accepted else {},
        "cpu_ms_per_payment_own": round(sum(per_payment[n] for n in own), 3) if per_payment else None,
        "cpu_ms_per_payment_total": round(sum(v for n, v in per_payment.items() if n != "bench driver"), 3)
        if per_payment else None,
        "measured_s": round(elapsed_s, 1), "undecodable_status_events": reader.undecodable, **host.figures(),
    }
    result["held"] = held(result)
    return result


def _by_service(per_payment: dict[str, float], stack: Stack) -> dict[str, float]:
    totals: dict[str, float] = {}
    for name, ms in per_payment.items():
        service = stack.service_of(name) if name in stack.procs else name
        totals[service] = totals.get(service, 0.0) + ms
    return {name: round(ms, 3) for name, ms in totals.items()}


def held(r: dict) -> bool:
    """Whether the pipeline carried this rate: nothing refused or lost, both p99s within target."""
    pending, settled = r["request_to_pending"]["p99_ms"], r["callback_to_settled"]["p99_ms"]
    return (r["refused"] == 0 and r["missing"] == 0 and pending is not None and settled is not None
            and pending < TARGET_REQUEST_TO_PENDING_P99_MS and settled < TARGET_CALLBACK_TO_SETTLED_P99_MS)


# --- report --------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def print_phase(r: dict, args: argparse.Namespace, idle_cores: dict[str, float]) -> None:
    pending, settled = r["request_to_pending"], r["callback_to_settled"]
    lost_ok = r["refused"] == 0 and r["missing"] == 0
    rate_ok = (r["settled_per_s"] or 0) >= TARGET_SETTLED_PER_S * 0.99 and r["duration_s"] >= 60 and lost_ok
    print(f"\n{r['rate']:.0f}/s offered for {r['duration_s']:.0f} s: {r['offered']} offered "
          f"({r['offered_per_s']}/s, driver at most {r['send_lag_max_ms']} ms late), answers {r['answers']}")
    print(f"  accepted {r['accepted']}, Pending seen {r['pending_seen']}, Settled {r['settled']}, other final "
          f"{r['other_final'] or 0}, missing {r['missing']}, refused {r['refused']}"
          f"{'' if lost_ok else '   (payments refused or lost)'}")
    if r["other_final_reasons"]:
        print(f"  other final states, the commonest reasons: {r['other_final_reasons']}")
    # Within 1%: the first and the last payment's latencies differ a little even when the pipeline keeps up.
    print(f"  {'pushes/s':<19}{r['pushes_per_s']!s:>8}            payments pushed more than once: "
          f"{r['pushed_twice']} (must be 0)")
    print(f"  {'settled/s':<19}{r['settled_per_s']!s:>8}            target ≥ {TARGET_SETTLED_PER_S:.0f}/s (± 1%) for "
          f"60 s, none lost: {verdict(rate_ok)}")
    for name, figures, target in (("request → Pending", pending, TARGET_REQUEST_TO_PENDING_P99_MS),
                                  ("callback → Settled", settled, TARGET_CALLBACK_TO_SETTLED_P99_MS)):
        ok = figures["p99_ms"] is not None and figures["p99_ms"] < target
        print(f"  {name:<19}p50 {figures['p50_ms']!s:>7} ms  p99 {figures['p99_ms']!s:>7} ms  max "
              f"{figures['max_ms']!s:>7} ms  (n {figures['n']})  target p99 < {target:.0f} ms: {verdict(ok)}")
    for name, key, target in (("request → Pending", "request_to_pending", TARGET_REQUEST_TO_PENDING_P99_MS),
                              ("callback → Settled", "callback_to_settled", TARGET_CALLBACK_TO_SETTLED_P99_MS)):
        late = [row for row in r["by_second"][key] if row["p99_ms"] >= target]
        print(f"  {name:<19}seconds with p99 over target: {len(late)} of {len(r['by_second'][key])}"
              + (f" (at {', '.join(str(row['second']) for row in late[:20])}{' ...' if len(late) > 20 else ''})"
                 if late else ""))
    if r["cpu_ms_per_payment"]:
        print(f"  CPU ms per payment (over {r['measured_s']} s, first request to end of drain), cores busy "
              f"when idle, and times per payment its threads slept (then were woken) or were preempted:")
        switched = r.get("switches_per_payment", {})
        for name, ms in sorted(r["cpu_ms_per_payment"].items(), key=lambda kv: -kv[1]):
            counts = switched.get(name)
            print(f"    {name:<22}{ms:8.3f}   idle {idle_cores.get(name, 0):.3f}"
                  + (f"   slept {counts['slept']:6.2f}  preempted {counts['preempted']:6.2f}" if counts else ""))
        own = r["cpu_ms_per_payment_own"]
        print(f"    {'own (' + '+'.join(OWN_SERVICES) + ')':<22}{own:8.3f}   target ≤ {TARGET_OWN_CPU_MS} ms: "
              f"{verdict(own <= TARGET_OWN_CPU_MS)}")
        total = r["cpu_ms_per_payment_total"]
        print(f"    {'total (without bench)':<22}{total:8.3f}   = {total * r['rate'] / 1000:.2f} cores at "
              f"{r['rate']:.0f}/s")
    print(f"  host: {r['host_steal_percent']}% stolen by the hypervisor, CPU pressure {r['host_cpu_pressure']}; "
          f"speed probe {args.host_speed_s} s")


# --- main ----------------------------------------------------------------------------------------

def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in filter(None, text.split(",")):
        name, _, percent = part.partition("=")
        if name not in SELECTORS.values():
            raise argparse.ArgumentTypeError(f"unknown scenario {name!r}; see GET /sandbox/scenarios")
        mix[name] = float(percent)
    if sum(mix.values()) > 100:
        raise argparse.ArgumentTypeError("the percentages add up to more than 100")
    return mix


def step_rates(args: argparse.Namespace) -> Iterable[float]:
    rate = args.step_start
    while rate <= args.step_max:
        yield rate
        rate += args.step_increment


async def bench(args: argparse.Namespace, stack: Stack, cleanup: list[Callable[[], None]]) -> dict:
    cfg = config.load_into(RunSettings, RUN_SETTINGS)
    bootstrap = config.load([config.KAFKA_BOOTSTRAP])["KAFKA_BOOTSTRAP_SERVERS"]
    dev_env, _ = await asyncio.to_thread(prepare, cfg.database_url, cfg.vault_key_file, cfg.audit_anchor_key_file,
                                         cfg.notifier_vault_key_file)  # it runs a loop of its own
    ensure_topics(bootstrap, ALL_TOPICS, config.load([config.TOPIC_PARTITIONS])["KAFKA_TOPIC_PARTITIONS"])
    for group, topics in stack.consumer_groups().items():
        start_group_at_end(bootstrap, group, topics)
    cleanup.append(lambda: _delete_groups(bootstrap, list(stack.consumer_groups())))
    # Every topic is keyed by channel, so one channel's payments share one partition, and so one process of
    # each stage: the load spreads over several channels, as a facilitator's many merchants spread it.
    channel_ids = [f"bench-{stack.run}-{n}" for n in range(args.channels)]
    key_id, api_key = await onboard(cfg.database_url, cfg.vault_key_file, channel_ids)
    cleanup.append(lambda: asyncio.run(retire(cfg.database_url, cfg.vault_key_file, channel_ids, key_id)))
    infra = infra_pids(cfg.database_url)
    stack.start(cfg.database_url, dev_env)
    cleanup.append(stack.stop)
    print(f"started {len(stack.plan)} processes: {', '.join(stack.procs)} (logs in {stack.logs})", flush=True)
    stack.wait_ready()
    admin_token = {**os.environ, **dev_env}[sandbox_settings.ADMIN_TOKEN_ENV]
    httpx.patch(f"{stack.sandbox_url}/sandbox/settings", headers={"Authorization": f"Bearer {admin_token}"},
                json={"latency_ms": args.latency_ms, "callback_delay_ms": args.callback_delay_ms,
                      "subscriber_lock": False}, timeout=10).raise_for_status()
    codec = await open_codec(os.environ.get("SCHEMA_REGISTRY_URL", ""), [PAYMENT_STATUS])
    try:
        reader = StatusReader(bootstrap, codec, stack.run, channel_ids)
        try:
            return await load(args, {"stack": stack, "reader": reader, "meter": CpuMeter(stack, infra),
                                     "channel_ids": channel_ids, "api_key": api_key, "admin_token": admin_token,
                                     "phones": scenario_phones(args.mix)})
        finally:
            reader.close()
    finally:
        await codec.close()


async def load(args: argparse.Namespace, ctx: dict) -> dict:
    """The warm-up, then the one load or the steps."""
    print(f"warm-up: {args.warmup_payments} payments at 25/s (caches, connections, Daraja token; not measured)")
    await run_phase(ctx, "W", 25, args.warmup_payments / 25, args.drain_timeout_s, progress_s=1e9)
    # Measured before the warm-up at the load's rate: after it, PostgreSQL's autovacuum of what it wrote
    # lands in the window (0.16 cores "at rest" in one run).
    idle = await idle_cores(ctx["meter"], args.idle_s)
    if args.warmup_s > 0:
        # A broker just started spends about 14 s of its JVM's CPU compiling in its first minute under
        # load (docs/cpu-per-payment.md, "Fifth round"): a start-up cost, not the steady state.
        rate = args.step_start if args.step else args.rate
        print(f"warm-up: {args.warmup_s:g} s at {rate:g}/s (the JVM's compiler, batch sizes; not measured)",
              flush=True)
        await run_phase(ctx, "WR", rate, args.warmup_s, args.drain_timeout_s, progress_s=1e9)
    results: dict[str, Any] = {"idle_cpu_cores": idle, "phases": []}
    if not args.step:
        print(f"load: {args.rate:.0f}/s for {args.duration_s:.0f} s", flush=True)
        results["phases"].append(await run_phase(ctx, "P", args.rate, args.duration_s, args.drain_timeout_s))
        print_phase(results["phases"][0], args, idle)
        return results
    best = None
    for n, rate in enumerate(step_rates(args), 1):
        print(f"step {n}: {rate:.0f}/s for {args.step_duration_s:.0f} s", flush=True)
        result = await run_phase(ctx, f"S{n}-", rate, args.step_duration_s, args.drain_timeout_s)
        results["phases"].append(result)
        print_phase(result, args, idle)
        if not result["held"]:
            break
        best = rate
    results["highest_rate_held"] = best
    print(f"\nhighest rate held: {'none' if best is None else f'{best:.0f}/s'} (p99 callback → Settled < "
          f"{TARGET_CALLBACK_TO_SETTLED_P99_MS:.0f} ms, p99 request → Pending < {TARGET_REQUEST_TO_PENDING_P99_MS:.0f} "
          f"ms, nothing refused or lost)")
    return results


async def idle_cores(meter: CpuMeter, seconds: float) -> dict[str, float]:
    """Cores each process keeps busy with no payment in flight (polls, timers, the JVM's own work): the
    part of its CPU per payment that shrinks as the rate grows."""
    before, started = meter.read(), time.monotonic()
    await asyncio.sleep(seconds)
    after, elapsed = meter.read(), time.monotonic() - started
    return {name: round((after[name] - before[name]) / elapsed, 3) for name in after if name in before}


def _delete_groups(bootstrap: str, groups: list[str]) -> None:
    admin = AdminClient(client_config({"bootstrap.servers": bootstrap}))
    for future in admin.delete_consumer_groups(groups, request_timeout=15).values():
        try:
            future.result(20)
        except Exception:  # noqa: BLE001 (never joined, or already gone: nothing to tidy)
            pass


def _stop_on_signal(signum: int, _frame: object) -> None:
    print(f"\n{signal.Signals(signum).name}: stopping everything", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def main() -> int:
    args = build_parser().parse_args()
    print("host speed probe (best of three 10-million-step Python loops): ", end="", flush=True)
    args.host_speed_s = host_speed_s()
    print(f"{args.host_speed_s} s", flush=True)
    run = uuid.uuid4().hex[:8]
    logs = Path(tempfile.mkdtemp(prefix=f"pipeline-bench-{run}-"))
    stack = Stack(run, {"stk-worker": args.workers, "webhook-gateway": args.gateways, "ledger": args.ledgers},
                  args.log_level, logs)
    cleanup: list[Callable[[], None]] = []
    signal.signal(signal.SIGTERM, _stop_on_signal)  # `make` interrupted: still clean up
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        results = asyncio.run(bench(args, stack, cleanup))
    finally:
        for step in reversed(cleanup):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (tidy up the rest all the same)
                print(f"cleanup: {type(exc).__name__}: {exc}", file=sys.stderr)
    if args.json:
        config_figures = {k: v for k, v in vars(args).items() if k not in ("json", "host_speed_s")}
        Path(args.json).write_text(json.dumps({
            "started_at": started, "config": config_figures, "logs": str(logs),
            "host": {"cpus": os.cpu_count(), "speed_probe_s": args.host_speed_s, "python": sys.version.split()[0]},
            "targets": {"settled_per_s": TARGET_SETTLED_PER_S, "duration_s": 60,
                        "request_to_pending_p99_ms": TARGET_REQUEST_TO_PENDING_P99_MS,
                        "callback_to_settled_p99_ms": TARGET_CALLBACK_TO_SETTLED_P99_MS,
                        "own_cpu_ms_per_payment": TARGET_OWN_CPU_MS},
            **results}, indent=2))
        print(f"results written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=300.0, help="payments offered per second (default 300)")
    parser.add_argument("--duration-s", type=float, default=60.0, help="seconds of load (default 60)")
    for option, service in (("--workers", "stk-worker"), ("--gateways", "webhook-gateway"), ("--ledgers", "ledger")):
        assert service in SCALABLE
        parser.add_argument(option, type=int, default=1, choices=range(1, 17), metavar="N",
                            help=f"processes of the {service} (default 1)")
    parser.add_argument("--latency-ms", type=int, default=300, help="the sandbox answers each push after this "
                        "(default 300, the issue's Daraja latency)")
    parser.add_argument("--callback-delay-ms", type=int, default=1000,
                        help="push to callback (default 1000: a payer takes longer, but the figures time the "
                             "callback from when it is sent, so a longer delay only lengthens the drain; it "
                             "stays well below LEDGER_QUERY_AFTER_S, so no STK query joins the load)")
    parser.add_argument("--channels", type=int, default=12, choices=range(1, 101), metavar="K",
                        help="channels the payments take turns on (default 12): each channel's events share a "
                             "partition, so a single one would leave every process of a stage but one idle")
    parser.add_argument("--mix", type=parse_mix, default={}, metavar="SCENARIO=PERCENT,...",
                        help="outcomes other than success, e.g. cancelled=5,insufficient_funds=5 (the sandbox's "
                             "scenarios, chosen by phone)")
    parser.add_argument("--drain-timeout-s", type=float, default=60.0,
                        help="after the load, wait this long at most for every payment to be final (default 60)")
    parser.add_argument("--warmup-payments", type=int, default=50, help="offered at 25/s before measuring (default 50)")
    parser.add_argument("--warmup-s", type=non_negative, default=20.0,
                        help="then this long at the load's rate (the first step's with --step), not measured "
                             "(default 20; 0 skips it: on a broker just started, that measures a cold start)")
    parser.add_argument("--idle-s", type=float, default=5.0,
                        help="seconds measuring each process's CPU with no payment in flight (default 5)")
    parser.add_argument("--step", action="store_true", help="raise the rate step by step until it breaks")
    parser.add_argument("--step-start", type=float, default=100.0, help="first step's rate (default 100)")
    parser.add_argument("--step-increment", type=float, default=100.0, help="added at each step (default 100)")
    parser.add_argument("--step-max", type=float, default=2000.0, help="last rate tried (default 2000)")
    parser.add_argument("--step-duration-s", type=float, default=20.0, help="seconds per step (default 20)")
    parser.add_argument("--log-level", default="WARNING", help="the services' LOG_LEVEL (default WARNING: a line "
                        "per payment would be measured too)")
    parser.add_argument("--json", metavar="FILE", help="write every figure here as JSON")
    return parser


if __name__ == "__main__":
    sys.exit(main())
