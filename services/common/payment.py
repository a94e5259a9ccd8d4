"""The payment contract every service shares: what a valid payment request is, its limits, the
phone's one stored form and its one masked form, Kenya's time zone, and the payment states. Pure:
no I/O.

Field rules come from Daraja (docs/daraja.md §2): whole shillings, AccountReference ≤ 12 and
TransactionDesc ≤ 13 characters of [A-Za-z0-9 -], payer MSISDN 2547XXXXXXXX or 2541XXXXXXXX.
"""
from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from services.common.text import untrusted

NAIROBI = ZoneInfo("Africa/Nairobi")  # Daraja's timestamps are Kenyan wall-clock time (docs/daraja.md §2)


class PaymentState(enum.StrEnum):
    """A payment's state, as the ledger keeps it (docs/design.md, "Payment states"). The values are
    what PostgreSQL stores and the status topic carries: a CHECK constraint holds the same list."""

    REQUESTED = "Requested"  # asked for; the push result is not in yet
    PENDING = "Pending"      # Daraja accepted the push: the customer is being prompted
    SETTLED = "Settled"      # paid, with its M-Pesa receipt
    CANCELLED = "Cancelled"  # the customer declined, or the prompt timed out
    FAILED = "Failed"        # never pushed, or refused by Daraja
    REVIEW = "Review"        # doubtful: an operator decides


OPEN_STATES = frozenset({PaymentState.REQUESTED, PaymentState.PENDING})
FINAL_STATES = frozenset({PaymentState.SETTLED, PaymentState.CANCELLED, PaymentState.FAILED})


def mask_phone(phone: str) -> str:
    """The one masked form of a payer's number, for logs, reprs, desk answers and analytics: only the
    last three digits ("*********678"). A thousand payers share them, so they cannot be traced back
    to one; the country code is not kept either, as it told nothing (every payer is 254) and a
    longer visible prefix is what made the earlier form partly reconstructable."""
    if len(phone) < 9 or not phone.isdigit():  # a pseudonym (ph_…) shows nothing either
        return "*" * min(len(phone), 12)
    return "*" * (len(phone) - 3) + phone[-3:]


AMOUNT_MAX = 250_000  # KES per transaction (docs/daraja.md §2, current FAQ); channels may lower it
ACCOUNT_REFERENCE_MAX = 12  # characters, shown to the customer (docs/daraja.md §2)
DESCRIPTION_MAX = 13  # TransactionDesc, characters (docs/daraja.md §2)
# After removing spaces, dashes, dots and parentheses (other whitespace, a newline say, is refused):
# optional +254 / 254 / 00254 (then an optional trunk 0, as in "+254 (0)712 345 678"), or a trunk 0
# alone, then 7XXXXXXXX or 1XXXXXXXX.
_PHONE_FORMS = re.compile(r"(?:(?:\+|00)?2540?|0)?([17]\d{8})")
_PHONE_SEPARATORS = re.compile(r"[ \-.()]")
_REFERENCE = re.compile(r"[A-Za-z0-9 -]+")  # special characters make Daraja fail (docs/daraja.md §2)
CHANNEL_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# Free text (order reference, metadata keys) is stored in PostgreSQL and put on Kafka: no control,
# line-separator or surrogate characters (PostgreSQL refuses NUL, UTF-8 cannot encode a lone surrogate).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Metadata values are free data and may span lines; only what cannot be stored is refused.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")

FIELDS = ("channelId", "amount", "phone", "accountReference", "description", "orderReference", "metadata")
METADATA_ENTRIES_MAX = 20
METADATA_KEY_LENGTH_MAX = 64
METADATA_VALUE_LENGTH_MAX = 256
ORDER_REFERENCE_LENGTH_MAX = 128


@dataclass(frozen=True)
class PaymentRequest:
    channel_id: str
    amount: int
    phone: str
    account_reference: str
    description: str | None
    order_reference: str | None
    metadata: dict[str, str] = field(default_factory=dict)

    def digest(self) -> bytes:
        """SHA-256 of the canonical form: what the payment means, not how the JSON was spelled.

        Key order, whitespace and the phone's spelling (0712… vs 254712…) do not change it; any
        difference in a value the payment carries does.
        """
        canonical = json.dumps(
            [self.channel_id, self.amount, self.phone, self.account_reference, self.description,
             self.order_reference, sorted(self.metadata.items())],
            ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).digest()


# 2547… and 2541… are both Safaricom lines (docs/daraja.md §2 PartyA: 2541… numbers are real).
PHONE = re.compile(r"254[17][0-9]{8}")  # the one stored and sent form


def normalise_phone(raw: str) -> str | None:
    """07XXXXXXXX, 01XXXXXXXX, 7XXXXXXXX, 2547…, +2547…, 002547…, +254 (0)7… → 2547XXXXXXXX / 2541XXXXXXXX."""
    if len(raw) > 32:
        return None
    match = _PHONE_FORMS.fullmatch(_PHONE_SEPARATORS.sub("", raw))
    return f"254{match.group(1)}" if match else None


# A payer's number inside free text (a raw callback, a reason): a Kenyan mobile number in any form
# the ingress accepts for one (normalise_phone: +254, 254, 00254, a trunk 0,
# grouped by spaces, dashes, dots or parentheses), or a merchant may write it; longer runs of digits
# (timestamps) are not. Digits after letters are masked too ("INV0712345678"), digits followed by a
# letter are not: those are ids (a UUID's "1330026-31" in "c1330026-31d5", "8766430028" in
# "8766430028ac"), which the audit trail quotes and must keep whole.
_SEPARATORS_IN_TEXT = r"[ \-.()]{0,3}"
_PHONE_IN_TEXT = re.compile(rf"(?<![0-9])(?:(?:\+|00)?254{_SEPARATORS_IN_TEXT}(?:0{_SEPARATORS_IN_TEXT})?"
                            rf"|0{_SEPARATORS_IN_TEXT})?[17](?:{_SEPARATORS_IN_TEXT}[0-9]){{8}}(?![0-9A-Za-z])")


# Daraja's current CheckoutRequestIDs: ws_CO_, DDMMYYYYHHMMSS and milliseconds, then the payer's number
# without 254 (docs/daraja.md §2): inside a run of digits, where _PHONE_IN_TEXT does not look.
_NUMBER_IN_CHECKOUT_ID = re.compile(r"(ws_CO_[0-9]{17})([17][0-9]{8})")
# A UUID standing alone: inside a longer run ("254712345678-aaaa-…") its first group would hide a number.
_UUID_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])([0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12})(?![0-9A-Za-z])")


def mask_phones_in(text: str) -> str:
    """`text` with every Kenyan mobile number in it masked (mask_phone), for raw callbacks and reasons,
    the one a CheckoutRequestID of Daraja's current form ends in included."""
    if fewer_digits_than(NUMBER_DIGITS_MIN, text):
        return text  # most reasons and references: no number can hide in them
    def masked(match: re.Match[str]) -> str:
        phone = normalise_phone(match.group(0))
        return mask_phone(phone) if phone else "*" * len(match.group(0))
    def masked_piece(piece: str) -> str:
        piece = _NUMBER_IN_CHECKOUT_ID.sub(lambda m: m.group(1) + mask_phone(m.group(2)), piece)
        return _PHONE_IN_TEXT.sub(masked, piece)
    return outside_uuids(text, masked_piece)


# Every form of a number _PHONE_IN_TEXT and _NUMBER_IN_CHECKOUT_ID find has at least nine digits.
NUMBER_DIGITS_MIN = 9
_WITHOUT_DIGITS = str.maketrans("", "", "0123456789")


def fewer_digits_than(count: int, text: str) -> bool:
    """A cheap first look (one pass in C) before the masking patterns, which the ledger runs on every
    reason and audit entry: most hold no number at all."""
    return len(text) - len(text.translate(_WITHOUT_DIGITS)) < count


def outside_uuids(text: str, change: Callable[[str], str]) -> str:
    """`text` with `change` applied to what lies between the UUIDs in it. A UUID's groups may read as
    a number ("…-363e38876126": 38876126 after "-363", one UUID in about 180): payment and event ids are
    quoted whole in reasons and audit entries, and no payer's number is written as a UUID."""
    pieces = _UUID_IN_TEXT.split(text)
    return "".join(piece if index % 2 else change(piece) for index, piece in enumerate(pieces))


def validate_channel_id(value: Any) -> str | None:
    if value is None:
        return "is required"
    if not isinstance(value, str) or not CHANNEL_ID.fullmatch(value):
        return "must be 1-64 lower-case letters, digits, '-' or '_', starting with a letter or digit"
    return None


def parse_payment_request(body: Any, max_amount: int = AMOUNT_MAX) -> tuple[PaymentRequest | None, dict[str, str]]:
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    raw_phone = body.get("phone")
    phone = normalise_phone(raw_phone) if isinstance(raw_phone, str) else None
    checks = {
        "channelId": validate_channel_id(body.get("channelId")),
        "amount": _amount_error(body.get("amount"), max_amount),
        "phone": _phone_error(raw_phone, phone),
        "accountReference": _text_error(body.get("accountReference"), ACCOUNT_REFERENCE_MAX, required=True),
        "description": _text_error(body.get("description"), DESCRIPTION_MAX, required=False),
        "orderReference": _order_reference_error(body.get("orderReference")),
        "metadata": _metadata_error(body.get("metadata")),
    }
    # Unknown fields are refused rather than dropped: a misspelt "acountReference" must not turn
    # into a payment without the reference the caller meant. Free data belongs in metadata.
    for name in body:
        if name not in FIELDS:
            checks[untrusted(name, 64)] = "is not a field of a payment request (free data goes in metadata)"
    errors = {name: message for name, message in checks.items() if message}
    if errors:
        return None, errors
    assert phone is not None, "a phone that did not normalise has an error"
    return PaymentRequest(
        channel_id=body["channelId"], amount=body["amount"], phone=phone,
        account_reference=body["accountReference"], description=body.get("description"),
        order_reference=body.get("orderReference"), metadata=body.get("metadata") or {},
    ), {}


def _amount_error(value: Any, max_amount: int) -> str | None:
    if value is None:
        return "is required"
    # bool is an int in Python, and 100.0 is a float: both are refused, Daraja takes whole shillings.
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be a whole number of shillings written as a JSON integer (Daraja rejects decimals)"
    if not 1 <= value <= max_amount:
        return f"must be between 1 and {max_amount} shillings"
    return None


def _phone_error(value: Any, normalised: str | None) -> str | None:
    if value is None:
        return "is required"
    if normalised is None:
        return "must be a Kenyan mobile number such as 0712345678, 0112345678, +254712345678 or 254712345678"
    return None


def _text_error(value: Any, max_len: int, *, required: bool) -> str | None:
    if value is None:
        return "is required" if required else None
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    if len(value) > max_len:
        return f"must be at most {max_len} characters (it is shown to the customer)"
    if not _REFERENCE.fullmatch(value):
        return "may contain only letters, digits, spaces and '-'"
    return None


def _order_reference_error(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= ORDER_REFERENCE_LENGTH_MAX:
        return f"must be a string of 1-{ORDER_REFERENCE_LENGTH_MAX} characters"
    if _CONTROL.search(value):
        return "must not contain control characters"
    return None


def _metadata_error(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > METADATA_ENTRIES_MAX:
        return f"must be an object of at most {METADATA_ENTRIES_MAX} entries"
    for key, item in value.items():
        if not 1 <= len(key) <= METADATA_KEY_LENGTH_MAX or _CONTROL.search(key):
            return f"keys must be 1-{METADATA_KEY_LENGTH_MAX} characters without control characters"
        if not isinstance(item, str) or len(item) > METADATA_VALUE_LENGTH_MAX or _UNSTORABLE.search(item):
            return (f"values must be strings of at most {METADATA_VALUE_LENGTH_MAX} characters without NUL "
                    f"(key {untrusted(key, 64)!r})")
    return None


def event_problem(v: dict[str, Any]) -> str | None:
    """A payment-requested event (maybe produced straight to the topic, not by this API) gets the
    same checks as an API request; returns the reason it is invalid, or None."""
    _, errors = parse_payment_request({
        "channelId": v["channel_id"], "amount": v["amount"], "phone": v["phone"],
        "accountReference": v["account_reference"], "description": v["description"],
        "orderReference": v["order_reference"], "metadata": v["metadata"]})
    if v["phone"] and not errors and not PHONE.fullmatch(v["phone"]):
        errors = {"phone": "must be normalised to 12 digits (2547XXXXXXXX or 2541XXXXXXXX)"}
    return "invalid request: " + "; ".join(f"{k} {m}" for k, m in errors.items()) if errors else None
