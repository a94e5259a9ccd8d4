"""python -m services.stk_worker: pushes payment requests to Daraja and runs the ledger's STK queries."""
from __future__ import annotations

import asyncio
import functools

from services.common.avro import open_codec
from services.common.db import require_schema
from services.common.kafka import ConsumerLoop, EventProducer, ensure_topics, per_event
from services.common.observability import DatabaseCheck, Health, serve_ops
from services.common.runtime import quiet_garbage_collector, run_service
from services.common.topics import ACCESS, PAYMENT_REQUESTED, STK_QUERY_REQUESTED
from services.stk_worker.bootstrap import SETTINGS, WorkerSettings, build
from services.stk_worker.errors import is_transient

# STK queries are the reconciler's, after an outage many at once and no one waiting on each: 2 batches
# of 100 in flight, as before, so a backlog drains at the pace the pushes' batches had.
QUERY_BATCH = 100


async def main(settings: WorkerSettings, stop: asyncio.Event) -> None:
    require_schema(settings.database_url)
    bootstrap = settings.kafka_bootstrap_servers
    ensure_topics(bootstrap, ACCESS["stk-worker"].topics, settings.kafka_topic_partitions,  # the ones its ACLs allow
                  replication_factor=settings.kafka_topic_replication_factor, overrides=settings.kafka_topic_configs)
    codec = await open_codec(settings.schema_registry_url, ACCESS["stk-worker"].writes)
    producer = EventProducer(bootstrap, codec, client_id="stk-worker")  # results and dead letters
    worker = await build(settings, publisher=producer, stop=stop)
    batch, in_flight_batches = settings.push_batches()
    loops = [
        ConsumerLoop(bootstrap=bootstrap, group_id=settings.stk_worker_group_id, topics=[PAYMENT_REQUESTED],
                     codec=codec, handler=per_event(worker.pusher.handle, is_transient), dead_letters=producer,
                     max_batch=batch, max_in_flight=in_flight_batches, linger_s=settings.stk_batch_linger_ms / 1000),
        ConsumerLoop(bootstrap=bootstrap, group_id=f"{settings.stk_worker_group_id}-queries",
                     topics=[STK_QUERY_REQUESTED], codec=codec, handler=per_event(worker.querier.handle, is_transient),
                     dead_letters=producer, max_batch=QUERY_BATCH, max_in_flight=2),
    ]
    health = Health()
    health.add("kafka_producer", producer.ready)
    for name, loop in zip(("stk_push_consumer", "stk_query_consumer"), loops, strict=True):
        health.add(name, functools.partial(loop.ready, settings.stk_worker_stalled_after_s))
    if worker.pool is not None:
        health.add("database", DatabaseCheck(worker.pool))
    runner = await serve_ops(health, settings.metrics_host, settings.stk_worker_metrics_port)
    quiet_garbage_collector()
    consumed = asyncio.Event()
    heartbeat = asyncio.create_task(worker.beat_until(consumed))
    try:
        await asyncio.gather(*(loop.run(stop) for loop in loops))
    finally:
        consumed.set()  # the heartbeat outlives the consumers: answers being recorded are not orphaned
        await heartbeat
        await runner.cleanup()
        await worker.aclose()
        producer.close()
        await codec.close()


if __name__ == "__main__":
    run_service("stk-worker", SETTINGS, main, WorkerSettings)
