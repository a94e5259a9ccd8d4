"""python -m services.ingress: the payment-request API (default port 8080), and the re-authoriser of
payment requests that upstream services produce to Kafka themselves (services/ingress/upstream.py)."""
from __future__ import annotations

import asyncio

from services.common.avro import open_codec
from services.common.db import require_schema
from services.common.kafka import ConsumerLoop, ensure_topics, per_event
from services.common.observability import DatabaseCheck, Health, serve
from services.common.runtime import quiet_garbage_collector, run_service
from services.common.topics import ACCESS
from services.ingress.app import create_app
from services.ingress.bootstrap import SETTINGS, IngressSettings, close_deps, open_deps
from services.ingress.upstream import UpstreamReauthoriser, is_transient

# As the ledger's default: a batch held a minute is a dependency down, not a slow one.
UPSTREAM_STALLED_AFTER_S = 60.0


async def main(cfg: IngressSettings, stop: asyncio.Event) -> None:
    require_schema(cfg.database_url)
    deps = await open_deps(cfg)
    upstream = UpstreamReauthoriser(cfg.upstream_producers, deps.producer)
    # The ones its ACLs allow (a benchmark's own requested topic needs a principal that may create it).
    topics = {*ACCESS["ingress"].topics, *upstream.topics, cfg.requested_topic}
    ensure_topics(cfg.kafka_bootstrap_servers, topics, cfg.kafka_topic_partitions,
                  replication_factor=cfg.kafka_topic_replication_factor, overrides=cfg.kafka_topic_configs)
    health = Health()
    health.add("kafka_producer", deps.producer.ready)
    health.add("database", DatabaseCheck(deps.pool))
    upstream_consumer = None
    if upstream.topics:
        # Upstream producers frame their messages as they like; the codec reads both framings.
        codec = deps.codec or await open_codec(cfg.schema_registry_url, ())
        upstream_consumer = ConsumerLoop(
            bootstrap=cfg.kafka_bootstrap_servers, group_id=cfg.ingress_upstream_group_id, topics=upstream.topics,
            codec=codec, handler=per_event(upstream.handle, is_transient), dead_letters=deps.producer, max_batch=100)
        health.add("upstream_consumer", lambda: upstream_consumer.ready(UPSTREAM_STALLED_AFTER_S))
    app = create_app(deps, health, max_body_bytes=cfg.ingress_max_body_bytes)
    runner = await serve(app, cfg.ingress_host, cfg.ingress_port)
    quiet_garbage_collector()
    try:
        if upstream_consumer is not None:
            await upstream_consumer.run(stop)
        await stop.wait()
    finally:
        await runner.cleanup()  # stops accepting, lets requests in progress finish
        await close_deps(deps)


if __name__ == "__main__":
    run_service("ingress", SETTINGS, main, settings_type=IngressSettings)
