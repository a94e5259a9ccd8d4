"""Property tests: whatever body is posted to a callback URL, the parser answers a ParsedCallback or
CallbackParseError and nothing else, and the decision on what it parsed does not raise either. Any
other exception used to stop the ledger's partition (issue #11)."""
from __future__ import annotations

import json
from decimal import Decimal

from hypothesis import HealthCheck, example, given, settings, strategies as st

from services.ledger import state_machine as sm
from services.ledger.callbacks import CallbackParseError, ParsedCallback, parse_callback
from tests.ledger.callbacks import failure, success

BUDGET = settings(max_examples=300, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PAYMENTS = [sm.Payment(state, 100, "254712345678", checkout, receipt, code)
            for state, checkout, receipt, code in [("Requested", None, None, None), ("Pending", "ws_CO_1", None, None),
                                                   ("Settled", "ws_CO_1", "NLJ7RT61SV", "0"),
                                                   ("Cancelled", "ws_CO_1", None, "1032")]]

# Every character, lone surrogates and NUL included (json.dumps writes them as \ud800 and \u0000).
any_text = st.text(st.characters(exclude_categories=()), max_size=30)
numbers = st.one_of(
    st.integers(), st.integers(min_value=10 ** 30, max_value=10 ** 300), st.integers(max_value=-10 ** 30),
    st.floats(allow_nan=True, allow_infinity=True), st.decimals(allow_nan=True, allow_infinity=True).map(str))
number_like_text = st.sampled_from(["NaN", "sNaN", "-sNaN", "Infinity", "-Infinity", "inf", "1e999", "1E+2", " 100",
                                    "100.00", "1_000", "0x10", "１００", "-0", "1e-999", "9" * 5000])
scalars = st.one_of(st.none(), st.booleans(), numbers, any_text, number_like_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)
DEEP = "\x00deep\x00"  # a placeholder replaced by deep nesting once serialised
deep_or_value = st.one_of(json_values, st.just(DEEP))
item = st.fixed_dictionaries({"Name": st.sampled_from(["Amount", "MpesaReceiptNumber", "TransactionDate",
                                                       "PhoneNumber", "Balance"]) | any_text},
                             optional={"Value": deep_or_value})
callback_docs = st.fixed_dictionaries({"Body": st.fixed_dictionaries({"stkCallback": st.fixed_dictionaries(
    {}, optional={"MerchantRequestID": deep_or_value, "CheckoutRequestID": st.just("ws_CO_1") | deep_or_value,
                  "ResultCode": st.sampled_from([0, 1032, "0", "SFC_IC0003"]) | deep_or_value,
                  "ResultDesc": deep_or_value,
                  "CallbackMetadata": st.fixed_dictionaries({}, optional={"Item": st.lists(item, max_size=6)
                                                                          | deep_or_value})
                                      | deep_or_value})})})


def render(doc, depth: int) -> bytes:
    text = json.dumps(doc, allow_nan=True)  # NaN and Infinity, as json.loads accepts them
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth).encode()


def assert_refused_or_read(body) -> None:
    try:
        parsed = parse_callback(body)
    except CallbackParseError as refused:
        assert str(refused).isprintable()
        return
    assert isinstance(parsed, ParsedCallback)
    assert parsed.amount is None or parsed.amount.is_finite()
    for text in (parsed.checkout_request_id, parsed.result_code, parsed.result_desc, parsed.receipt, parsed.phone):
        if text is not None:
            text.encode("utf-8")  # storable as it is: no lone surrogate...
            assert "\x00" not in text  # ...and no NUL
    for payment in PAYMENTS:
        sm.decide(payment, sm.CallbackReceived(parsed))  # a Decimal('sNaN') amount raised here


@BUDGET
@given(st.binary(max_size=4000))
@example(b"[" * 60_000)
@example(b'{"Body": {"stkCallback": {"CheckoutRequestID": "x", "ResultCode": 0, "Amount": NaN}}}')
def test_any_bytes(body):
    assert_refused_or_read(body)


@BUDGET
@given(callback_docs, st.integers(min_value=0, max_value=40_000))
def test_any_document_in_the_shape_of_a_callback(doc, depth):
    assert_refused_or_read(render(doc, depth))


@BUDGET
@given(st.sampled_from([success("ws_CO_1"), success("ws_CO_1", amount_as_string=True), failure("ws_CO_1", 1032)]),
       st.integers(min_value=0, max_value=600), st.binary(min_size=1, max_size=40), st.integers(0, 40))
def test_a_genuine_body_with_hostile_bytes_spliced_in(genuine, at, spliced, cut):
    at = min(at, len(genuine))
    assert_refused_or_read(genuine[:at] + spliced + genuine[at + cut:])


@BUDGET
@given(json_values)
def test_any_amount_is_a_finite_decimal_or_refused(amount):
    body = json.loads(success("ws_CO_1"))
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][0]["Value"] = amount
    try:
        parsed = parse_callback(json.dumps(body, allow_nan=True).encode())
    except CallbackParseError:
        return
    assert parsed.amount is None or (parsed.amount.is_finite() and parsed.amount == Decimal(str(amount)))


@BUDGET
@given(st.integers(min_value=1, max_value=250_000), st.booleans(), st.from_regex(r"[A-Z0-9]{10}", fullmatch=True),
       st.integers(min_value=254700000000, max_value=254799999999))
def test_every_genuine_success_shape_is_still_read(amount, as_string, receipt, phone):
    parsed = parse_callback(success("ws_CO_1", amount=amount, receipt=receipt, phone=phone, amount_as_string=as_string))
    assert (parsed.amount, parsed.receipt, parsed.phone, parsed.succeeded) == (
        Decimal(amount), receipt, str(phone), True)
