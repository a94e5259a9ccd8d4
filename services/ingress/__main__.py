"""python -m services.ingress: the payment-request API (default port 8080)."""
from __future__ import annotations

import asyncio
import gc

from services.common.db import migrate
from services.common.kafka import ensure_topics
from services.common.observability import Health, serve
from services.common.runtime import run_service
from services.common.topics import ALL_TOPICS, PAYMENT_REQUESTED, Topic
from services.ingress.app import create_app
from services.ingress.bootstrap import SETTINGS, close_deps, open_deps


async def main(cfg: dict, stop: asyncio.Event) -> None:
    migrate(cfg["DATABASE_URL"])
    topics = [*ALL_TOPICS, Topic(cfg["INGRESS_REQUESTED_TOPIC"], PAYMENT_REQUESTED.schema)]
    ensure_topics(cfg["KAFKA_BOOTSTRAP_SERVERS"], topics, cfg["KAFKA_TOPIC_PARTITIONS"])
    deps = await open_deps(cfg)
    app = create_app(deps, Health(), max_body_bytes=cfg["INGRESS_MAX_BODY_BYTES"])
    runner = await serve(app, cfg["INGRESS_HOST"], cfg["INGRESS_PORT"])
    tune_garbage_collector()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # stops accepting, lets requests in progress finish
        await close_deps(deps)


def tune_garbage_collector() -> None:
    """Measured with bench/ingress_bench.py: under CPython's defaults a full collection came every
    few thousand requests and stopped the loop for ~30 ms (it scans every object the imports made),
    and young collections ran every ~700 allocations. Objects alive once the service is up are frozen
    (never scanned again) and young collections run less often. Request objects are freed by
    reference counting, so few garbage cycles wait for the collector."""
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


if __name__ == "__main__":
    run_service("ingress", SETTINGS, main)
