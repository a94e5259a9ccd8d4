"""Pure request building: Nairobi timestamps, the password, Till/Paybill payload rules, and the
model checks that stop a bad push before it reaches Daraja."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from services.daraja.models import AppCredentials, Shortcode, StkPushRequest, sanitise_prompt_text
from services.daraja.payloads import build_push_payload, build_query_payload, nairobi_timestamp, stk_password
from services.daraja_sandbox.settings import SANDBOX_PASSKEY

# Safaricom's documented sample password: 174379 + sandbox passkey + 20160216165627 (docs/daraja.md §2).
DOC_SAMPLE_PASSWORD = ("MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJh"
                       "ZGExZWQyYzkxOTIwMTYwMjE2MTY1NjI3")
CALLBACK = "https://gateway.example.com/callbacks/stk/ch1/pay1/s3cr3t-path-token"


def test_password_matches_safaricom_documented_sample():
    assert stk_password("174379", SANDBOX_PASSKEY, "20160216165627") == DOC_SAMPLE_PASSWORD


def test_timestamp_is_nairobi_time_whatever_the_zone_of_the_clock():
    utc_afternoon = datetime(2026, 10, 2, 15, 5, 6, tzinfo=timezone.utc)
    assert nairobi_timestamp(utc_afternoon) == "20261002180506"  # UTC+3, 24-hour clock
    new_york = utc_afternoon.astimezone(timezone(timedelta(hours=-4)))
    assert nairobi_timestamp(new_york) == "20261002180506"


def test_timestamp_crosses_midnight_into_nairobi_date():
    assert nairobi_timestamp(datetime(2026, 12, 31, 22, 30, tzinfo=timezone.utc)) == "20270101013000"


def test_timestamp_refuses_a_naive_clock():
    with pytest.raises(ValueError):
        nairobi_timestamp(datetime(2026, 1, 1, 12, 0))


def test_paybill_payload_follows_documented_fields_and_types():
    request = StkPushRequest(100, "254712345678", "INV-42", "Order 42", CALLBACK)
    payload = build_push_payload(Shortcode("174379"), request, SANDBOX_PASSKEY, "20260918153000")
    assert payload == {
        "BusinessShortCode": 174379, "Password": stk_password("174379", SANDBOX_PASSKEY, "20260918153000"),
        "Timestamp": "20260918153000", "TransactionType": "CustomerPayBillOnline", "Amount": 100,
        "PartyA": "254712345678", "PartyB": "174379", "PhoneNumber": "254712345678", "CallBackURL": CALLBACK,
        "AccountReference": "INV-42", "TransactionDesc": "Order 42",
    }


def test_till_payload_sends_store_number_as_shortcode_and_till_as_party_b():
    request = StkPushRequest(1, "254112345678", "ORDER", "Goods", CALLBACK)
    payload = build_push_payload(Shortcode("600100", "till", "600200"), request, "pk", "20260918153000")
    assert (payload["BusinessShortCode"], payload["PartyB"], payload["TransactionType"]) == \
        (600100, "600200", "CustomerBuyGoodsOnline")
    assert payload["Password"] == stk_password("600100", "pk", "20260918153000")


def test_query_payload_has_its_own_password_and_timestamp():
    payload = build_query_payload(Shortcode("174379"), "ws_CO_1", SANDBOX_PASSKEY, "20260101000000")
    assert payload == {"BusinessShortCode": "174379", "Password": stk_password("174379", SANDBOX_PASSKEY,
                                                                               "20260101000000"),
                       "Timestamp": "20260101000000", "CheckoutRequestID": "ws_CO_1"}


@pytest.mark.parametrize("amount", [1.5, 1.0, "1", True, 0, -5, 250_001])
def test_push_refuses_amounts_daraja_would_refuse(amount):
    with pytest.raises(ValueError, match="amount"):
        StkPushRequest(amount, "254712345678", "REF", "Desc", CALLBACK)


@pytest.mark.parametrize("phone", ["254712345678", "254112345678"])
def test_push_accepts_both_safaricom_prefixes(phone):
    assert StkPushRequest(1, phone, "REF", "Desc", CALLBACK).phone == phone


@pytest.mark.parametrize("phone", ["0712345678", "+254712345678", "254812345678", "25471234567", "2547123456789"])
def test_push_refuses_other_phone_forms(phone):
    with pytest.raises(ValueError, match="phone"):
        StkPushRequest(1, phone, "REF", "Desc", CALLBACK)


@pytest.mark.parametrize("reference, description, field", [
    ("A" * 13, "Desc", "account_reference"), ("REF", "D" * 14, "description"),
    ("REF#1", "Desc", "account_reference"), ("REF", "Pay @shop", "description"), ("", "Desc", "account_reference"),
])
def test_push_refuses_prompt_text_daraja_would_refuse(reference, description, field):
    with pytest.raises(ValueError, match=field):
        StkPushRequest(1, "254712345678", reference, description, CALLBACK)


def test_limits_are_inclusive():
    request = StkPushRequest(250_000, "254712345678", "A" * 12, "D" * 13, CALLBACK)
    assert (len(request.account_reference), len(request.description)) == (12, 13)


@pytest.mark.parametrize("url", ["ftp://x/y", "/relative", "https://exa mple.com/x", "http:///nohost"])
def test_push_refuses_bad_callback_urls_without_echoing_them(url):
    with pytest.raises(ValueError) as caught:
        StkPushRequest(1, "254712345678", "REF", "Desc", url)
    assert url not in str(caught.value)


def test_sanitise_prompt_text_keeps_what_daraja_accepts():
    assert sanitise_prompt_text("Order #42 @ Mama's shop!", 12) == "Order 42 Mam"
    assert sanitise_prompt_text("  a   b  ", 13) == "a b"


def test_shortcode_rules():
    with pytest.raises(ValueError):
        Shortcode("600100", "till")  # a till needs its till number
    with pytest.raises(ValueError):
        Shortcode("174379", "paybill", "600200")
    for bad in ("1743", "12a456", "12345678"):
        with pytest.raises(ValueError):
            Shortcode(bad)
    assert Shortcode("17437").party_b == "17437"


def test_reprs_mask_secrets_personal_data_and_the_callback_token():
    app = AppCredentials("consumer-key-abc", "consumer-secret-xyz", "passkey-123")
    request = StkPushRequest(1, "254712345678", "REF", "Desc", CALLBACK)
    shown = f"{app!r} {app} {request!r} {request}"
    for secret in ("consumer-key-abc", "consumer-secret-xyz", "passkey-123", "254712345678", "s3cr3t-path-token"):
        assert secret not in shown
    assert app.key_id in shown and "gateway.example.com" in shown


def test_credentials_must_be_complete():
    with pytest.raises(ValueError):
        AppCredentials("key", "", "passkey")
    with pytest.raises(ValueError):
        AppCredentials("key:with:colon", "secret", "passkey")
