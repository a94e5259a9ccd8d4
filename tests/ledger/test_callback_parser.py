"""The tolerant callback parser against Daraja's real shapes and quirks (daraja.md §3)."""
import json
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from services.ledger.callbacks import CallbackParseError, parse_callback
from tests.ledger.callbacks import failure, success


def test_documented_success_sample_is_read_by_item_name():
    cb = parse_callback(success("ws_CO_1", amount=1))
    assert (cb.result_code, cb.receipt, cb.amount, cb.phone) == ("0", "NLJ7RT61SV", Decimal("1.00"), "254712345678")
    assert cb.transaction_time == datetime(2026, 11, 27, 10, 21, 15, tzinfo=ZoneInfo("Africa/Nairobi"))
    assert cb.succeeded


def test_items_in_any_order_and_amount_as_string():
    body = json.loads(success("ws_CO_2", amount=250, amount_as_string=True))
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"].reverse()
    cb = parse_callback(json.dumps(body).encode())
    assert cb.amount == Decimal("250.00") and cb.receipt == "NLJ7RT61SV"


@pytest.mark.parametrize("code, expected", [(1032, "1032"), ("1037", "1037"), ("SFC_IC0003", "SFC_IC0003"), (0, "0")])
def test_integer_or_string_result_codes(code, expected):
    assert parse_callback(failure("ws_CO_3", code)).result_code == expected


def test_failure_without_metadata_has_no_receipt():
    cb = parse_callback(failure("ws_CO_4", 1032))
    assert (cb.receipt, cb.amount, cb.phone, cb.transaction_time, cb.succeeded) == (None, None, None, None, False)


@pytest.mark.parametrize("body, why", [
    (b"<html>502</html>", "not JSON"),
    (b"{}", "stkCallback"),
    (b'{"Body": {"stkCallback": "x"}}', "stkCallback"),
    (json.dumps({"Body": {"stkCallback": {"ResultCode": 0}}}).encode(), "CheckoutRequestID"),
    (json.dumps({"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_5"}}}).encode(), "ResultCode"),
    (success("ws_CO_6").replace(b"20261127102115", b"20261327999999"), "TransactionDate"),
])
def test_unparseable_bodies_say_why(body, why):
    with pytest.raises(CallbackParseError, match=why):
        parse_callback(body)


@pytest.mark.parametrize("date", [b"2026112710211", b"202611271021150", b"\"2026-11-27T10\"", b"20260230102115"])
def test_a_transaction_date_not_exactly_yyyymmddhhmmss_is_refused(date):
    with pytest.raises(CallbackParseError, match="TransactionDate"):
        parse_callback(success("ws_CO_7").replace(b"20261127102115", date))
