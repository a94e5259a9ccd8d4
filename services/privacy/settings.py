"""Settings of the privacy service (the retention of payers' data) and of a payer's requests (the
`payers` commands, and the onboarding API, which serves them when PRIVACY_DATABASE_URL is set);
README: Configuration."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common import config
from services.common.pseudonyms import PSEUDONYM_KEY_FILE


def _days(raw: str) -> int:
    days = config.positive_int(raw)
    if days > 3650:
        raise ValueError("must be at most 3650 (ten years)")
    return days


PAYER_DATA_RETENTION_DAYS = config.Setting(
    "PAYER_DATA_RETENTION_DAYS", _days, 90,
    help="days after a payment's final state that its payer data is kept, unless its channel sets its own "
         "(payerDataRetentionDays); then the phone becomes a keyed pseudonym and raw callbacks are dropped")
SETTINGS = [config.database_url("privacy"), PSEUDONYM_KEY_FILE, PAYER_DATA_RETENTION_DAYS, config.METRICS_HOST,
            config.Setting("PRIVACY_METRICS_PORT", config.port, 9106, help="port of /metrics, /healthz and /readyz"),
            config.Setting("PRIVACY_RETENTION_INTERVAL_S", config.positive_float, 3600.0,
                           help="how often the retention of payers' data looks for payments due"),
            config.Setting("PRIVACY_RETENTION_CHUNK", config.positive_int, 500,
                           help="payments pseudonymised per transaction (each holds their advisory locks)")]

# The onboarding API logs in as `onboarding` and reads payments only; erasure needs the privacy role
# (migrations 0019, 0021, 0022), so the API opens a second, small pool as that role.
PRIVACY_DATABASE_URL = config.Setting(
    "PRIVACY_DATABASE_URL", config.postgres_url, None, secret=False,
    help="the privacy role's database (postgresql://privacy@host:port/db, password from PGPASSFILE); "
         "set, the onboarding API serves POST /admin/payers/export and /admin/payers/erase")
# Where the answers read each raw-PII topic's retention.ms from: the same settings the topics are made with.
PAYERS_SETTINGS = [config.database_url("privacy"), PSEUDONYM_KEY_FILE, config.TOPIC_CONFIGS,
                   config.TOPIC_REPLICATION_FACTOR]
API_PAYERS_SETTINGS = [PRIVACY_DATABASE_URL, PSEUDONYM_KEY_FILE, config.TOPIC_CONFIGS,
                       config.TOPIC_REPLICATION_FACTOR]


@dataclass(frozen=True)
class PayersSettings:
    """PAYERS_SETTINGS: the `mpesa-pipeline payers` commands', read once."""

    database_url: str
    pseudonym_key_file: Path
    kafka_topic_configs: dict[str, dict[str, str]]
    kafka_topic_replication_factor: int | None


@dataclass(frozen=True)
class ApiPayersSettings:
    """API_PAYERS_SETTINGS: the onboarding API's, read once at start."""

    privacy_database_url: str | None
    pseudonym_key_file: Path
    kafka_topic_configs: dict[str, dict[str, str]]
    kafka_topic_replication_factor: int | None
