"""Status events as webhook events: the event type and the JSON body every attempt sends.

The body follows the Standard Webhooks payload shape (`type`, `timestamp`, `data`). It carries what
an upstream system needs to close an order and nothing more: no phone number, not even masked (the
upstream sent it and has it), no CheckoutRequestID (current Daraja ids embed the payer's MSISDN),
no secret. Its texts and metadata are the status topic's, minimised by the ledger: payers' numbers
masked, only the metadata keys the channel allow-lists (schemas/README.md, "Personal data").
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from services.common.payment import PaymentState

# Status -> webhook event type. Requested is internal (nothing has happened for the payer yet).
EVENT_TYPE_OF_STATE: dict[str, str] = {
    PaymentState.PENDING: "payment.pending",
    PaymentState.SETTLED: "payment.settled",
    PaymentState.CANCELLED: "payment.cancelled",
    PaymentState.FAILED: "payment.failed",
    PaymentState.REVIEW: "payment.review",
}
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_TYPE_OF_STATE.values())
CURRENCY = "KES"


def event_type_of(status: str) -> str | None:
    """The webhook event type of a status event, None for a state no webhook announces."""
    return EVENT_TYPE_OF_STATE.get(status)


def webhook_id_of(event_id: str) -> str:
    """The `webhook-id` header: the status event's own id, the same on every attempt and redelivery."""
    return event_id


def webhook_body(event: dict[str, Any]) -> str:
    """The JSON body for a decoded payment_status record (schemas/payment_status.avsc).

    ASCII-only JSON (non-ASCII escaped), so the signed text and the bytes sent are the same
    whatever a receiver's framework does with encodings. Keys are stable; receivers must ignore
    keys they do not know (new ones may be added)."""
    event_type = event_type_of(event["status"])
    if event_type is None:
        raise ValueError(f"status {event['status']!r} has no webhook event")
    occurred_at = _iso(event["occurred_at"])
    data = {
        "eventId": event["event_id"],
        "paymentId": event["payment_id"],
        "channelId": event["channel_id"],
        "orderReference": event.get("order_reference"),
        "amount": event["amount"],
        "currency": CURRENCY,
        "state": event["status"],
        "previousState": event.get("previous_status"),
        "mpesaReceipt": event.get("mpesa_receipt"),
        "transactionTime": _iso(event["transaction_time"]) if event.get("transaction_time") else None,
        "resultCode": event.get("result_code"),
        "reason": event.get("reason"),
        "lateMpesaReceipt": event.get("late_mpesa_receipt"),
        "resolvedBy": event.get("resolved_by"),
        "metadata": dict(event.get("metadata") or {}),
        "occurredAt": occurred_at,
    }
    return json.dumps({"type": event_type, "timestamp": occurred_at, "data": data}, separators=(",", ":"))


def _iso(moment: datetime) -> str:
    """UTC, milliseconds, with Z: what the ingress's API answers too."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
