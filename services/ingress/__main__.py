"""python -m services.ingress: the payment-request API (default port 8080), and the re-authoriser of
payment requests that upstream services produce to Kafka themselves (services/ingress/upstream.py)."""
from __future__ import annotations

import asyncio

from services.common import config
from services.common.avro import Codec
from services.common.db import require_schema
from services.common.kafka import ConsumerLoop, ensure_topics, per_event
from services.common.observability import Health, serve
from services.common.runtime import quiet_garbage_collector, run_service
from services.common.topics import ACCESS, PAYMENT_REQUESTED, Topic, parse_upstream_producers
from services.ingress.app import create_app
from services.ingress.bootstrap import SETTINGS, close_deps, open_deps
from services.ingress.upstream import UpstreamReauthoriser, is_transient

UPSTREAM_PRODUCERS = config.Setting(
    "UPSTREAM_PRODUCERS", parse_upstream_producers, {},
    help="upstream Kafka principals and the channels each may request payments for: principal:channel,...;...")
UPSTREAM_GROUP_ID = config.Setting("INGRESS_UPSTREAM_GROUP_ID", str, "ingress-upstream",
                                   help="consumer group of the upstream re-authoriser (its ACLs allow ingress*)")


async def main(cfg: dict, stop: asyncio.Event) -> None:
    require_schema(cfg["DATABASE_URL"])
    deps = await open_deps(cfg)
    upstream = UpstreamReauthoriser(cfg["UPSTREAM_PRODUCERS"], deps.producer)
    # The ones its ACLs allow (a benchmark's own requested topic needs a principal that may create it).
    topics = {*ACCESS["ingress"].topics, *upstream.topics, Topic(cfg["INGRESS_REQUESTED_TOPIC"], PAYMENT_REQUESTED.schema)}
    ensure_topics(cfg["KAFKA_BOOTSTRAP_SERVERS"], topics, cfg["KAFKA_TOPIC_PARTITIONS"])
    app = create_app(deps, Health(), max_body_bytes=cfg["INGRESS_MAX_BODY_BYTES"])
    runner = await serve(app, cfg["INGRESS_HOST"], cfg["INGRESS_PORT"])
    quiet_garbage_collector()
    try:
        if upstream.topics:
            await ConsumerLoop(bootstrap=cfg["KAFKA_BOOTSTRAP_SERVERS"], group_id=cfg["INGRESS_UPSTREAM_GROUP_ID"],
                               topics=upstream.topics, codec=Codec(), handler=per_event(upstream.handle, is_transient),
                               dead_letters=deps.producer, max_batch=100).run(stop)
        await stop.wait()
    finally:
        await runner.cleanup()  # stops accepting, lets requests in progress finish
        await close_deps(deps)


if __name__ == "__main__":
    run_service("ingress", [*SETTINGS, UPSTREAM_PRODUCERS, UPSTREAM_GROUP_ID], main)
