"""python -m services.ledger: applies payment facts in PostgreSQL and publishes status changes."""
from __future__ import annotations

import asyncio
from datetime import timedelta

from services.common import config
from services.common.avro import Codec
from services.common.db import open_pool, require_schema
from services.common.kafka import ConsumerLoop, EventProducer, ensure_topics
from services.common.observability import Health, serve_ops
from services.common.runtime import quiet_garbage_collector, run_service
from services.common.topics import ACCESS, CALLBACK_RAW, PAYMENT_REQUESTED, STK_PUSH_RESULT, STK_QUERY_RESULT
from services.ledger.reconciler import Reconciler
from services.ledger.relay import OutboxRelay
from services.ledger.retention import Retention
from services.ledger.service import OVERLAP_FROM, Ledger, LedgerSettings

SETTINGS = [
    config.KAFKA_BOOTSTRAP,
    config.database_url("ledger"),
    config.TOPIC_PARTITIONS,
    config.METRICS_HOST,
    config.Setting("LEDGER_GROUP_ID", str, "ledger", help="Kafka consumer group"),
    config.Setting("LEDGER_METRICS_PORT", config.port, 9102, help="port of /metrics and /healthz"),
    config.Setting("LEDGER_MAX_IN_FLIGHT", config.positive_int, 2,
                   help="batches applied at once while behind (per-payment locks keep them apart)"),
    config.Setting("LEDGER_QUERY_AFTER_S", config.positive_float, 90.0, help="Pending this long: start STK queries"),
    config.Setting("LEDGER_REVIEW_AFTER_S", config.positive_float, 900.0, help="no final answer by then: Review"),
    config.Setting("LEDGER_STALLED_AFTER_S", config.positive_float, 60.0,
                   help="/healthz fails once the consumer has held one batch this long (retrying it)"),
    config.Setting("LEDGER_CALLBACK_TTL_AFTER_FINAL_S", config.positive_float, 86400.0,
                   help="callbacks for a payment final longer than this are refused (its URL has expired)"),
    config.Setting("LEDGER_CHANNEL_CACHE_TTL_S", config.positive_float, 5.0,
                   help="how long a channel's confirm-by-query setting is cached"),
    config.Setting("LEDGER_PROCESSED_RETENTION_DAYS", config.positive_float, 30.0,
                   help="processed-event ids kept this long to drop redeliveries; above the topics' retention"),
]


async def main(cfg: dict, stop: asyncio.Event) -> None:
    require_schema(cfg["DATABASE_URL"])
    bootstrap = cfg["KAFKA_BOOTSTRAP_SERVERS"]
    ensure_topics(bootstrap, ACCESS["ledger"].topics, cfg["KAFKA_TOPIC_PARTITIONS"])  # the ones its ACLs allow
    codec = Codec()
    settings = LedgerSettings(first_query_after=timedelta(seconds=cfg["LEDGER_QUERY_AFTER_S"]),
                              review_after=timedelta(seconds=cfg["LEDGER_REVIEW_AFTER_S"]),
                              callback_ttl_after_final=timedelta(seconds=cfg["LEDGER_CALLBACK_TTL_AFTER_FINAL_S"]),
                              channel_cache_ttl_s=cfg["LEDGER_CHANNEL_CACHE_TTL_S"])
    producer = EventProducer(bootstrap, codec, client_id="ledger")
    pool = await open_pool(cfg["DATABASE_URL"], max_size=cfg["LEDGER_MAX_IN_FLIGHT"] + 3)  # + the 3 background loops
    relay = OutboxRelay(pool, producer)
    ledger = Ledger(pool, codec, settings, on_commit=relay.hand_over)
    consumer = ConsumerLoop(bootstrap=bootstrap, group_id=cfg["LEDGER_GROUP_ID"], codec=codec,
                            topics=[PAYMENT_REQUESTED, STK_PUSH_RESULT, CALLBACK_RAW, STK_QUERY_RESULT],
                            handler=ledger.handle_batch, dead_letters=producer,
                            max_in_flight=cfg["LEDGER_MAX_IN_FLIGHT"], overlap_from=OVERLAP_FROM)
    reconciler = Reconciler(pool, codec, settings, on_commit=relay.hand_over)
    retention = Retention(pool, timedelta(days=cfg["LEDGER_PROCESSED_RETENTION_DAYS"]))
    health = Health()
    health.add_progress("ledger_consumer", consumer.stalled_for, cfg["LEDGER_STALLED_AFTER_S"])
    runner = await serve_ops(health, cfg["METRICS_HOST"], cfg["LEDGER_METRICS_PORT"])
    quiet_garbage_collector()
    try:
        await asyncio.gather(consumer.run(stop), relay.run(stop), reconciler.run(stop), retention.run(stop))
    finally:
        await runner.cleanup()
        producer.close()
        await pool.close()


if __name__ == "__main__":
    run_service("ledger", SETTINGS, main)
