"""Pure builders of Daraja request bodies: timestamp, password, STK push and STK query payloads."""
from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from services.common.payment import NAIROBI
from services.daraja.models import Shortcode, StkPushRequest


def nairobi_timestamp(now: datetime) -> str:
    """YYYYMMDDHHmmss on a 24-hour clock in Nairobi time, whatever the server's zone.

    docs/daraja.md §2 Timestamp: servers in other zones get "Invalid Timestamp"; Safaricom's own PHP
    SDK uses a 12-hour clock, a known-bad pattern.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(NAIROBI).strftime("%Y%m%d%H%M%S")


def stk_password(business_shortcode: str, passkey: str, timestamp: str) -> str:
    """base64(shortcode + passkey + timestamp), plain concatenation (docs/daraja.md §2 Password)."""
    return base64.b64encode(f"{business_shortcode}{passkey}{timestamp}".encode()).decode("ascii")


def build_push_payload(shortcode: Shortcode, request: StkPushRequest, passkey: str, timestamp: str) -> dict[str, Any]:
    # Types follow Safaricom's documented example: BusinessShortCode a number, the parties strings
    # (docs/daraja.md §2 Fields). Amount is a whole number: decimals are refused.
    return {
        "BusinessShortCode": int(shortcode.business_shortcode),
        "Password": stk_password(shortcode.business_shortcode, passkey, timestamp),
        "Timestamp": timestamp,
        "TransactionType": shortcode.transaction_type,
        "Amount": request.amount,
        "PartyA": request.phone,
        "PartyB": shortcode.party_b,
        "PhoneNumber": request.phone,
        "CallBackURL": request.callback_url,
        "AccountReference": request.account_reference,
        "TransactionDesc": request.description,
    }


def build_query_payload(shortcode: Shortcode, checkout_request_id: str, passkey: str, timestamp: str) -> dict[str, Any]:
    """The query needs its own fresh timestamp and password (docs/daraja.md §4)."""
    return {
        "BusinessShortCode": shortcode.business_shortcode,
        "Password": stk_password(shortcode.business_shortcode, passkey, timestamp),
        "Timestamp": timestamp,
        "CheckoutRequestID": checkout_request_id,
    }
