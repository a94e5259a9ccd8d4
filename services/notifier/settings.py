"""Settings shared by the notifier and the endpoint management (onboarding API and CLI).

The notifier's own delivery settings are declared beside them (NOTIFIER_SETTINGS, in this file).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common import config
from services.notifier.destinations import IPNetwork, parse_networks

# Default empty: only public addresses. `make run` and the tests allow loopback for their receivers.
WEBHOOK_ALLOWED_NETWORKS = config.Setting(
    "WEBHOOK_ALLOWED_NETWORKS", parse_networks, (),
    help="comma-separated CIDRs webhooks may reach besides public addresses (e.g. 127.0.0.0/8); default none")
NOTIFIER_VAULT_KEY_FILE = config.Setting(
    "NOTIFIER_VAULT_KEY_FILE", Path, Path(".local/vault/webhooks-kek.json"),
    help="the key-encryption key file of webhook signing secrets (private; only the notifier's host)")
WEBHOOK_VAULT_PUBLIC_KEY_FILE = config.Setting(
    "WEBHOOK_VAULT_PUBLIC_KEY_FILE", Path, Path(".local/vault/webhooks-kek.pub.json"),
    help="public half of the notifier's key-encryption key, to seal new webhook signing secrets")

# The notifier process (`python -m services.notifier`): docs/webhooks.md §4 says why each exists.
NOTIFIER_SETTINGS = [
    config.KAFKA_BOOTSTRAP,
    config.SCHEMA_REGISTRY,
    config.database_url("notifier"),
    config.TOPIC_PARTITIONS, config.TOPIC_REPLICATION_FACTOR, config.TOPIC_CONFIGS,
    config.METRICS_HOST,
    WEBHOOK_ALLOWED_NETWORKS,
    NOTIFIER_VAULT_KEY_FILE,
    config.Setting("NOTIFIER_GROUP_ID", str, "notifier", help="Kafka consumer group"),
    config.Setting("NOTIFIER_METRICS_PORT", config.port, 9105, help="port of /metrics, /healthz and /readyz"),
    config.Setting("NOTIFIER_STALLED_AFTER_S", config.positive_float, 60.0,
                   help="/readyz fails once the consumer has held one batch this long (retrying it)"),
    config.Setting("NOTIFIER_ENDPOINT_CACHE_TTL_S", config.positive_float, 2.0,
                   help="how long a channel's endpoints are cached (a new or disabled endpoint counts within it)"),
    config.Setting("NOTIFIER_SECRET_CACHE_TTL_S", config.positive_float, 10.0,
                   help="how long an endpoint's opened signing secrets are kept (a rotation signs within it)"),
    config.Setting("NOTIFIER_LEASE_S", config.positive_float, 60.0,
                   help="a delivery held by a notifier that stopped renewing its lease is retried after this"),
    config.Setting("NOTIFIER_POLL_INTERVAL_S", config.positive_float, 0.5,
                   help="how often due retries and orphaned deliveries are claimed"),
    config.Setting("NOTIFIER_POLL_BATCH", config.positive_int, 500, help="deliveries claimed per poll at most"),
    config.Setting("NOTIFIER_ENDPOINT_CONCURRENCY", config.positive_int, 8,
                   help="attempts in flight per endpoint at once"),
    config.Setting("NOTIFIER_ENDPOINT_QUEUE_MAX", config.positive_int, 1000,
                   help="deliveries of one endpoint held in memory; the rest wait in PostgreSQL"),
    config.Setting("NOTIFIER_RETRY_WINDOW_S", config.positive_float, 259200.0,
                   help="a delivery is retried this long; an endpoint failing this long is disabled"),
    config.Setting("NOTIFIER_FIRST_BACKOFF_S", config.positive_float, 5.0, help="first retry delay (jittered)"),
    config.Setting("NOTIFIER_MAX_BACKOFF_S", config.positive_float, 3600.0, help="longest retry delay"),
    config.Setting("NOTIFIER_CONNECT_TIMEOUT_S", config.positive_float, 5.0, help="connect timeout of an attempt"),
    config.Setting("NOTIFIER_READ_TIMEOUT_S", config.positive_float, 10.0,
                   help="an attempt unanswered this long after sending failed (retried)"),
]


@dataclass(frozen=True)
class NotifierConfig:
    kafka_bootstrap_servers: str
    schema_registry_url: str
    database_url: str
    kafka_topic_partitions: int
    kafka_topic_replication_factor: int | None
    kafka_topic_configs: dict[str, dict[str, str]]
    metrics_host: str
    webhook_allowed_networks: tuple[IPNetwork, ...]
    notifier_vault_key_file: Path
    notifier_group_id: str
    notifier_metrics_port: int
    notifier_stalled_after_s: float
    notifier_endpoint_cache_ttl_s: float
    notifier_secret_cache_ttl_s: float
    notifier_lease_s: float
    notifier_poll_interval_s: float
    notifier_poll_batch: int
    notifier_endpoint_concurrency: int
    notifier_endpoint_queue_max: int
    notifier_retry_window_s: float
    notifier_first_backoff_s: float
    notifier_max_backoff_s: float
    notifier_connect_timeout_s: float
    notifier_read_timeout_s: float
