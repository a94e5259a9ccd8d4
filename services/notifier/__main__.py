"""python -m services.notifier: delivers payment status changes to the channels' webhook endpoints."""
from __future__ import annotations

import asyncio

from services.channels.vault import LocalKeyFileProvider, VaultError
from services.common.avro import open_codec
from services.common.db import open_pool, require_schema
from services.common.kafka import ConsumerLoop, EventProducer, ensure_topics
from services.common.observability import DatabaseCheck, Health, serve_ops
from services.common.runtime import StartupRefused, quiet_garbage_collector, run_service
from services.common.topics import ACCESS, PAYMENT_STATUS
from services.notifier import bootstrap
from services.notifier.settings import NOTIFIER_SETTINGS, NotifierConfig

__all__ = ["NOTIFIER_SETTINGS", "main"]

BATCH = 500


async def main(cfg: NotifierConfig, stop: asyncio.Event) -> None:
    require_schema(cfg.database_url)
    try:
        # Not made if missing (unlike the STK worker's): a new key opens none of the secrets sealed
        # so far, and every delivery would wait; a wrong path is better said at once.
        key_provider = LocalKeyFileProvider.open(cfg.notifier_vault_key_file)
    except VaultError as exc:
        raise StartupRefused(f"the webhook signing secrets' key: {exc} (NOTIFIER_VAULT_KEY_FILE; "
                             "`mpesa-pipeline vault init --key-file PATH` makes one)") from None
    ensure_topics(cfg.kafka_bootstrap_servers, ACCESS["notifier"].topics, cfg.kafka_topic_partitions,
                  replication_factor=cfg.kafka_topic_replication_factor, overrides=cfg.kafka_topic_configs)  # its ACLs'
    codec = await open_codec(cfg.schema_registry_url, ACCESS["notifier"].writes)
    producer = EventProducer(cfg.kafka_bootstrap_servers, codec, client_id="notifier")  # dead letters only
    # The consumer's batch, the poller, the heartbeat, the writer and the secrets' reads.
    pool = await open_pool(cfg.database_url, max_size=6, autocommit=True)
    notifier = bootstrap.build(pool, cfg, key_provider=key_provider)
    # One batch at a time: two in parallel could commit a payment's Settled before its Pending.
    consumer = ConsumerLoop(bootstrap=cfg.kafka_bootstrap_servers, group_id=cfg.notifier_group_id, codec=codec,
                            topics=[PAYMENT_STATUS], handler=notifier.enqueuer.handle_batch, dead_letters=producer,
                            max_batch=BATCH, max_in_flight=1)
    health = Health()
    health.add("kafka_producer", producer.ready)  # dead letters
    health.add("notifier_consumer", lambda: consumer.ready(cfg.notifier_stalled_after_s))
    health.add("database", DatabaseCheck(pool))
    health.add_progress("notifier_results", notifier.writer.stalled_for, cfg.notifier_stalled_after_s)
    runner = await serve_ops(health, cfg.metrics_host, cfg.notifier_metrics_port)
    quiet_garbage_collector()
    try:
        await asyncio.gather(consumer.run(stop), notifier.run(stop))
    finally:
        await notifier.close()
        await runner.cleanup()
        await notifier.sender.close()
        producer.close()
        await pool.close()
        await codec.close()


if __name__ == "__main__":
    run_service("notifier", NOTIFIER_SETTINGS, main, NotifierConfig)
