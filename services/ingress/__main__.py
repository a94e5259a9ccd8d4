"""python -m services.ingress: the payment-request API (default port 8080)."""
from __future__ import annotations

import asyncio

from services.common import config
from services.common.avro import Codec
from services.common.db import open_pool
from services.common.kafka import EventProducer
from services.common.observability import Health, serve
from services.common.runtime import run_service
from services.ingress.app import IngressDeps, create_app

SETTINGS = [
    config.KAFKA_BOOTSTRAP,
    config.DATABASE_URL,
    config.Setting("INGRESS_HOST", str, "127.0.0.1", help="address to listen on"),
    config.Setting("INGRESS_PORT", config.port, 8080, help="port to listen on"),
]


async def main(cfg: dict, stop: asyncio.Event) -> None:
    producer = EventProducer(cfg["KAFKA_BOOTSTRAP_SERVERS"], Codec(), client_id="ingress")
    pool = await open_pool(cfg["DATABASE_URL"], max_size=10)
    runner = await serve(create_app(IngressDeps(producer, pool), Health()), cfg["INGRESS_HOST"], cfg["INGRESS_PORT"])
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        producer.close()
        await pool.close()


if __name__ == "__main__":
    run_service("ingress", SETTINGS, main)
