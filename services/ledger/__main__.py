"""python -m services.ledger: applies payment facts in PostgreSQL and publishes status changes."""
from __future__ import annotations

import asyncio

from services.common import config
from services.common.avro import Codec
from services.common.db import migrate, open_pool
from services.common.kafka import ConsumerLoop, EventProducer, ensure_topics
from services.common.observability import Health, serve_ops
from services.common.runtime import run_service
from services.common.topics import ALL_TOPICS, PAYMENT_REQUESTED
from services.ledger.service import Ledger

SETTINGS = [
    config.KAFKA_BOOTSTRAP,
    config.DATABASE_URL,
    config.TOPIC_PARTITIONS,
    config.METRICS_HOST,
    config.Setting("LEDGER_GROUP_ID", str, "ledger", help="Kafka consumer group"),
    config.Setting("LEDGER_METRICS_PORT", config.port, 9102, help="port of /metrics and /healthz"),
]


async def main(cfg: dict, stop: asyncio.Event) -> None:
    migrate(cfg["DATABASE_URL"])
    ensure_topics(cfg["KAFKA_BOOTSTRAP_SERVERS"], ALL_TOPICS, cfg["KAFKA_TOPIC_PARTITIONS"])
    codec = Codec()
    producer = EventProducer(cfg["KAFKA_BOOTSTRAP_SERVERS"], codec, client_id="ledger")
    pool = await open_pool(cfg["DATABASE_URL"], max_size=4)
    loop = ConsumerLoop(bootstrap=cfg["KAFKA_BOOTSTRAP_SERVERS"], group_id=cfg["LEDGER_GROUP_ID"],
                        topics=[PAYMENT_REQUESTED], codec=codec, handler=Ledger(pool).handle_batch,
                        dead_letters=producer)
    health = Health()
    health.add("kafka_consumer_assigned", lambda: not stop.is_set())
    runner = await serve_ops(health, cfg["METRICS_HOST"], cfg["LEDGER_METRICS_PORT"])
    try:
        await loop.run(stop)
    finally:
        await runner.cleanup()
        producer.close()
        await pool.close()


if __name__ == "__main__":
    run_service("ledger", SETTINGS, main)
