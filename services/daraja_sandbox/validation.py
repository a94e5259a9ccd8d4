"""Pure field checks of STK push and query bodies, answering the way Daraja does (docs/daraja.md §2).

Each check returns the first failing field as a `Failure`, or the cleaned-up fields.
"""
from __future__ import annotations

import base64
import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

from services.daraja_sandbox.responses import Failure, invalid_field
from services.daraja_sandbox.scenarios import PAYBILL_TRANSACTION, TILL_TRANSACTION

# scheme://[userinfo@]host[:port][/path?query#fragment], no whitespace anywhere.
_CALLBACK_URL = re.compile(
    r"(?i)https?://(?:[^\s/?#@]*@)?(?P<host>\[[0-9a-f:.]+\]|[^\s/?#:@\[\]]+)(?::(?P<port>\d{1,5}))?(?:[/?#]\S*)?\Z")
_PHONE = re.compile(r"254[17]\d{8}")
_SHORTCODE = re.compile(r"\d{5,7}")
ACCOUNT_REFERENCE_MAX = 12
DESCRIPTION_MAX = 13


@dataclass(frozen=True)
class PushFields:
    business_shortcode: str
    password: str
    timestamp: str
    transaction_type: str
    amount: int
    party_a: str
    party_b: str
    phone: str
    callback_url: str
    account_reference: str
    description: str


@dataclass(frozen=True)
class QueryFields:
    business_shortcode: str
    password: str
    timestamp: str
    checkout_request_id: str


@dataclass(frozen=True)
class Rules:
    now_nairobi: datetime  # naive, Nairobi wall-clock time
    timestamp_tolerance_s: int
    max_amount: int
    reject_localhost: bool


def _credential_fields(body: dict, rules: Rules) -> tuple[str, str, str] | Failure:
    """BusinessShortCode, Password and Timestamp, checked in Daraja's order (push and query alike)."""
    shortcode = _digits(body.get("BusinessShortCode"))
    if shortcode is None or not _SHORTCODE.fullmatch(shortcode):
        return invalid_field("BusinessShortCode")
    password = body.get("Password")
    if not isinstance(password, str) or not password:
        return invalid_field("Password")
    timestamp = _digits(body.get("Timestamp"))
    if timestamp is None or not _timestamp_ok(timestamp, rules):
        return invalid_field("Timestamp")
    return shortcode, password, timestamp


def validate_push(body: dict, rules: Rules) -> PushFields | Failure:
    credentials = _credential_fields(body, rules)
    if not isinstance(credentials, tuple):
        return credentials
    shortcode, password, timestamp = credentials
    transaction_type = body.get("TransactionType")
    if transaction_type not in (PAYBILL_TRANSACTION, TILL_TRANSACTION):
        return invalid_field("TransactionType")
    amount = _whole_amount(body.get("Amount"))
    if amount is None or not 1 <= amount <= rules.max_amount:
        return invalid_field("Amount")
    party_a = _digits(body.get("PartyA"))
    if party_a is None or not _PHONE.fullmatch(party_a):
        return invalid_field("PartyA")
    party_b = _digits(body.get("PartyB"))
    if party_b is None or not _SHORTCODE.fullmatch(party_b):
        return invalid_field("PartyB")
    phone = _digits(body.get("PhoneNumber"))
    if phone is None or not _PHONE.fullmatch(phone):
        return invalid_field("PhoneNumber")
    callback_url = body.get("CallBackURL")
    if not _callback_url_ok(callback_url, rules.reject_localhost):
        return invalid_field("CallBackURL")
    reference = body.get("AccountReference")
    if not isinstance(reference, str) or not reference.strip() or len(reference) > ACCOUNT_REFERENCE_MAX:
        return invalid_field("AccountReference")
    description = body.get("TransactionDesc") or ""  # the one optional field (docs/daraja.md §2)
    if not isinstance(description, str) or len(description) > DESCRIPTION_MAX:
        return invalid_field("TransactionDesc")
    return PushFields(shortcode, password, timestamp, transaction_type, amount, party_a, party_b, phone,
                      callback_url, reference, description)


def validate_query(body: dict, rules: Rules) -> QueryFields | Failure:
    credentials = _credential_fields(body, rules)
    if not isinstance(credentials, tuple):
        return credentials
    shortcode, password, timestamp = credentials
    checkout_request_id = body.get("CheckoutRequestID")
    if not isinstance(checkout_request_id, str) or not checkout_request_id.strip():
        return invalid_field("CheckoutRequestID")
    return QueryFields(shortcode, password, timestamp, checkout_request_id.strip())


def password_matches(password: str, business_shortcode: str, passkey: str, timestamp: str) -> bool:
    expected = base64.b64encode(f"{business_shortcode}{passkey}{timestamp}".encode()).decode("ascii")
    return hmac.compare_digest(expected, password)


def _digits(value: Any) -> str | None:
    """Daraja accepts numbers as JSON numbers or digit strings ("1", 174379)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if value >= 0 else None
    if isinstance(value, str) and value.isdigit() and value.isascii():
        return value
    return None


def _whole_amount(value: Any) -> int | None:
    # Decimals are refused even when whole ("1.00", 1.0): docs/daraja.md §2 Amount.
    digits = _digits(value)
    return int(digits) if digits is not None else None


def _timestamp_ok(timestamp: str, rules: Rules) -> bool:
    if len(timestamp) != 14:
        return False
    try:
        sent = datetime(int(timestamp[0:4]), int(timestamp[4:6]), int(timestamp[6:8]),
                        int(timestamp[8:10]), int(timestamp[10:12]), int(timestamp[12:14]))
    except ValueError:
        return False
    # A timestamp in the server's own zone (UTC, three hours off) is the classic failure (docs/daraja.md §2).
    return abs((sent - rules.now_nairobi).total_seconds()) <= rules.timestamp_tolerance_s


def _callback_url_ok(url: Any, reject_localhost: bool) -> TypeGuard[str]:
    # One regex instead of urlsplit: this runs on every push (performance, see app.py).
    match = _CALLBACK_URL.fullmatch(url) if isinstance(url, str) and len(url) <= 2048 else None
    if match is None:
        return False  # includes stray spaces, rejected by Daraja (docs/daraja.md §5)
    host, port = match.group("host").lower(), match.group("port")
    if port is not None and not 0 < int(port) < 65536:
        return False
    # Real Daraja rejects localhost (docs/daraja.md §5); off by default so loopback tests get callbacks.
    return not (reject_localhost and (host == "localhost" or host.endswith(".localhost")))
