"""Tolerant parsing of Daraja's STK callback body (daraja.md §3).

Pure: bytes in, a ParsedCallback out, or CallbackParseError saying why.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

from services.daraja.result_codes import SUCCESS

NAIROBI = ZoneInfo("Africa/Nairobi")

class CallbackParseError(ValueError):
    pass


@dataclass(frozen=True)
class ParsedCallback:
    merchant_request_id: str | None
    checkout_request_id: str
    result_code: str
    result_desc: str
    receipt: str | None = None
    amount: Decimal | None = None
    phone: str | None = None
    transaction_time: datetime | None = None

    @property
    def succeeded(self) -> bool:
        return self.result_code == SUCCESS


def parse_callback(body: bytes) -> ParsedCallback:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise CallbackParseError("body is not JSON") from None
    stk = doc.get("Body", {}).get("stkCallback") if isinstance(doc, dict) and isinstance(doc.get("Body"), dict) else None
    if not isinstance(stk, dict):
        raise CallbackParseError("no Body.stkCallback object")
    checkout_id, code = stk.get("CheckoutRequestID"), stk.get("ResultCode")
    if not isinstance(checkout_id, str) or not checkout_id:
        raise CallbackParseError("CheckoutRequestID missing")
    if isinstance(code, bool) or not isinstance(code, (int, str)) or str(code).strip() == "":
        raise CallbackParseError("ResultCode missing")  # int in real callbacks, "SFC_IC0003" a string
    items = _items_by_name(stk.get("CallbackMetadata"))
    return ParsedCallback(
        merchant_request_id=_str_or_none(stk.get("MerchantRequestID")),
        checkout_request_id=checkout_id,
        result_code=str(code).strip(),
        result_desc=str(stk.get("ResultDesc") or ""),
        receipt=_str_or_none(items.get("MpesaReceiptNumber")),
        amount=_decimal(items.get("Amount")),
        phone=_phone(items.get("PhoneNumber")),
        transaction_time=_transaction_time(items.get("TransactionDate")),
    )


def _items_by_name(metadata) -> dict:
    """Items are read by Name, never by position; an item without Value (Balance) is skipped."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("Item"), list):
        return {}
    return {i["Name"]: i["Value"] for i in metadata["Item"]
            if isinstance(i, dict) and isinstance(i.get("Name"), str) and "Value" in i}


def _str_or_none(value) -> str | None:
    return str(value) if value not in (None, "") else None


def _decimal(value) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return Decimal(str(value))  # via str: never compare floats (daraja.md §3)
    except InvalidOperation:
        raise CallbackParseError(f"Amount {value!r} is not a number") from None


def _phone(value) -> str | None:
    return None if value is None else str(value)


def _transaction_time(value) -> datetime | None:
    if value is None:
        return None
    text = str(value)
    try:
        if len(text) != 14 or not text.isdigit():
            raise ValueError
        fields = (text[0:4], text[4:6], text[6:8], text[8:10], text[10:12], text[12:14])
        return datetime(*map(int, fields), tzinfo=NAIROBI)  # Nairobi local time; strptime costs 5x more
    except ValueError:
        raise CallbackParseError(f"TransactionDate {text!r} is not YYYYMMDDHHmmss") from None
