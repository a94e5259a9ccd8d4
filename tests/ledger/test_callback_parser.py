"""The tolerant callback parser against Daraja's real shapes and quirks (docs/daraja.md §3)."""
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


# --- Bounds: a body posted by whoever learned a callback URL must never raise anything else ------

def with_amount(raw_json_value: bytes) -> bytes:
    """A genuine success whose Amount is the given JSON text, as an attacker would write it."""
    return success("ws_CO_8", amount=100).replace(b"100.0", raw_json_value, 1)


def test_a_body_over_64_kib_is_refused_even_when_it_is_a_genuine_callback():
    genuine = success("ws_CO_9")
    assert parse_callback(genuine + b" " * (64 * 1024 - len(genuine))).receipt == "NLJ7RT61SV"  # at the bound
    with pytest.raises(CallbackParseError, match="larger than 64 KiB"):
        parse_callback(genuine + b" " * (64 * 1024 - len(genuine) + 1))


@pytest.mark.parametrize("depth", [1000, 30000])  # the decoder recurses once per level: 1000 was a RecursionError
def test_deeply_nested_json_is_refused_as_too_deep(depth):
    body = b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_10", "ResultCode": 0, "x": ' + \
        b"[" * depth + b"]" * depth + b"}}}"
    with pytest.raises(CallbackParseError, match="nested deeper than 16"):
        parse_callback(body)


def test_nesting_is_counted_outside_strings_only_and_up_to_the_bound():
    doc = json.loads(success("ws_CO_11"))
    doc["Body"]["stkCallback"]["ResultDesc"] = "[{" * 500  # brackets in a string are text
    doc["Body"]["stkCallback"]["Extra"] = json.loads("[" * 13 + "]" * 13)  # 3 + 13 = 16 levels: allowed
    assert parse_callback(json.dumps(doc).encode()).result_desc == "[{" * 500
    doc["Body"]["stkCallback"]["Extra"] = [doc["Body"]["stkCallback"]["Extra"]]  # 17
    with pytest.raises(CallbackParseError, match="nested deeper"):
        parse_callback(json.dumps(doc).encode())


@pytest.mark.parametrize("amount", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_json_constants_are_refused(amount):
    with pytest.raises(CallbackParseError, match=f"constant {amount.decode()} is not a number"):
        parse_callback(with_amount(amount))


@pytest.mark.parametrize("amount, why", [
    (b"1e999", "out of range"),  # valid JSON, a float('inf') once read
    (b"1" * 41, "41 digits is too long"),
    (b"1" * 5000, "5000 digits is too long"),  # above Python's int-from-text limit too
    (b"0." + b"0" * 60 + b"1", "characters is too long"),
])
def test_huge_numbers_are_refused(amount, why):
    with pytest.raises(CallbackParseError, match=why):
        parse_callback(with_amount(amount))


@pytest.mark.parametrize("amount", [b'"NaN"', b'"sNaN"', b'"Infinity"', b'"-inf"', b'"1e2"', b'" 100"', b'"0x64"',
                                    b'"100.00\\n"', b'"\xd9\xa1\xd9\xa0\xd9\xa0"', b"1e16", b"[100]", b'{"v": 100}'])
def test_an_amount_that_is_not_a_plain_decimal_is_refused(amount):
    # Decimal("sNaN") used to pass, and raised InvalidOperation at the first comparison in the decision.
    with pytest.raises(CallbackParseError, match="Amount .* is not a plain decimal number"):
        parse_callback(with_amount(amount))


@pytest.mark.parametrize("amount, expected", [(b"100.0", "100.0"), (b"100", "100"), (b'"100.00"', "100.00"),
                                              (b"-5", "-5"), (b"0.5", "0.5")])
def test_plain_decimal_amounts_read_as_before(amount, expected):
    assert parse_callback(with_amount(amount)).amount == Decimal(expected)


def test_the_reason_quoting_a_hostile_amount_is_made_safe():
    with pytest.raises(CallbackParseError) as refused:
        parse_callback(with_amount(b'"1\\n{\\"level\\":\\"info\\"}\\u001b[2J' + b"x" * 500 + b'"'))
    reason = str(refused.value)
    assert "\n" not in reason and "\x1b" not in reason and len(reason) < 120


@pytest.mark.parametrize("body, why", [
    ("\ufeff".encode() + success("ws_CO_12"), None),  # a UTF-8 byte order mark is read, as before
    (success("ws_CO_12").decode().encode("utf-16"), "not UTF-8"),  # RFC 8259 §8.1: UTF-8 between systems
    (b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_\\u0000", "ResultCode": 0}}}', "NUL"),
    (b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_\\ud800", "ResultCode": 0}}}', "surrogate"),
    (b"\xff\xfe\x00", "not UTF-8"),
    ("not bytes", "not bytes"),
])
def test_text_that_could_not_be_stored_or_scanned_is_refused(body, why):
    if why is None:
        assert parse_callback(body).checkout_request_id == "ws_CO_12"
    else:
        with pytest.raises(CallbackParseError, match=why):
            parse_callback(body)
