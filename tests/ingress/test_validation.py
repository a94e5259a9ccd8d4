"""Pure validation of payment requests (no broker, no database): phone forms, lengths, amounts,
metadata, unknown fields, Idempotency-Key syntax and the canonical digest."""
from __future__ import annotations

import pytest

from services.common.payment import (
    AMOUNT_MAX as MAX_AMOUNT,
    normalise_phone,
    parse_payment_request,
    validate_channel_id,
)
from services.ingress.validation import parse_idempotency_key


def body(**changes):
    base = {"channelId": "shop-1", "amount": 100, "phone": "0712345678", "accountReference": "INV-1"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def errors_of(b, **kwargs) -> dict[str, str]:
    request, errors = parse_payment_request(b, **kwargs)
    assert (request is None) == bool(errors)
    return errors


@pytest.mark.parametrize("raw, expected", [
    ("0712345678", "254712345678"),
    ("0112345678", "254112345678"),
    ("712345678", "254712345678"),
    ("112345678", "254112345678"),
    ("254712345678", "254712345678"),
    ("254112345678", "254112345678"),
    ("+254712345678", "254712345678"),
    ("+254112345678", "254112345678"),
    ("00254712345678", "254712345678"),
    ("0712 345 678", "254712345678"),
    ("0712-345-678", "254712345678"),
    ("+254 712 345 678", "254712345678"),
    ("+254 (0)712 345 678", "254712345678"),
    ("2540712345678", "254712345678"),
    ("(0712) 345.678", "254712345678"),
    ("  0712345678 ", "254712345678"),
])
def test_common_kenyan_forms_normalise_to_twelve_digits(raw, expected):
    assert normalise_phone(raw) == expected


@pytest.mark.parametrize("raw", [
    "", "0812345678", "0212345678", "071234567", "07123456789", "25471234567", "2547123456789",
    "+255712345678", "255712345678", "+0712345678", "0712345678x", "07l2345678", "254 0 0712345678",
    "0" * 40, "+", "254",
])
def test_other_numbers_are_refused(raw):
    assert normalise_phone(raw) is None
    assert "phone" in errors_of(body(phone=raw))


@pytest.mark.parametrize("value", [712345678, None, ["0712345678"], True])
def test_phone_must_be_a_string(value):
    assert "phone" in errors_of(body(phone=value))


def test_a_valid_request_is_normalised():
    request, errors = parse_payment_request(body(phone="+254 712 345 678", description="Shoes", orderReference="o-1",
                                                 metadata={"cart": "7"}))
    assert errors == {} and request is not None
    assert request.phone == "254712345678"
    assert (request.channel_id, request.amount, request.account_reference) == ("shop-1", 100, "INV-1")
    assert (request.description, request.order_reference, request.metadata) == ("Shoes", "o-1", {"cart": "7"})


@pytest.mark.parametrize("amount", [1, 250_000])
def test_amount_limits_are_inclusive(amount):
    assert errors_of(body(amount=amount)) == {}


@pytest.mark.parametrize("amount, reason", [
    (0, "between"), (-5, "between"), (250_001, "between"), (10.5, "whole number"), (10.0, "whole number"),
    (1e3, "whole number"), ("100", "whole number"), (True, "whole number"), (False, "whole number"),
    (None, "required"), ([100], "whole number"), ({"value": 1}, "whole number"),
])
def test_amount_must_be_a_whole_number_of_shillings_in_range(amount, reason):
    assert reason in errors_of(body(amount=amount))["amount"]


def test_amount_missing_is_required():
    assert errors_of(body(amount=...))["amount"] == "is required"


def test_channel_limit_lowers_the_maximum():
    assert errors_of(body(amount=5000), max_amount=5000) == {}
    assert "between 1 and 5000" in errors_of(body(amount=5001), max_amount=5000)["amount"]
    assert MAX_AMOUNT == 250_000


@pytest.mark.parametrize("reference, ok", [
    ("A" * 12, True), ("A" * 13, False), ("INV 42-A", True), ("", False), ("   ", False), ("INV#42", False),
    ("INV@1", False), ("INV&1", False), ("Füße", False), (42, False),
])
def test_account_reference_is_at_most_twelve_safe_characters(reference, ok):
    assert ("accountReference" not in errors_of(body(accountReference=reference))) is ok


def test_account_reference_is_required():
    assert errors_of(body(accountReference=...))["accountReference"] == "is required"


@pytest.mark.parametrize("description, ok", [
    ("D" * 13, True), ("D" * 14, False), (None, True), ("", False), ("Shoes & bags", False), (13, False),
])
def test_description_is_optional_and_at_most_thirteen_characters(description, ok):
    assert ("description" not in errors_of(body(description=description))) is ok


@pytest.mark.parametrize("order_reference, ok", [
    ("ord/2024#17", True), ("o" * 128, True), ("o" * 129, False), ("", False), (17, False), (None, True),
])
def test_order_reference_is_free_text_up_to_128(order_reference, ok):
    assert ("orderReference" not in errors_of(body(orderReference=order_reference))) is ok


@pytest.mark.parametrize("metadata, ok", [
    ({}, True), (None, True), ({"k": "v"}, True), ({f"k{i}": "v" for i in range(20)}, True),
    ({f"k{i}": "v" for i in range(21)}, False), ({"k": 1}, False), ({"k": None}, False), ({"k": ["v"]}, False),
    ({"k" * 64: "v"}, True), ({"k" * 65: "v"}, False), ({"": "v"}, False), ({"k": "v" * 256}, True),
    ({"k": "v" * 257}, False), (["k", "v"], False), ("k=v", False),
])
def test_metadata_is_a_small_map_of_strings(metadata, ok):
    assert ("metadata" not in errors_of(body(metadata=metadata))) is ok


@pytest.mark.parametrize("channel_id, ok", [
    ("shop-1", True), ("a", True), ("a" * 64, True), ("a" * 65, False), ("Shop", False), ("-shop", False),
    ("shop 1", False), ("", False), (None, False), (7, False),
])
def test_channel_id_rules(channel_id, ok):
    assert (validate_channel_id(channel_id) is None) is ok


def test_unknown_fields_are_refused_by_name():
    errors = errors_of(body(acountReference="INV-1"))
    assert errors["acountReference"].startswith("is not a field")


def test_every_invalid_field_is_reported_at_once():
    errors = errors_of({"channelId": "Bad!", "amount": 1.5, "phone": "123", "description": "x" * 20})
    assert set(errors) == {"channelId", "amount", "phone", "accountReference", "description"}


@pytest.mark.parametrize("not_an_object", [[], "text", 5, None, True])
def test_body_must_be_an_object(not_an_object):
    assert errors_of(not_an_object) == {"body": "must be a JSON object"}


@pytest.mark.parametrize("raw, key", [
    ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    ("k", "k"), ("x" * 255, "x" * 255), ("order:17/attempt", "order:17/attempt"),
])
def test_idempotency_key_accepts_bare_and_quoted_forms(raw, key):
    assert parse_idempotency_key(raw) == (key, None)


@pytest.mark.parametrize("raw", [None, "", "x" * 256, "has space", "tab\there", "é-key", '""'])
def test_idempotency_key_refuses_missing_long_or_odd_values(raw):
    key, error = parse_idempotency_key(raw)
    assert key is None and error


def test_digest_ignores_spelling_but_not_meaning():
    def digest(**changes):
        request, _ = parse_payment_request(body(**changes))
        assert request is not None
        return request.digest()

    assert digest(phone="0712345678") == digest(phone="+254 712 345 678")
    assert digest(metadata={"a": "1", "b": "2"}) == digest(metadata={"b": "2", "a": "1"})
    assert digest(metadata={}) == digest()
    assert digest() != digest(amount=101)
    assert digest() != digest(phone="0712345679")
    assert digest() != digest(description="Shoes")
    assert digest(orderReference="a") != digest(orderReference="b")
    assert digest(metadata={"a": "1"}) != digest(metadata={"a": "2"})
    assert len(digest()) == 32
