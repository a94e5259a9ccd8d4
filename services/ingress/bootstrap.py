"""Building the ingress's dependencies from its settings; `python -m services.ingress` and the tests share it."""
from __future__ import annotations

from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from services.channels.apikeys import ApiKeyAuthenticator
from services.common import config
from services.common.avro import open_codec
from services.common.kafka import EventProducer
from services.common.topics import ACCESS, PAYMENT_REQUESTED, Topic, parse_upstream_producers
from services.ingress.access import ChannelDirectory
from services.ingress.app import IngressDeps, OwnPublisher
from services.ingress.idempotency import IdempotencyStore
from services.ingress.payments import PaymentIntake
from services.ingress.views import PaymentViews

SETTINGS = [
    config.KAFKA_BOOTSTRAP,
    config.SCHEMA_REGISTRY,
    config.database_url("ingress"),
    config.TOPIC_PARTITIONS, config.TOPIC_REPLICATION_FACTOR, config.TOPIC_CONFIGS,
    config.Setting("INGRESS_HOST", str, "127.0.0.1", help="address to listen on"),
    config.Setting("INGRESS_PORT", config.port, 8080, help="port to listen on"),
    config.Setting("INGRESS_MAX_BODY_BYTES", config.positive_int, 16 * 1024, help="largest request body accepted"),
    config.Setting("INGRESS_AUTH_CACHE_TTL_S", config.positive_float, 5.0,
                   help="seconds an API key's or a channel's status is cached; revocation and suspension "
                        "take effect within it"),
    config.Setting("INGRESS_KAFKA_TIMEOUT_MS", config.positive_int, 5000,
                   help="how long a request waits for Kafka's acknowledgement before answering 503"),
    config.Setting("INGRESS_KAFKA_LINGER_MS", config.whole_number, 5,
                   help="producer batching delay; each request waits for its own acknowledgement"),
    config.Setting("INGRESS_REQUESTED_TOPIC", str, PAYMENT_REQUESTED.name,
                   help="topic of the PaymentRequested events; only a benchmark should change it"),
    config.Setting("INGRESS_DB_POOL_SIZE", config.positive_int, 8, help="PostgreSQL connections"),
    config.Setting("UPSTREAM_PRODUCERS", parse_upstream_producers, {},
                   help="upstream Kafka principals and the channels each may request payments for: "
                        "principal:channel,...;..."),
    config.Setting("INGRESS_UPSTREAM_GROUP_ID", str, "ingress-upstream",
                   help="consumer group of the upstream re-authoriser (its ACLs allow ingress*)"),
]


@dataclass(frozen=True)
class IngressSettings:
    """SETTINGS, read once at start (config.load_into)."""

    kafka_bootstrap_servers: str
    schema_registry_url: str
    database_url: str
    kafka_topic_partitions: int
    kafka_topic_replication_factor: int | None
    kafka_topic_configs: dict[str, dict[str, str]]
    ingress_host: str
    ingress_port: int
    ingress_max_body_bytes: int
    ingress_auth_cache_ttl_s: float
    ingress_kafka_timeout_ms: int
    ingress_kafka_linger_ms: int
    ingress_requested_topic: str
    ingress_db_pool_size: int
    upstream_producers: dict[str, frozenset[str]]
    ingress_upstream_group_id: str

    @property
    def requested_topic(self) -> Topic:
        return Topic(self.ingress_requested_topic, PAYMENT_REQUESTED.schema)


async def open_deps(cfg: IngressSettings, *, producer: OwnPublisher | None = None) -> IngressDeps:
    codec = None
    if producer is None:
        codec = await open_codec(cfg.schema_registry_url, [*ACCESS["ingress"].writes, cfg.requested_topic])
        producer = EventProducer(cfg.kafka_bootstrap_servers, codec, client_id="ingress",
                                 delivery_timeout_ms=cfg.ingress_kafka_timeout_ms,
                                 linger_ms=cfg.ingress_kafka_linger_ms)
    # Autocommit: every statement of the hot path is a transaction of its own, so BEGIN and COMMIT
    # would be two more round trips per batch for nothing.
    pool = AsyncConnectionPool(cfg.database_url, min_size=2, max_size=cfg.ingress_db_pool_size,
                               kwargs={"autocommit": True}, open=False, name="ingress")
    marks_pool = AsyncConnectionPool(cfg.database_url, min_size=1, max_size=1, open=False, name="ingress-marks",
                                     kwargs={"autocommit": True, "options": "-c synchronous_commit=off"})
    await pool.open(wait=True, timeout=30)
    await marks_pool.open(wait=True, timeout=30)
    ttl_s = cfg.ingress_auth_cache_ttl_s
    store = IdempotencyStore(pool, marks_pool)
    topic = cfg.requested_topic
    return IngressDeps(producer=producer, pool=pool, authenticator=ApiKeyAuthenticator(pool, ttl_s=ttl_s),
                       channels=ChannelDirectory(pool, ttl_s=ttl_s), intake=PaymentIntake(store, producer, topic),
                       views=PaymentViews(pool, store), marks_pool=marks_pool, codec=codec)


async def close_deps(deps: IngressDeps, *, close_producer: bool = True) -> None:
    await deps.intake.close()
    if close_producer:
        deps.producer.close()
    await deps.pool.close()
    if deps.marks_pool is not None:
        await deps.marks_pool.close()
    if deps.codec is not None:
        await deps.codec.close()
