"""Pure validation of a payment request body: a clean request, or errors by field."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MAX_AMOUNT = 250_000  # KES per transaction (daraja.md §2, current FAQ); channels may lower it
_PHONE_FORMS = re.compile(r"^(?:\+?254|0)?([17]\d{8})$")
_REFERENCE = re.compile(r"^[A-Za-z0-9 -]+$")  # special characters make Daraja fail (daraja.md §2)
_CHANNEL_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class PaymentRequest:
    channel_id: str
    amount: int
    phone: str
    account_reference: str
    description: str | None
    order_reference: str | None
    metadata: dict[str, str] = field(default_factory=dict)


def normalise_phone(raw: str) -> str | None:
    """Accepts 07XXXXXXXX, 01XXXXXXXX, 7XXXXXXXX, 2547..., +2547... (spaces and dashes allowed)."""
    match = _PHONE_FORMS.match(re.sub(r"[\s-]", "", raw))
    return f"254{match.group(1)}" if match else None


def validate_channel_id(value: Any) -> str | None:
    if not isinstance(value, str) or not _CHANNEL_ID.match(value):
        return "must be 1-64 lower-case letters, digits, '-' or '_'"
    return None


def parse_payment_request(body: Any, max_amount: int = MAX_AMOUNT) -> tuple[PaymentRequest | None, dict[str, str]]:
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors: dict[str, str] = {}
    checks = {
        "channelId": validate_channel_id(body.get("channelId")),
        "amount": _amount_error(body.get("amount"), max_amount),
        "phone": None if isinstance(body.get("phone"), str) and normalise_phone(body["phone"])
        else "must be a Safaricom number such as 0712345678, 0112345678 or 254712345678",
        "accountReference": _text_error(body.get("accountReference"), 12, required=True),
        "description": _text_error(body.get("description"), 13, required=False),
        "orderReference": _order_reference_error(body.get("orderReference")),
        "metadata": _metadata_error(body.get("metadata")),
    }
    errors = {name: message for name, message in checks.items() if message}
    if errors:
        return None, errors
    return PaymentRequest(
        channel_id=body["channelId"], amount=body["amount"], phone=normalise_phone(body["phone"]),
        account_reference=body["accountReference"], description=body.get("description"),
        order_reference=body.get("orderReference"), metadata=body.get("metadata") or {},
    ), {}


def _amount_error(value: Any, max_amount: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be a whole number of shillings (Daraja rejects decimals)"
    if not 1 <= value <= max_amount:
        return f"must be between 1 and {max_amount}"
    return None


def _text_error(value: Any, max_len: int, *, required: bool) -> str | None:
    if value is None:
        return "is required" if required else None
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    if len(value) > max_len:
        return f"must be at most {max_len} characters"
    if not _REFERENCE.match(value):
        return "may contain only letters, digits, spaces and '-'"
    return None


def _order_reference_error(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 128:
        return "must be a string of 1-128 characters"
    return None


def _metadata_error(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 20:
        return "must be an object of at most 20 string values"
    if not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 256 for k, v in value.items()):
        return "keys must be strings of at most 64 characters and values strings of at most 256"
    return None
