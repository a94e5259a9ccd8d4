"""The ledger's configuration: environment variables, read once at start into `LedgerConfig`."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from services.common import config
from services.common.pseudonyms import PSEUDONYM_KEY_FILE
from services.common.topic_config import DAY_MS, configs_for
from services.common.topics import ACCESS
from services.ledger.deadlines import LedgerSettings

SETTINGS = [
    config.KAFKA_BOOTSTRAP,
    config.SCHEMA_REGISTRY,
    config.database_url("ledger"),
    config.TOPIC_PARTITIONS, config.TOPIC_REPLICATION_FACTOR, config.TOPIC_CONFIGS,
    config.METRICS_HOST,
    PSEUDONYM_KEY_FILE,  # the status topic's checkout_ref (schemas/README.md, "Personal data")
    config.Setting("LEDGER_GROUP_ID", str, "ledger", help="Kafka consumer group"),
    config.Setting("LEDGER_METRICS_PORT", config.port, 9102, help="port of /metrics, /healthz and /readyz"),
    config.Setting("LEDGER_MAX_IN_FLIGHT", config.positive_int, 2,
                   help="batches applied at once (one sharing a payment with an earlier one waits for it)"),
    config.Setting("LEDGER_BATCH_LINGER_MS", config.linger_ms, 60,
                   help="a batch waits this long for more events after its first: fewer, larger transactions"),
    config.Setting("LEDGER_QUERY_AFTER_S", config.positive_float, 90.0, help="Pending this long: start STK queries"),
    config.Setting("LEDGER_REVIEW_AFTER_S", config.positive_float, 900.0,
                   help="no final answer this long after the request: Review"),
    config.Setting("LEDGER_STALLED_AFTER_S", config.positive_float, 60.0,
                   help="/readyz fails once the consumer has held one batch this long (retrying it)"),
    config.Setting("LEDGER_CALLBACK_TTL_AFTER_FINAL_S", config.positive_float, 86400.0,
                   help="callbacks for a payment final longer than this are refused (its URL has expired)"),
    config.Setting("LEDGER_CHANNEL_CACHE_TTL_S", config.positive_float, 5.0,
                   help="how long a channel's confirm-by-query setting is cached"),
    config.Setting("LEDGER_PROCESSED_RETENTION_DAYS", config.positive_float, 30.0,
                   help="processed-event ids kept this long to drop redeliveries; above the topics' retention"),
]


@dataclass(frozen=True)
class LedgerConfig:
    kafka_bootstrap_servers: str
    schema_registry_url: str
    database_url: str
    kafka_topic_partitions: int
    kafka_topic_replication_factor: int | None
    kafka_topic_configs: dict[str, dict[str, str]]
    metrics_host: str
    pseudonym_key_file: Path
    ledger_group_id: str
    ledger_metrics_port: int
    ledger_max_in_flight: int
    ledger_batch_linger_ms: int
    ledger_query_after_s: float
    ledger_review_after_s: float
    ledger_stalled_after_s: float
    ledger_callback_ttl_after_final_s: float
    ledger_channel_cache_ttl_s: float
    ledger_processed_retention_days: float

    def __post_init__(self) -> None:
        """A redelivery the broker can still make must be one the ledger still recognises: an event
        whose id it has forgotten would be applied again as a new fact (docs/kafka-topics.md, §2)."""
        remembered_ms = self.ledger_processed_retention_days * DAY_MS
        for topic in ACCESS["ledger"].reads:
            raw = configs_for(topic.name, None, self.kafka_topic_configs).get("retention.ms", "")
            if not raw.lstrip("-").isdigit():
                continue  # not a number: the broker refuses it when the topic is created
            kept_ms = int(raw)
            if kept_ms < 0 or kept_ms >= remembered_ms:
                kept = "kept forever" if kept_ms < 0 else f"kept {kept_ms / DAY_MS:g} days"
                raise config.ConfigError(
                    f"{topic.name} would be {kept} (KAFKA_TOPIC_CONFIGS), not less than the "
                    f"{self.ledger_processed_retention_days:g} days the ledger remembers processed events "
                    "(LEDGER_PROCESSED_RETENTION_DAYS)")

    def ledger_settings(self) -> LedgerSettings:
        return LedgerSettings(first_query_after=timedelta(seconds=self.ledger_query_after_s),
                              review_after=timedelta(seconds=self.ledger_review_after_s),
                              callback_ttl_after_final=timedelta(seconds=self.ledger_callback_ttl_after_final_s),
                              channel_cache_ttl_s=self.ledger_channel_cache_ttl_s)
