"""The privacy service's settings (README: Configuration)."""
from __future__ import annotations

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
