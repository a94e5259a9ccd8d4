"""python -m services.stk_worker: pushes payment requests to Daraja and runs the ledger's STK queries."""
from __future__ import annotations

import asyncio
import os
from dataclasses import replace
import socket

from services.channels.credentials import CredentialStore
from services.channels.settings import CREDENTIALS_TTL_S, VAULT_KEY_FILE
from services.channels.vault import LocalKeyFileProvider
from services.common import config
from services.common.avro import Codec
from services.common.callback_token import parse_secrets
from services.common.db import open_pool, require_schema
from services.common.kafka import ConsumerLoop, EventProducer, ensure_topics, per_event
from services.common.observability import Health, serve_ops
from services.common.runtime import run_service
from services.common.topics import ACCESS, PAYMENT_REQUESTED, STK_QUERY_REQUESTED
from services.daraja.client import DarajaClient
from services.daraja.settings import SETTINGS as DARAJA_SETTINGS, DarajaSettings
from services.stk_worker.channels import VaultChannels
from services.stk_worker.throttle import ShortcodeThrottle
from services.stk_worker.worker import Pusher, PushSettings, Querier, is_transient

SETTINGS = [
    config.KAFKA_BOOTSTRAP,
    config.database_url("stk_worker"),
    config.TOPIC_PARTITIONS,
    config.METRICS_HOST,
    VAULT_KEY_FILE,
    CREDENTIALS_TTL_S,
    *DARAJA_SETTINGS,
    config.Setting("STK_WORKER_GROUP_ID", str, "stk-worker", help="consumer group (queries use <group>-queries)"),
    config.Setting("STK_WORKER_METRICS_PORT", config.port, 9103, help="port of /metrics and /healthz"),
    config.Setting("CALLBACK_PUBLIC_BASE_URL", config.http_url, "http://127.0.0.1:8081",
                   help="public root of the webhook gateway, as Daraja must call it"),
    config.Setting("WEBHOOK_TOKEN_SECRETS", parse_secrets, secret=True,
                   help="callback URL token secrets, current first (shared with the webhook gateway)"),
    config.Setting("STK_MAX_IN_FLIGHT", config.positive_int, 400, help="Daraja calls in flight at once"),
    config.Setting("STK_RATE_PER_SHORTCODE", config.positive_float, 50.0, help="pushes+queries per second per shortcode"),
    config.Setting("STK_MAX_ATTEMPTS", config.positive_int, 4, help="tries of a push Daraja did not act on"),
    config.Setting("STK_WORKER_STALLED_AFTER_S", config.positive_float, 300.0,
                   help="/healthz fails once a consumer has held one batch this long (retrying it)"),
]
BATCH = 100


async def main(cfg: dict, stop: asyncio.Event) -> None:
    require_schema(cfg["DATABASE_URL"])
    bootstrap = cfg["KAFKA_BOOTSTRAP_SERVERS"]
    ensure_topics(bootstrap, ACCESS["stk-worker"].topics, cfg["KAFKA_TOPIC_PARTITIONS"])  # the ones its ACLs allow
    codec = Codec()
    producer = EventProducer(bootstrap, codec, client_id="stk-worker")
    pool = await open_pool(cfg["DATABASE_URL"], min_size=4, max_size=20, autocommit=True)
    store = CredentialStore(pool, LocalKeyFileProvider.open(cfg["VAULT_KEY_FILE"], create=True),
                            actor=f"stk-worker:{socket.gethostname()}:{os.getpid()}",
                            ttl_s=cfg["CHANNEL_CREDENTIALS_TTL_S"])
    channels = VaultChannels(store)
    # Every call in flight needs its own connection, or it queues and times out as "retryable".
    daraja_settings = DarajaSettings.from_env()
    daraja = DarajaClient.from_settings(replace(daraja_settings, max_connections=max(
        daraja_settings.max_connections, cfg["STK_MAX_IN_FLIGHT"])))
    throttle = ShortcodeThrottle(cfg["STK_RATE_PER_SHORTCODE"], burst=max(int(cfg["STK_RATE_PER_SHORTCODE"]), 1))
    pusher = Pusher(pool, daraja, channels, producer, throttle,
                    PushSettings(cfg["CALLBACK_PUBLIC_BASE_URL"], cfg["WEBHOOK_TOKEN_SECRETS"][0],
                                 max_attempts=cfg["STK_MAX_ATTEMPTS"]))
    querier = Querier(pool, daraja, channels, producer, throttle)
    in_flight_batches = max(cfg["STK_MAX_IN_FLIGHT"] // BATCH, 1)
    loops = [
        ConsumerLoop(bootstrap=bootstrap, group_id=cfg["STK_WORKER_GROUP_ID"], topics=[PAYMENT_REQUESTED],
                     codec=codec, handler=per_event(pusher.handle, is_transient), dead_letters=producer,
                     max_batch=BATCH, max_in_flight=in_flight_batches),
        ConsumerLoop(bootstrap=bootstrap, group_id=f"{cfg['STK_WORKER_GROUP_ID']}-queries",
                     topics=[STK_QUERY_REQUESTED], codec=codec, handler=per_event(querier.handle, is_transient),
                     dead_letters=producer, max_batch=BATCH, max_in_flight=2),
    ]
    health = Health()
    for name, loop in zip(("stk_push_consumer", "stk_query_consumer"), loops):
        health.add_progress(name, loop.stalled_for, cfg["STK_WORKER_STALLED_AFTER_S"])
    runner = await serve_ops(health, cfg["METRICS_HOST"], cfg["STK_WORKER_METRICS_PORT"])
    try:
        await asyncio.gather(*(loop.run(stop) for loop in loops))
    finally:
        await runner.cleanup()
        await daraja.aclose()
        producer.close()
        await pool.close()


if __name__ == "__main__":
    run_service("stk-worker", SETTINGS, main)
