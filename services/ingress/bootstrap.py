"""Building the ingress's dependencies from its settings; `python -m services.ingress` and the tests share it."""
from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from services.channels.apikeys import ApiKeyAuthenticator
from services.common import config
from services.common.avro import Codec
from services.common.kafka import EventProducer
from services.common.topics import PAYMENT_REQUESTED, Topic
from services.ingress.access import ChannelDirectory
from services.ingress.app import IngressDeps, OwnPublisher
from services.ingress.idempotency import IdempotencyStore
from services.ingress.payments import PaymentIntake
from services.ingress.views import PaymentViews

SETTINGS = [
    config.KAFKA_BOOTSTRAP,
    config.database_url("ingress"),
    config.TOPIC_PARTITIONS,
    config.Setting("INGRESS_HOST", str, "127.0.0.1", help="address to listen on"),
    config.Setting("INGRESS_PORT", config.port, 8080, help="port to listen on"),
    config.Setting("INGRESS_MAX_BODY_BYTES", config.positive_int, 16 * 1024, help="largest request body accepted"),
    config.Setting("INGRESS_AUTH_CACHE_TTL_S", config.positive_float, 5.0,
                   help="seconds an API key's or a channel's status is cached; revocation and suspension "
                        "take effect within it"),
    config.Setting("INGRESS_KAFKA_TIMEOUT_MS", config.positive_int, 5000,
                   help="how long a request waits for Kafka's acknowledgement before answering 503"),
    config.Setting("INGRESS_KAFKA_LINGER_MS", config.whole_number, 1,
                   help="producer batching delay; each request waits for its own acknowledgement"),
    config.Setting("INGRESS_REQUESTED_TOPIC", str, PAYMENT_REQUESTED.name,
                   help="topic of the PaymentRequested events; only a benchmark should change it"),
    config.Setting("INGRESS_DB_POOL_SIZE", config.positive_int, 8, help="PostgreSQL connections"),
]


async def open_deps(cfg: dict[str, Any], *, producer: OwnPublisher | None = None) -> IngressDeps:
    producer = producer or EventProducer(cfg["KAFKA_BOOTSTRAP_SERVERS"], Codec(), client_id="ingress",
                                         delivery_timeout_ms=cfg["INGRESS_KAFKA_TIMEOUT_MS"],
                                         linger_ms=cfg["INGRESS_KAFKA_LINGER_MS"])
    # Autocommit: every statement of the hot path is a transaction of its own, so BEGIN and COMMIT
    # would be two more round trips per batch for nothing.
    pool = AsyncConnectionPool(cfg["DATABASE_URL"], min_size=2, max_size=cfg["INGRESS_DB_POOL_SIZE"],
                               kwargs={"autocommit": True}, open=False, name="ingress")
    marks_pool = AsyncConnectionPool(cfg["DATABASE_URL"], min_size=1, max_size=1, open=False, name="ingress-marks",
                                     kwargs={"autocommit": True, "options": "-c synchronous_commit=off"})
    await pool.open(wait=True, timeout=30)
    await marks_pool.open(wait=True, timeout=30)
    ttl_s = cfg["INGRESS_AUTH_CACHE_TTL_S"]
    store = IdempotencyStore(pool, marks_pool)
    topic = Topic(cfg["INGRESS_REQUESTED_TOPIC"], PAYMENT_REQUESTED.schema)
    return IngressDeps(producer=producer, pool=pool, authenticator=ApiKeyAuthenticator(pool, ttl_s=ttl_s),
                       channels=ChannelDirectory(pool, ttl_s=ttl_s), intake=PaymentIntake(store, producer, topic),
                       views=PaymentViews(pool, store), marks_pool=marks_pool)


async def close_deps(deps: IngressDeps, *, close_producer: bool = True) -> None:
    await deps.intake.close()
    if close_producer:
        deps.producer.close()
    await deps.pool.close()
    if deps.marks_pool is not None:
        await deps.marks_pool.close()
