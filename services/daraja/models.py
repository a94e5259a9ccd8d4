"""Typed values the Daraja client takes and returns: credentials, shortcodes, push requests, results.

Everything is a frozen dataclass. Values that are secret (consumer secret, passkey, tokens) or
personal (phone numbers) or carry a secret (the callback URL's path token) are masked in repr/str,
so logging one of these objects never leaks them.
"""
from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from services.common.payment import ACCOUNT_REFERENCE_MAX, AMOUNT_MAX, DESCRIPTION_MAX, PHONE as _PHONE, mask_phone

PAYBILL_TRANSACTION = "CustomerPayBillOnline"
TILL_TRANSACTION = "CustomerBuyGoodsOnline"
_SHORTCODE = re.compile(r"\d{5,7}")
# Special characters reportedly make Daraja fail (docs/daraja.md §2, bnjunge #3): letters, digits, space, '-'.
_PROMPT_TEXT = re.compile(r"[A-Za-z0-9 -]*")


def fingerprint(secret: str) -> str:
    """A short stable id for a secret value, fit for logs and metrics (sha256 prefix)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(frozen=True, repr=False)
class AppCredentials:
    """One Daraja app: the OAuth key pair plus the Lipa na M-Pesa passkey of its shortcode."""

    consumer_key: str
    consumer_secret: str
    passkey: str

    def __post_init__(self) -> None:
        for name in ("consumer_key", "consumer_secret", "passkey"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"AppCredentials.{name} must be a non-empty string")
        if ":" in self.consumer_key:
            raise ValueError("AppCredentials.consumer_key must not contain ':' (HTTP Basic separator)")

    @property
    def key_id(self) -> str:
        """Identifies the app in logs without revealing its consumer key."""
        return fingerprint(self.consumer_key)

    def __repr__(self) -> str:
        return f"AppCredentials(key_id={self.key_id}, consumer_secret=****, passkey=****)"

    __str__ = __repr__


ShortcodeType = Literal["paybill", "till"]


@dataclass(frozen=True)
class Shortcode:
    """Where the money goes. Daraja's Till rules (docs/daraja.md §2 "Till vs Paybill"):

    paybill: BusinessShortCode = PartyB = paybill number, TransactionType CustomerPayBillOnline.
    till:    BusinessShortCode = store/head-office number used at Go-Live, PartyB = till number,
             TransactionType CustomerBuyGoodsOnline.
    """

    business_shortcode: str
    shortcode_type: ShortcodeType = "paybill"
    till_number: str | None = None

    def __post_init__(self) -> None:
        if not _SHORTCODE.fullmatch(self.business_shortcode or ""):
            raise ValueError("business_shortcode must be 5-7 digits")
        if self.shortcode_type == "till":
            if not _SHORTCODE.fullmatch(self.till_number or ""):
                raise ValueError("a till needs till_number (5-7 digits); business_shortcode is the store number")
        elif self.shortcode_type == "paybill":
            if self.till_number is not None:
                raise ValueError("a paybill has no till_number")
        else:
            raise ValueError("shortcode_type must be 'paybill' or 'till'")

    @property
    def party_b(self) -> str:
        if self.shortcode_type == "till":
            assert self.till_number is not None, "a till has its number (__post_init__)"
            return self.till_number
        return self.business_shortcode

    @property
    def transaction_type(self) -> str:
        return TILL_TRANSACTION if self.shortcode_type == "till" else PAYBILL_TRANSACTION


@dataclass(frozen=True, repr=False)
class StkPushRequest:
    """One prompt to one phone. Invalid values are refused here, before any call to Daraja."""

    amount: int
    phone: str
    account_reference: str
    description: str
    callback_url: str

    def __post_init__(self) -> None:
        # bool is an int in Python; decimals are refused by Daraja (docs/daraja.md §2 Amount).
        if isinstance(self.amount, bool) or not isinstance(self.amount, int):
            raise ValueError("amount must be a whole number of shillings")
        if not 1 <= self.amount <= AMOUNT_MAX:
            raise ValueError(f"amount must be between 1 and {AMOUNT_MAX}")
        if not isinstance(self.phone, str) or not _PHONE.fullmatch(self.phone):
            raise ValueError("phone must be 12 digits starting 2547 or 2541")
        _check_prompt_text("account_reference", self.account_reference, ACCOUNT_REFERENCE_MAX)
        _check_prompt_text("description", self.description, DESCRIPTION_MAX)
        parts = urlsplit(self.callback_url) if isinstance(self.callback_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
                or any(c.isspace() for c in self.callback_url):
            # The URL may carry the gateway's secret path token: never echo it.
            raise ValueError("callback_url must be an absolute http(s) URL without spaces")

    def __repr__(self) -> str:
        host = urlsplit(self.callback_url).hostname
        return (f"StkPushRequest(amount={self.amount}, phone={mask_phone(self.phone)}, "
                f"account_reference={self.account_reference!r}, description={self.description!r}, "
                f"callback_url=<{host}/…>)")

    __str__ = __repr__


def _check_prompt_text(name: str, value: object, limit: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"{name} must be at most {limit} characters")
    if not _PROMPT_TEXT.fullmatch(value):
        raise ValueError(f"{name} may contain only letters, digits, spaces and '-'")


def sanitise_prompt_text(text: str, limit: int) -> str:
    """Turns free text into something Daraja accepts: allowed characters only, cut to `limit`."""
    cleaned = re.sub(r"[^A-Za-z0-9 -]", "", text)
    return re.sub(r"\s+", " ", cleaned).strip()[:limit].strip()


@dataclass(frozen=True)
class PushAccepted:
    """Daraja took the push for processing. Not a payment: the outcome comes by callback or query."""

    merchant_request_id: str
    checkout_request_id: str
    response_code: str
    customer_message: str


class QueryStatus(enum.Enum):
    FINAL_SUCCESS = "final_success"
    FINAL_FAILURE = "final_failure"
    STILL_PROCESSING = "still_processing"


@dataclass(frozen=True)
class QueryResult:
    """What an STK query said. `result_code` is always text ("0", "1032", "SFC_IC0003").

    STILL_PROCESSING covers every answer that is not a final verdict: 4999, 500.001.1001 with
    "being processed", an empty or "does not Exist" message, and result codes this client does
    not know (docs/daraja.md §4: treat them as still-unknown, never as failed).
    """

    status: QueryStatus
    result_code: str | None
    result_desc: str
    merchant_request_id: str | None = None
    checkout_request_id: str | None = None


@dataclass(frozen=True, repr=False)
class AccessToken:
    value: str
    expires_in_s: int

    def __repr__(self) -> str:
        return f"AccessToken(value=****, expires_in_s={self.expires_in_s})"

    __str__ = __repr__
