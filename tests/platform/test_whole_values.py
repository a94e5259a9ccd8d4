"""A pattern that must match a whole value matches all of it: in Python `re.match(r"^abc$")` also
matches "abc\\n" ($ matches before a final newline), so each field below took a trailing newline
until its check used fullmatch. Each case shows the valid value accepted and "valid\\n" refused."""
from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from services.channels.apikeys import key_id_of, new_api_key
from services.channels.model import parse_api_key_request, parse_credentials, parse_new_channel
from services.common.payment import normalise_phone, parse_payment_request
from services.daraja.models import Shortcode, StkPushRequest
from services.ingress.validation import parse_idempotency_key

PAYMENT = {"channelId": "shop-1", "amount": 100, "phone": "0712345678", "accountReference": "INV-1",
           "description": "Shoes", "orderReference": "order-17", "metadata": {"till": "3"}}
CHANNEL = {"channelId": "shop-1", "displayName": "Duka La Mama", "shortcodeType": "till",
           "businessShortcode": "174379", "tillNumber": "123456", "environment": "sandbox",
           "consentReference": "AGR-2024-001", "consentDate": "2024-05-01"}
CREDENTIALS = {"consumerKey": "ck123", "consumerSecret": "cs456", "passkey": "pk789"}
PUSH: dict[str, Any] = {"amount": 1, "phone": "254712345678", "account_reference": "INV-1", "description": "Shoes",
        "callback_url": "https://example.com/cb"}


def with_newline(body: dict, field: str) -> dict:
    return {**body, field: body[field] + "\n"}


@pytest.mark.parametrize("field", ["channelId", "phone", "accountReference", "description", "orderReference"])
def test_payment_request_fields(field):
    assert parse_payment_request(PAYMENT)[1] == {}
    assert field in parse_payment_request(with_newline(PAYMENT, field))[1]


def test_payment_metadata_key():
    assert "metadata" in parse_payment_request({**PAYMENT, "metadata": {"till\n": "3"}})[1]


def test_phone_normalisation():
    assert normalise_phone("0712345678") == "254712345678"
    assert normalise_phone("0712345678\n") is None
    assert normalise_phone("0712\t345678") is None


def test_idempotency_key():
    assert parse_idempotency_key("8e03978e-40d5") == ("8e03978e-40d5", None)
    assert parse_idempotency_key("8e03978e-40d5\n")[0] is None


@pytest.mark.parametrize("field", ["channelId", "displayName", "businessShortcode", "tillNumber",
                                   "consentReference"])
def test_channel_fields(field):
    today = date(2024, 6, 1)
    assert parse_new_channel(CHANNEL, today)[1] == {}
    assert field in parse_new_channel(with_newline(CHANNEL, field), today)[1]


@pytest.mark.parametrize("field", ["consumerKey", "consumerSecret", "passkey"])
def test_channel_secrets(field):
    assert parse_credentials(CREDENTIALS)[1] == {}
    assert field in parse_credentials(with_newline(CREDENTIALS, field))[1]


def test_api_key_request_fields():
    assert parse_api_key_request({"label": "shop", "channelIds": ["shop-1"]})[1] == {}
    assert "label" in parse_api_key_request({"label": "shop\n", "channelIds": ["shop-1"]})[1]
    assert "channelIds" in parse_api_key_request({"label": "shop", "channelIds": ["shop-1\n"]})[1]


def test_api_key_format():
    key_id, api_key = new_api_key()
    assert key_id_of(api_key) == key_id
    assert key_id_of(api_key + "\n") is None


@pytest.mark.parametrize("field", ["phone", "account_reference", "description"])
def test_daraja_push_request_fields(field):
    StkPushRequest(**PUSH)
    with pytest.raises(ValueError):
        StkPushRequest(**with_newline(PUSH, field))


def test_daraja_shortcodes():
    Shortcode("174379", "till", "123456")
    with pytest.raises(ValueError):
        Shortcode("174379\n")
    with pytest.raises(ValueError):
        Shortcode("174379", "till", "123456\n")
