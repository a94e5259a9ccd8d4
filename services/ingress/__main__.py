"""python -m services.ingress: the payment-request API (default port 8080)."""
from __future__ import annotations

import asyncio

from services.common.db import require_schema
from services.common.kafka import ensure_topics
from services.common.observability import Health, serve
from services.common.runtime import quiet_garbage_collector, run_service
from services.common.topics import ALL_TOPICS, PAYMENT_REQUESTED, Topic
from services.ingress.app import create_app
from services.ingress.bootstrap import SETTINGS, close_deps, open_deps


async def main(cfg: dict, stop: asyncio.Event) -> None:
    require_schema(cfg["DATABASE_URL"])
    topics = [*ALL_TOPICS, Topic(cfg["INGRESS_REQUESTED_TOPIC"], PAYMENT_REQUESTED.schema)]
    ensure_topics(cfg["KAFKA_BOOTSTRAP_SERVERS"], topics, cfg["KAFKA_TOPIC_PARTITIONS"])
    deps = await open_deps(cfg)
    app = create_app(deps, Health(), max_body_bytes=cfg["INGRESS_MAX_BODY_BYTES"])
    runner = await serve(app, cfg["INGRESS_HOST"], cfg["INGRESS_PORT"])
    quiet_garbage_collector()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # stops accepting, lets requests in progress finish
        await close_deps(deps)


if __name__ == "__main__":
    run_service("ingress", SETTINGS, main)
