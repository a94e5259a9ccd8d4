"""Settings of the review desk, which the onboarding API and the `payments` commands share."""
from __future__ import annotations

from dataclasses import dataclass

from services.common import config

OPERATOR_VERDICT_WAIT_S = config.Setting(
    "OPERATOR_VERDICT_WAIT_S", config.positive_float, 10.0,
    help="how long an operator's query or resolution waits for the ledger's verdict before answering "
         "that it is accepted but not applied yet")
# The desk publishes OperatorCommand events (as the Kafka principal onboarding-api) and reads verdicts.
DESK_SETTINGS = [config.KAFKA_BOOTSTRAP, config.SCHEMA_REGISTRY, OPERATOR_VERDICT_WAIT_S]
PAYMENTS_SETTINGS = [config.database_url("onboarding"), *DESK_SETTINGS]


@dataclass(frozen=True)
class PaymentsSettings:
    """PAYMENTS_SETTINGS: the `mpesa-pipeline payments` commands', read once."""

    database_url: str
    kafka_bootstrap_servers: str
    schema_registry_url: str
    operator_verdict_wait_s: float
