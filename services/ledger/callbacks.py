"""Tolerant parsing of Daraja's STK callback body (docs/daraja.md §3).

Pure: bytes in, a ParsedCallback out, or CallbackParseError saying why. CallbackParseError is the
only exception it raises: a body is hostile until proven (anyone who learns a callback URL can post
one), and any other exception would stop the ledger's partition instead of dead-lettering the body.
So a body is bounded before it is parsed: its size, its nesting (checked without recursion, since
the JSON decoder recurses once per level), and its numbers (no NaN or Infinity, no thousand-digit
integers, an amount only as a plain decimal).
"""
from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, NoReturn

from services.common.json_bounds import nesting_exceeds
from services.common.payment import NAIROBI
from services.common.text import untrusted
from services.daraja.result_codes import SUCCESS

MAX_BODY_BYTES = 64 * 1024  # the webhook gateway refuses bigger bodies; a producer to the topic may not
MAX_DEPTH = 16  # a genuine callback nests 6 deep (Body.stkCallback.CallbackMetadata.Item[{...}])
MAX_NUMBER_CHARS = 40  # an MSISDN has 12 digits, a TransactionDate 14: no genuine number comes near
# Daraja's ids are about 30 characters (ws_CO_191220191020363925). The ledger stores and indexes a
# callback's CheckoutRequestID (after an unknown push outcome): a few KiB would not fit an index entry,
# and PostgreSQL's refusal of it is no reason to hold up everything behind it.
MAX_CHECKOUT_ID_CHARS = 100
# An amount as a person writes it: digits, maybe a fraction. No exponent, no NaN/Infinity/sNaN (a
# signalling NaN raises on the first comparison), no spaces.
PLAIN_DECIMAL = re.compile(r"-?[0-9]{1,15}(?:\.[0-9]{1,15})?")


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
    doc = _bounded_json(body)
    envelope = doc.get("Body") if isinstance(doc, dict) else None
    stk = envelope.get("stkCallback") if isinstance(envelope, dict) else None
    if not isinstance(stk, dict):
        raise CallbackParseError("no Body.stkCallback object")
    checkout_id, code = stk.get("CheckoutRequestID"), stk.get("ResultCode")
    if not isinstance(checkout_id, str) or not checkout_id:
        raise CallbackParseError("CheckoutRequestID missing")
    if len(checkout_id) > MAX_CHECKOUT_ID_CHARS:
        raise CallbackParseError(f"CheckoutRequestID longer than {MAX_CHECKOUT_ID_CHARS} characters")
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


def _bounded_json(body: bytes) -> Any:
    """The body's JSON document, refused unless small, UTF-8, shallow and finite."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise CallbackParseError("body is not bytes")
    if len(body) > MAX_BODY_BYTES:
        raise CallbackParseError(f"body is larger than {MAX_BODY_BYTES // 1024} KiB")
    try:
        # UTF-8 only (RFC 8259 §8.1), not json's guess among UTF-16/32: the nesting scan reads bytes,
        # and a byte of a UTF-16 character could pass for a quote or a bracket.
        utf8 = bytes(body).removeprefix(codecs.BOM_UTF8)
        text = utf8.decode("utf-8")
    except UnicodeDecodeError:
        raise CallbackParseError("body is not UTF-8") from None
    if nesting_exceeds(utf8, MAX_DEPTH):
        raise CallbackParseError(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        doc = _DECODER.decode(text)
    except CallbackParseError:
        raise
    except (ValueError, RecursionError):  # RecursionError: cannot happen below MAX_DEPTH, kept as a backstop
        raise CallbackParseError("body is not JSON") from None
    # A NUL or a surrogate can only come from a \u escape (raw control characters are not JSON).
    if "\\u" in text and not _strings_are_storable(doc):
        raise CallbackParseError("body has a string PostgreSQL cannot store (NUL or a lone surrogate)")
    return doc


def _refuse_constant(name: str) -> NoReturn:
    raise CallbackParseError(f"JSON constant {name} is not a number")


def _bounded_int(digits: str) -> int:
    if len(digits) > MAX_NUMBER_CHARS:
        raise CallbackParseError(f"a number of {len(digits)} digits is too long")
    return int(digits)


def _finite_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise CallbackParseError(f"a number of {len(text)} characters is too long")
    value = float(text)
    if not math.isfinite(value):  # 1e999 is valid JSON and becomes inf
        raise CallbackParseError("a number is out of range")
    return value


def _strings_are_storable(doc: Any) -> bool:
    """No NUL (PostgreSQL text cannot hold one) and no lone surrogate (not encodable as UTF-8). The
    document is at most MAX_DEPTH deep, so this walk is bounded too."""
    if isinstance(doc, str):
        try:
            doc.encode("utf-8")  # json.loads turns "\\ud800" into a lone surrogate; UTF-8 has none
        except UnicodeEncodeError:
            return False
        return "\x00" not in doc
    if isinstance(doc, dict):
        return all(_strings_are_storable(k) and _strings_are_storable(v) for k, v in doc.items())
    if isinstance(doc, list):
        return all(_strings_are_storable(v) for v in doc)
    return True


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_finite_float)


def _items_by_name(metadata: Any) -> dict[str, Any]:
    """Items are read by Name, never by position; an item without Value (Balance) is skipped."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("Item"), list):
        return {}
    return {i["Name"]: i["Value"] for i in metadata["Item"]
            if isinstance(i, dict) and isinstance(i.get("Name"), str) and "Value" in i}


def _str_or_none(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    text = str(value)  # via str: never compare floats (docs/daraja.md §3)
    if not isinstance(value, (int, float, str)) or not PLAIN_DECIMAL.fullmatch(text):
        raise CallbackParseError(f"Amount {untrusted(text, 40)!r} is not a plain decimal number")
    return Decimal(text)


def _phone(value: Any) -> str | None:
    return None if value is None else str(value)


def _transaction_time(value: Any) -> datetime | None:
    if value is None:
        return None
    text = str(value)
    try:
        if len(text) != 14 or not text.isdigit():
            raise ValueError
        return datetime(int(text[0:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]), int(text[10:12]),
                        int(text[12:14]), tzinfo=NAIROBI)  # Nairobi local time; strptime costs 5x more
    except ValueError:
        raise CallbackParseError(f"TransactionDate {untrusted(text, 40)!r} is not YYYYMMDDHHmmss") from None
