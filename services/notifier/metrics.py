"""The notifier's metrics. Endpoint ids are the only per-endpoint label (never a URL or a channel's
free text), so the label sets stay as few as the endpoints."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter("webhook_deliveries_total", "Webhook attempts by what came of them: delivered (a 2xx), "
                     "retry (to be tried again), parked (given up)", ["outcome", "endpoint"])
ATTEMPT_SECONDS = Histogram("webhook_attempt_duration_seconds", "One webhook attempt, connect to response read",
                            ["endpoint"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
OLDEST_UNDELIVERED = Gauge("webhook_oldest_undelivered_seconds", "Age of the oldest pending delivery of an enabled "
                           "endpoint (sampled by the poller): alert when it grows past the receivers' patience")
ENDPOINTS_DISABLED = Gauge("webhook_endpoints_disabled", "Webhook endpoints disabled, by an operator or by the "
                           "notifier after failing for the whole retry window: alert on an increase")
AUTO_DISABLED = Counter("webhook_endpoints_auto_disabled_total", "Endpoints the notifier disabled because no attempt "
                        "succeeded for the whole retry window")
SECRET_FAILURES = Counter("webhook_secret_failures_total", "Signing secrets that could not be opened (the deliveries "
                          "wait; see the audit trail's webhook_secret_decrypt_failed)", ["endpoint"])
ENQUEUED = Counter("webhook_deliveries_enqueued_total", "Deliveries written for consumed status events")
RELEASED = Counter("webhook_deliveries_released_total", "Deliveries handed back to PostgreSQL for the poller "
                   "(an earlier one of the same payment waits, or the endpoint's memory queue is full)")
