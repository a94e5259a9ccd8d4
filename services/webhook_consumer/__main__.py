"""python -m services.webhook_consumer: the webhook gateway for Daraja callbacks (default port 8081)."""
from __future__ import annotations

import asyncio
import logging
import sys

from services.common import config
from services.common.avro import open_codec
from services.common.kafka import ensure_topics
from services.common.observability import Health, serve, serve_ops
from services.common.runtime import quiet_garbage_collector, run_service
from services.common.topics import ACCESS
from services.webhook_consumer.app import GatewayDeps, create_app, gateway_producer
from services.webhook_consumer.settings import (
    ALLOWED_SOURCES,
    ENVIRONMENT,
    OPEN_TO_ANY_SOURCE,
    SETTINGS,
    GatewaySettings,
    WebhookSettings,
)
from services.webhook_consumer.sources import ANY_SOURCE

log = logging.getLogger("services.webhook_consumer")


async def main(cfg: WebhookSettings, stop: asyncio.Event) -> None:
    try:
        settings = GatewaySettings.from_config(cfg)
    except config.ConfigError as exc:  # a rule across variables: as plain as run_service's own errors
        print(f"webhook-gateway: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.allowed_sources == ANY_SOURCE:
        how = (f"{ALLOWED_SOURCES.env}={OPEN_TO_ANY_SOURCE}" if cfg.webhook_allowed_sources
               else f"{ALLOWED_SOURCES.env} is unset and {ENVIRONMENT.env}={cfg.mpesa_environment}")
        log.warning("callbacks are accepted from any address (%s)", how)
    # Its own topics, as every service creates the ones it uses (callback.rejected has no other writer).
    ensure_topics(cfg.kafka_bootstrap_servers, ACCESS["webhook-gateway"].topics, cfg.kafka_topic_partitions,
                  replication_factor=cfg.kafka_topic_replication_factor, overrides=cfg.kafka_topic_configs)
    codec = await open_codec(cfg.schema_registry_url, ACCESS["webhook-gateway"].writes)
    producer = gateway_producer(cfg.kafka_bootstrap_servers, codec, settings)
    health = Health()
    # Kafka only: the gateway reads no database, and its schemas were registered at start.
    health.add("kafka_producer", producer.ready)
    app = create_app(GatewayDeps(producer), settings, health)
    quiet_garbage_collector()
    runners = [await serve(app, cfg.webhook_host, cfg.webhook_port, reuse_port=cfg.webhook_reuse_port)]
    log.info("webhook gateway on http://%s:%d%s", cfg.webhook_host, cfg.webhook_port,
             " (shared: SO_REUSEPORT)" if cfg.webhook_reuse_port else "")
    if cfg.webhook_metrics_port is not None:  # this process's own, when several share the callback port
        runners.append(await serve_ops(health, cfg.webhook_host, cfg.webhook_metrics_port))
    try:
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()
        producer.close()
        await codec.close()


if __name__ == "__main__":
    run_service("webhook-gateway", SETTINGS, main, settings_type=WebhookSettings)
