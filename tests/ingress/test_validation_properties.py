"""Property tests of the ingress validator: whatever JSON arrives, it returns a clean request or errors
by field and raises nothing; whatever it accepts keeps the documented rules; genuine requests in
every spelling the API documents are accepted."""
from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings, strategies as st

from services.common.payment import (
    AMOUNT_MAX as MAX_AMOUNT,
    FIELDS,
    METADATA_ENTRIES_MAX,
    METADATA_KEY_LENGTH_MAX,
    METADATA_VALUE_LENGTH_MAX,
    ORDER_REFERENCE_LENGTH_MAX,
    PaymentRequest,
    event_problem,
    normalise_phone,
    parse_payment_request,
)
from services.ingress.validation import parse_idempotency_key

BUDGET = settings(max_examples=400, deadline=None, derandomize=True)
any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # controls and lone surrogates included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text
    | st.sampled_from(["0712345678", "INV-1", "shop-1", "Shoes", "INV-1\n", "\u0000", "\ud800", "+254 712 345 678"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=10)
VALID = {"channelId": "shop-1", "amount": 100, "phone": "0712345678", "accountReference": "INV-1",
         "description": "Shoes", "orderReference": "order-17", "metadata": {"till": "3"}}
nearly_valid = st.dictionaries(st.sampled_from([*FIELDS, "acountReference"]), json_values, min_size=1, max_size=3)\
    .map(lambda change: {**VALID, **change})
bodies = json_values | nearly_valid | st.dictionaries(st.sampled_from(FIELDS) | any_text, json_values, max_size=8)

PROMPT_TEXT = re.compile(r"[A-Za-z0-9 -]+")
CHANNEL_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
HIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def assert_keeps_the_rules(request: PaymentRequest, max_amount: int) -> None:
    assert CHANNEL_ID.fullmatch(request.channel_id)
    assert type(request.amount) is int and 1 <= request.amount <= max_amount
    assert re.fullmatch(r"254[17]\d{8}", request.phone)
    assert PROMPT_TEXT.fullmatch(request.account_reference) and len(request.account_reference) <= 12
    assert request.account_reference.strip()
    assert request.description is None or (PROMPT_TEXT.fullmatch(request.description)
                                           and len(request.description) <= 13 and request.description.strip())
    assert request.order_reference is None or (1 <= len(request.order_reference) <= ORDER_REFERENCE_LENGTH_MAX
                                               and not HIDDEN.search(request.order_reference))
    assert isinstance(request.metadata, dict) and len(request.metadata) <= METADATA_ENTRIES_MAX
    for key, value in request.metadata.items():
        assert 1 <= len(key) <= METADATA_KEY_LENGTH_MAX and not HIDDEN.search(key)
        assert isinstance(value, str) and len(value) <= METADATA_VALUE_LENGTH_MAX
        assert "\x00" not in value and not re.search(r"[\ud800-\udfff]", value)
    # Everything accepted can be stored and published: UTF-8 encodable, no NUL.
    for text in (request.account_reference, request.description or "", request.order_reference or "",
                 *request.metadata, *request.metadata.values()):
        text.encode("utf-8")
    # And the STK worker, which checks events produced straight to the topic, agrees.
    assert event_problem({"channel_id": request.channel_id, "amount": request.amount, "phone": request.phone,
                          "account_reference": request.account_reference, "description": request.description,
                          "order_reference": request.order_reference, "metadata": request.metadata}) is None


@BUDGET
@given(bodies, st.integers(1, MAX_AMOUNT))
def test_any_body_gets_a_clean_request_or_field_errors(body, max_amount):
    request, errors = parse_payment_request(body, max_amount)
    if request is None:
        assert errors and all(isinstance(k, str) and isinstance(v, str) and v for k, v in errors.items())
        assert all(k.isprintable() and len(k) <= 65 for k in errors)  # field names echo what was sent, cleaned
    else:
        assert errors == {}
        assert_keeps_the_rules(request, max_amount)


@BUDGET
@given(any_text)
def test_any_phone_text_normalises_to_twelve_digits_or_nothing(raw):
    phone = normalise_phone(raw)
    assert phone is None or re.fullmatch(r"254[17]\d{8}", phone)


@BUDGET
@given(st.none() | any_text)
def test_any_idempotency_key_is_a_visible_ascii_key_or_an_error(raw):
    key, error = parse_idempotency_key(raw)
    assert (key is None) != (error is None)
    assert key is None or re.fullmatch(r"[\x21-\x7e]{1,255}", key)


subscriber = st.from_regex(r"[17][0-9]{8}", fullmatch=True)
phone_spellings = st.tuples(st.sampled_from(["0{}", "{}", "254{}", "+254{}", "00254{}", "+254 (0){}", "2540{}"]),
                            subscriber, st.sampled_from(["", " ", "-", "."])).map(
    lambda t: t[0].format(t[2].join([t[1][:3], t[1][3:6], t[1][6:]])))
prompt_text = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 -]{0,11}", fullmatch=True)
required_fields: dict[str, st.SearchStrategy[Any]] = {
    "channelId": st.from_regex(r"[a-z0-9][a-z0-9_-]{0,63}", fullmatch=True), "amount": st.integers(1, MAX_AMOUNT),
    "phone": phone_spellings, "accountReference": prompt_text}
optional_fields: dict[str, st.SearchStrategy[Any]] = {
    "description": prompt_text.filter(lambda t: len(t) <= 13),
    "orderReference": st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")),
                              min_size=1, max_size=ORDER_REFERENCE_LENGTH_MAX),
    "metadata": st.dictionaries(st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")),
                                        min_size=1, max_size=METADATA_KEY_LENGTH_MAX),
                                st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                                        max_size=METADATA_VALUE_LENGTH_MAX),
                                max_size=METADATA_ENTRIES_MAX)}
genuine = st.fixed_dictionaries(required_fields, optional=optional_fields)


@BUDGET
@given(genuine)
def test_every_genuine_request_is_accepted(body):
    request, errors = parse_payment_request(body)
    assert errors == {} and request is not None
    assert request.phone == "254" + re.sub(r"\D", "", body["phone"])[-9:]
