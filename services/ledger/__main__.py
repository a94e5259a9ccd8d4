"""python -m services.ledger: applies payment facts in PostgreSQL and publishes status changes."""
from __future__ import annotations

import asyncio
from datetime import timedelta

from services.common.avro import open_codec
from services.common.db import open_pool, require_schema
from services.common.kafka import ConsumerLoop, EventProducer, ensure_topics
from services.common.observability import DatabaseCheck, Health, serve_ops
from services.common.pseudonyms import Pseudonyms
from services.common.runtime import quiet_garbage_collector, run_service
from services.common.topics import ACCESS
from services.ledger import bootstrap
from services.ledger.relay import OutboxRelay
from services.ledger.retention import Retention
from services.ledger.service import payment_of
from services.ledger.settings import SETTINGS, LedgerConfig

__all__ = ["SETTINGS", "main"]


async def main(cfg: LedgerConfig, stop: asyncio.Event) -> None:
    require_schema(cfg.database_url)
    ensure_topics(cfg.kafka_bootstrap_servers, ACCESS["ledger"].topics, cfg.kafka_topic_partitions,
                  replication_factor=cfg.kafka_topic_replication_factor, overrides=cfg.kafka_topic_configs)  # its ACLs'
    codec = await open_codec(cfg.schema_registry_url, ACCESS["ledger"].writes)
    producer = EventProducer(cfg.kafka_bootstrap_servers, codec, client_id="ledger")
    pool = await open_pool(cfg.database_url, max_size=cfg.ledger_max_in_flight + 3)  # + the 3 background loops
    relay = OutboxRelay(pool, producer)
    ledger = bootstrap.build(pool, codec, cfg.ledger_settings(), on_commit=relay.hand_over,
                             pseudonyms=Pseudonyms.from_file(cfg.pseudonym_key_file))
    consumer = ConsumerLoop(bootstrap=cfg.kafka_bootstrap_servers, group_id=cfg.ledger_group_id, codec=codec,
                            topics=list(ACCESS["ledger"].reads),  # the topics its ACLs let it read: all its inputs
                            handler=ledger.consumer.handle_batch, dead_letters=producer,
                            max_in_flight=cfg.ledger_max_in_flight, order_key=payment_of,
                            linger_s=cfg.ledger_batch_linger_ms / 1000)
    retention = Retention(pool, timedelta(days=cfg.ledger_processed_retention_days))
    health = Health()
    health.add("kafka_producer", producer.ready)
    health.add("ledger_consumer", lambda: consumer.ready(cfg.ledger_stalled_after_s))
    health.add("database", DatabaseCheck(pool))
    runner = await serve_ops(health, cfg.metrics_host, cfg.ledger_metrics_port)
    quiet_garbage_collector()
    try:
        await asyncio.gather(consumer.run(stop), relay.run(stop), ledger.reconciler.run(stop), retention.run(stop))
    finally:
        await runner.cleanup()
        producer.close()
        await pool.close()
        await codec.close()


if __name__ == "__main__":
    run_service("ledger", SETTINGS, main, LedgerConfig)
