"""Fixtures for the notifier: endpoints with sealed secrets written straight to the database, status
events as the ledger publishes them, a real HTTP receiver on 127.0.0.1 that verifies every signature
with the standardwebhooks library as a receiver would, and an in-process notifier."""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.channels.vault import LocalKeyFileProvider
from services.common import config
from services.common.db import open_pool
from services.common.ids import new_id
from services.common.kafka import ConsumedEvent, ConsumerLoop, EventProducer
from services.common.topics import PAYMENT_STATUS
from services.notifier import bootstrap
from services.notifier.bootstrap import Notifier
from services.notifier.events import EVENT_TYPES
from services.notifier.secrets import fingerprint, new_secret, seal_secret
from services.notifier.settings import NOTIFIER_SETTINGS, NotifierConfig
from tests.conftest import database_url_of, free_port
from tests.platform.kafka_helpers import start_group_at_end


@dataclass
class Arrival:
    path: str
    webhook_id: str
    body: dict[str, Any]
    verified: bool

    @property
    def payment_id(self) -> str:
        return self.body["data"]["paymentId"]

    @property
    def state(self) -> str:
        return self.body["data"]["state"]


@dataclass
class Behaviour:
    """How one path answers: `status` (200), after waiting for `gate` if set, or after `sleep_s`."""
    status: int = 200
    gate: asyncio.Event | None = None
    sleep_s: float = 0.0


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1: each path verifies with its own secret(s), answers as told,
    and notes every request as it arrives (before answering)."""
    port: int = field(default_factory=free_port)
    secrets: dict[str, str] = field(default_factory=dict)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    arrivals: list[Arrival] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def at(self, path: str) -> list[Arrival]:
        return [a for a in self.arrivals if a.path == path]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path}", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _receive(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        raw = await request.read()
        try:
            Webhook(self.secrets[path]).verify(raw, dict(request.headers))
            verified = True
        except (WebhookVerificationError, KeyError):
            verified = False
        self.arrivals.append(Arrival(path, request.headers.get("webhook-id", ""), json.loads(raw), verified))
        behaviour = self.behaviours.get(path, Behaviour())
        if behaviour.gate is not None:
            await behaviour.gate.wait()
        if behaviour.sleep_s:
            await asyncio.sleep(behaviour.sleep_s)
        return web.Response(status=behaviour.status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    for behaviour in r.behaviours.values():
        if behaviour.gate is not None:
            behaviour.gate.set()
    await r.stop()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhooks-kek.json"
    LocalKeyFileProvider.open(path, create=True)
    return path


async def add_channel(pool, channel_id: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO channels (channel_id, display_name, shortcode_type, business_shortcode,"
                           " environment) VALUES (%s, 'Duka', 'paybill', '174379', 'sandbox')", (channel_id,))


async def add_endpoint(pool, key_file: Path, channel_id: str, url: str, event_types=EVENT_TYPES,
                       secret: str | None = None, sealed_for: str | None = None) -> tuple[str, str]:
    """An enabled endpoint and its version-1 secret, as the management does it; (endpoint_id, secret).
    `sealed_for`: seal the secret for another endpoint id (a row that fails to open)."""
    endpoint_id = "ep_" + uuid.uuid4().hex[:20]
    secret = secret or new_secret()
    sealed = seal_secret(secret, sealed_for or endpoint_id, 1, LocalKeyFileProvider.open(key_file).public_wrapper())
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO webhook_endpoints (endpoint_id, channel_id, url, event_types, created_by)"
                           " VALUES (%s, %s, %s, %s, 'tests')", (endpoint_id, channel_id, url, list(event_types)))
        await conn.execute("INSERT INTO webhook_secrets (endpoint_id, version, key_id, wrapped_key, nonce, ciphertext,"
                           " fingerprint, created_by) VALUES (%s, 1, %s, %s, %s, %s, %s, 'tests')",
                           (endpoint_id, sealed.key_id, sealed.wrapped_key, sealed.nonce, sealed.ciphertext,
                            fingerprint(secret)))
    return endpoint_id, secret


async def channel_with_endpoint(pool, key_file: Path, receiver: Receiver, name: str, **kwargs) -> tuple[str, str]:
    """A channel `<name>-<random>` with one endpoint at the receiver's path of that name; (channel, endpoint)."""
    channel_id = f"{name}-{uuid.uuid4().hex[:8]}"
    await add_channel(pool, channel_id)
    endpoint_id, secret = await add_endpoint(pool, key_file, channel_id, receiver.url(channel_id), **kwargs)
    receiver.secrets[channel_id] = secret
    return channel_id, endpoint_id


PREVIOUS = {"Pending": "Requested", "Settled": "Pending", "Cancelled": "Pending", "Failed": "Requested",
            "Requested": None, "Review": "Requested"}


def status_event(channel_id: str, payment_id: str, status: str, at: datetime | None = None,
                 event_id: str | None = None) -> dict[str, Any]:
    """A payment_status record as the ledger's outbox publishes it."""
    return {"event_id": event_id or new_id(), "occurred_at": at or datetime.now(timezone.utc),
            "channel_id": channel_id, "payment_id": payment_id, "schema_version": 2, "status": status,
            "previous_status": PREVIOUS[status], "amount": 10, "phone_masked": "*********678",
            "order_reference": "ORDER-1", "checkout_request_id": "ws_CO_1",
            "mpesa_receipt": "SBX0000001" if status == "Settled" else None,
            "transaction_time": None, "result_code": "0" if status == "Settled" else None, "reason": None,
            "metadata": {"order": "1"}, "late_mpesa_receipt": None}


async def publish_payments(producer: EventProducer, channel_id: str, count: int,
                           states: tuple[str, ...] = ("Pending", "Settled")) -> dict[str, list[str]]:
    """`count` payments each going through `states` (in order, a millisecond apart); {payment: event ids}."""
    published: dict[str, list[str]] = {}
    start = datetime.now(timezone.utc)
    for i in range(count):
        payment_id = new_id()
        for j, state in enumerate(states):
            event = status_event(channel_id, payment_id, state, start + timedelta(milliseconds=10 * i + j))
            await producer.publish(PAYMENT_STATUS, event)
            published.setdefault(payment_id, []).append(event["event_id"])
    return published


def notifier_config(infra: dict[str, str], key_file: Path, **overrides: object) -> NotifierConfig:
    """Settings for a test: short leases, polls and back-off, so recoveries come in seconds."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": infra["KAFKA_BOOTSTRAP_SERVERS"],
           "DATABASE_URL": database_url_of(infra, "notifier"), "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
           "NOTIFIER_VAULT_KEY_FILE": str(key_file), "NOTIFIER_GROUP_ID": f"notifier-{uuid.uuid4().hex[:10]}",
           "NOTIFIER_LEASE_S": "3", "NOTIFIER_POLL_INTERVAL_S": "0.1", "NOTIFIER_FIRST_BACKOFF_S": "0.2",
           "NOTIFIER_MAX_BACKOFF_S": "0.5", "NOTIFIER_CONNECT_TIMEOUT_S": "1", "NOTIFIER_READ_TIMEOUT_S": "1",
           "NOTIFIER_ENDPOINT_CACHE_TTL_S": "0.1", "NOTIFIER_METRICS_PORT": str(free_port())}
    env.update({k: str(v) for k, v in overrides.items()})
    return config.load_into(NotifierConfig, NOTIFIER_SETTINGS, env)


@contextlib.asynccontextmanager
async def running_notifier(cfg: NotifierConfig, dead_letters: EventProducer, codec) -> AsyncIterator[Notifier]:
    """The notifier's parts as `python -m services.notifier` runs them, in this process, from the end of
    the status topic (earlier tests' events are not its business)."""
    start_group_at_end(cfg.kafka_bootstrap_servers, cfg.notifier_group_id, [PAYMENT_STATUS.name])
    pool = await open_pool(cfg.database_url, max_size=6, autocommit=True)
    notifier = bootstrap.build(pool, cfg)
    consumer = ConsumerLoop(bootstrap=cfg.kafka_bootstrap_servers, group_id=cfg.notifier_group_id, codec=codec,
                            topics=[PAYMENT_STATUS], handler=notifier.enqueuer.handle_batch,
                            dead_letters=dead_letters, max_batch=500, max_in_flight=1, poll_timeout=0.1)
    stop = asyncio.Event()
    task = asyncio.gather(consumer.run(stop), notifier.run(stop))
    try:
        while not consumer.assigned:  # events published before the group has its partitions wait anyway
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        yield notifier
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await notifier.close()
        await notifier.sender.close()
        await pool.close()


def consumed(event: dict, offset: int) -> ConsumedEvent:
    return ConsumedEvent(PAYMENT_STATUS.name, 0, offset, event["channel_id"].encode(), PAYMENT_STATUS.schema, event)


@contextlib.asynccontextmanager
async def notifier_process(cfg, name: str):
    """A notifier's parts without a consumer: the test hands batches to its enqueuer itself."""
    pool = await open_pool(cfg.database_url, max_size=4, autocommit=True)
    notifier = bootstrap.build(pool, cfg, instance_id=f"{name}-{new_id()}")
    stop = asyncio.Event()
    task = asyncio.ensure_future(notifier.run(stop))
    try:
        yield notifier
    finally:
        stop.set()
        await task
        await notifier.close()
        await notifier.sender.close()
        await pool.close()


async def delivery_rows(pool, event_ids: list[str]) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, event_id, endpoint_id, state, attempts, last_http_status, last_error, leased_by, webhook_id"
            " FROM webhook_deliveries WHERE event_id = ANY(%s) ORDER BY id", (event_ids,))
        names = [c.name for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
