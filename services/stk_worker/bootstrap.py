"""Building the STK worker from its settings; `python -m services.stk_worker` and the tests share it.
Each dependency is a keyword argument; the production adapter is built only when none is given."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from services.channels.credentials import CredentialStore
from services.channels.settings import CREDENTIALS_TTL_S, VAULT_KEY_FILE
from services.channels.vault import LocalKeyFileProvider
from services.common import config
from services.common.avro import open_codec
from services.common.callback_token import parse_secrets
from services.common.db import open_pool
from services.common.kafka import EventProducer
from services.common.topics import ACCESS
from services.daraja.client import DarajaClient
from services.daraja.settings import SETTINGS as DARAJA_SETTINGS, DarajaSettings
from services.stk_worker.channels import VaultChannels
from services.stk_worker.claims import PostgresClaims
from services.stk_worker.ports import Channels, Claims, Clock, Daraja, Publisher, SystemClock
from services.stk_worker.throttle import ShortcodeThrottle
from services.stk_worker.tokens import SharedTokens
from services.stk_worker.worker import Pusher, PushSettings, Querier

log = logging.getLogger(__name__)

SETTINGS = [
    config.KAFKA_BOOTSTRAP,
    config.SCHEMA_REGISTRY,
    config.database_url("stk_worker"),
    config.TOPIC_PARTITIONS, config.TOPIC_REPLICATION_FACTOR, config.TOPIC_CONFIGS,
    config.METRICS_HOST,
    VAULT_KEY_FILE,
    CREDENTIALS_TTL_S,
    *DARAJA_SETTINGS,
    config.Setting("STK_WORKER_GROUP_ID", str, "stk-worker", help="consumer group (queries use <group>-queries)"),
    config.Setting("STK_WORKER_METRICS_PORT", config.port, 9103, help="port of /metrics, /healthz and /readyz"),
    config.Setting("CALLBACK_PUBLIC_BASE_URL", config.http_url, "http://127.0.0.1:8081",
                   help="public root of the webhook gateway, as Daraja must call it"),
    config.Setting("WEBHOOK_TOKEN_SECRETS", parse_secrets, secret=True,
                   help="callback URL token secrets, current first (shared with the webhook gateway)"),
    config.Setting("STK_MAX_IN_FLIGHT", config.positive_int, 400, help="Daraja calls in flight at once"),
    config.Setting("STK_BATCH_LINGER_MS", config.linger_ms, 100,
                   help="after a payment request, how long the worker waits for more to push together"),
    config.Setting("STK_RATE_PER_SHORTCODE", config.positive_float, 50.0,
                   help="pushes+queries per second per shortcode"),
    config.Setting("STK_MAX_ATTEMPTS", config.positive_int, 4, help="tries of a push Daraja did not act on"),
    config.Setting("STK_WORKER_STALLED_AFTER_S", config.positive_float, 300.0,
                   help="/readyz fails once a consumer has held one batch this long (retrying it)"),
]
# A batch holds its consumer slot until its slowest push is answered (Daraja: about 300 ms). At 100 a
# batch (4 slots) requests waited for a slot about 300 ms at 300/s (bench/pipeline_bench.py, request ->
# push result p50 618 ms, against 407 ms at 20). But a batch is cheaper per push the more it carries: its
# claims, its pushes, their answers and their finishes then go together, and the worker sleeps and wakes
# less often per push, which costs a lot on a shared virtual machine. So a fetch waits
# STK_BATCH_LINGER_MS (100) for more, up to 40 a batch (10 slots at the default STK_MAX_IN_FLIGHT):
# bench/worker_bench.py --payments 3600 --rate 300, in turns, 1,022-1,447 us of CPU per push against
# 1,611-1,981 us at 20 with no wait (docs/cpu-per-payment.md, "Fourth round").
PUSH_BATCH = 40
HEARTBEAT_S = 2.0  # PushSettings.owner_silent_s (15 s) is seven missed beats: a live worker is never judged gone


@dataclass(frozen=True)
class WorkerSettings:
    kafka_bootstrap_servers: str
    schema_registry_url: str
    database_url: str
    kafka_topic_partitions: int
    kafka_topic_replication_factor: int | None
    kafka_topic_configs: dict[str, dict[str, str]]
    metrics_host: str
    vault_key_file: Path
    channel_credentials_ttl_s: float
    daraja_base_url: str
    daraja_connect_timeout_s: float
    daraja_read_timeout_s: float
    daraja_token_refresh_margin_s: float
    daraja_max_connections: int
    stk_worker_group_id: str
    stk_worker_metrics_port: int
    callback_public_base_url: str
    webhook_token_secrets: list[bytes] = field(repr=False)
    stk_max_in_flight: int
    stk_batch_linger_ms: int
    stk_rate_per_shortcode: float
    stk_max_attempts: int
    stk_worker_stalled_after_s: float

    def push_batches(self) -> tuple[int, int]:
        """(events per batch, batches at once) of the push consumer: batches of PUSH_BATCH, as many as
        fit in STK_MAX_IN_FLIGHT, so that the pushes in flight never exceed it (a batch's pushes all
        go out at once); a limit below PUSH_BATCH makes one batch of that size."""
        batch = min(PUSH_BATCH, self.stk_max_in_flight)
        return batch, self.stk_max_in_flight // batch

    def daraja(self) -> DarajaSettings:
        # Every call in flight needs its own connection, or it queues and times out as "retryable".
        return DarajaSettings(self.daraja_base_url, self.daraja_connect_timeout_s, self.daraja_read_timeout_s,
                              self.daraja_token_refresh_margin_s,
                              max(self.daraja_max_connections, self.stk_max_in_flight))


@dataclass
class Worker:
    pusher: Pusher
    querier: Querier
    claims: Claims
    publisher: Publisher
    closers: list[Callable[[], Awaitable[None]]]
    pool: AsyncConnectionPool | None = None  # the one build opened (None when claims and channels were given)

    async def beat_until(self, done: asyncio.Event, interval_s: float = HEARTBEAT_S) -> None:
        """Keeps this process's heartbeat going until `done`: set it only after the consumers
        finished, so that answers still being recorded at a stop are not judged orphaned."""
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), interval_s)
            except TimeoutError:
                pass
            try:
                await self.claims.beat()
            except Exception as exc:  # the database is down: the next beat tries again
                log.warning("heartbeat failed: %s: %s", type(exc).__name__, exc)

    async def aclose(self) -> None:
        for close in reversed(self.closers):
            await close()


def instance_name() -> str:
    """Unique to this process's life: a restarted worker on the same host and pid is another owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def build(settings: WorkerSettings, *, claims: Claims | None = None, daraja: Daraja | None = None,
                publisher: Publisher | None = None, channels: Channels | None = None,
                throttle: ShortcodeThrottle | None = None, clock: Clock | None = None,
                stop: asyncio.Event | None = None, push_settings: PushSettings | None = None) -> Worker:
    """The worker's Pusher and Querier. `stop` interrupts waits (throttle, back-off) of pushes not
    yet sent. The claims' first heartbeat is written here, before anything can be claimed."""
    closers: list[Callable[[], Awaitable[None]]] = []
    owner = instance_name()
    pool = None
    shared_tokens = None
    if claims is None or channels is None:
        pool = await open_pool(settings.database_url, min_size=4, max_size=20, autocommit=True)
        closers.append(pool.close)
        claims = claims or PostgresClaims(pool, owner)
        vault = LocalKeyFileProvider.open(settings.vault_key_file, create=True)
        if channels is None:
            store = CredentialStore(pool, vault, actor=f"stk-worker:{owner}", ttl_s=settings.channel_credentials_ttl_s)
            channels = VaultChannels(store)
        shared_tokens = SharedTokens(pool, vault)  # one token per app for every worker process
    if daraja is None:
        client = DarajaClient.from_settings(settings.daraja(), shared_tokens=shared_tokens)
        closers.append(client.aclose)
        daraja = client
    if publisher is None:
        codec = await open_codec(settings.schema_registry_url, ACCESS["stk-worker"].writes)
        producer = EventProducer(settings.kafka_bootstrap_servers, codec, client_id="stk-worker")

        async def close_producer() -> None:
            producer.close()
            await codec.close()
        closers.append(close_producer)
        publisher = producer
    rate = settings.stk_rate_per_shortcode
    throttle = throttle or ShortcodeThrottle(rate, burst=max(int(rate), 1),
                                             clock=(clock or SystemClock()).monotonic)
    push_settings = push_settings or PushSettings(settings.callback_public_base_url,
                                                  settings.webhook_token_secrets[0],
                                                  max_attempts=settings.stk_max_attempts)
    await claims.beat()
    return Worker(
        pusher=Pusher(claims, daraja, channels, publisher, throttle, push_settings, clock=clock, stop=stop),
        querier=Querier(claims, daraja, channels, publisher, throttle, clock=clock, stop=stop),
        claims=claims, publisher=publisher, closers=closers, pool=pool)
