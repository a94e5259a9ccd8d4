"""body.py: the gateway's one look at a callback body. Pure: no broker, no database.

The property tests compare `is_bounded_json_object` with a plain reading of its contract (decode,
parse, walk the result), on any bytes and on JSON-like text built to hit the edges.
"""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from services.common.json_bounds import nesting_exceeds
from services.webhook_consumer.body import MAX_NESTING_DEPTH, is_bounded_json_object

DARAJA_SUCCESS = (b'{"Body":{"stkCallback":{"MerchantRequestID":"29115-34620561-1","CheckoutRequestID":'
                  b'"ws_CO_191220191020363925","ResultCode":0,"ResultDesc":"The service request is processed '
                  b'successfully.","CallbackMetadata":{"Item":[{"Name":"Amount","Value":1.00},{"Name":'
                  b'"MpesaReceiptNumber","Value":"NLJ7RT61SV"},{"Name":"Balance"},{"Name":"TransactionDate",'
                  b'"Value":20191219102115},{"Name":"PhoneNumber","Value":254708374149}]}}}}')


def nested(depth: int, inner: bytes = b"1") -> bytes:
    """An object `depth` containers deep: {"a":[[...inner...]]}."""
    return b'{"a":' + b"[" * (depth - 1) + inner + b"]" * (depth - 1) + b"}"


def reference(body: bytes) -> bool:
    """The contract read plainly: UTF-8 (a BOM allowed), JSON, an object, depth <= 32, finite numbers."""
    try:
        text = body.decode("utf-8-sig")
        value = json.loads(text, parse_constant=_reject)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and _depth_and_finite(value)


def _reject(name: str):
    raise ValueError(name)


def _depth_and_finite(value) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, (dict, list)):
            if depth > MAX_NESTING_DEPTH:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


@pytest.mark.parametrize("body", [
    DARAJA_SUCCESS,
    b'{"Body": {"stkCallback": {"ResultCode": "SFC_IC0003"}}}\r\n',  # content is not judged
    b"{}",
    b' \t\n{"a": -0.0, "b": 1e308, "c": null, "d": [true, false]}',
    b'\xef\xbb\xbf{"a": 1}',  # a UTF-8 byte order mark may be ignored (RFC 8259 8.1)
    '{"ResultDesc": "Request cancelled by user \u00e9\u20ac"}'.encode(),
    b'{"a": "\\ud800"}',  # an escaped lone surrogate is still JSON; its reader must cope
    b'{"a": "' + b"[" * 10_000 + b'"}',  # brackets in a string are not nesting
    nested(MAX_NESTING_DEPTH),
])
def test_accepted_bodies(body):
    assert is_bounded_json_object(body)


@pytest.mark.parametrize("body", [
    b"", b"   ", b"null", b"1", b'"a string"', b"[]", b'[{"Body": {}}]',  # not an object
    b"{", b'{"a": 1', b'{"a": 1}}', b'{"a": 1} {"b": 2}', b"{'a': 1}", b'{"a": 01}', b'{"a": "\x01"}',  # not JSON
    b'\x00\xffthis is not json', b'{"a": "\xff"}', b'{"a": "\xed\xa0\x80"}', b'{"a": "\xc0\xaf"}',  # not UTF-8
    '{"a": 1}'.encode("utf-16"), '{"a": 1}'.encode("utf-32"),  # JSON, but not in UTF-8
    b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": 1e999}', b'{"a": -1e400}',  # not finite
    nested(MAX_NESTING_DEPTH + 1), nested(100_000, b""), b"{" * 65_536, b'{"a":' + b"[" * 65_000,  # too deep
    b'{"a": ' + b"1" * 5000 + b"}",  # beyond Python's int digits limit
])
def test_refused_bodies(body):
    assert not is_bounded_json_object(body)


def test_nesting_is_counted_outside_strings_only_and_escapes_are_followed():
    assert not nesting_exceeds(b'{"a": "\\"[[[[[[[[[["}', 5)
    assert nesting_exceeds(b'{"a": "\\\\", "b": [[[[[[[[[[]]]]]]]]]]}', 5)
    assert nesting_exceeds(b'{"a": [[[[[', 5)  # unbalanced: a parser would go this deep before failing
    assert not nesting_exceeds(b'{"a": [' + b"[]," * 20_000 + b"[]]}", 5)  # many brackets, shallow


JSON_TOKENS = st.sampled_from(['{', '}', '[', ']', '"', '\\', ':', ',', ' ', '0', '1.5', '-', 'e', '1e999',
                               'NaN', 'Infinity', 'true', 'null', '"a"', '"\\"', '"\\\\"', '\\u0041', '\xe9'])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=40)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.one_of(st.binary(max_size=200), st.lists(JSON_TOKENS, max_size=60).map(lambda t: "".join(t).encode())))
def test_any_bytes_are_accepted_only_when_a_bounded_json_object_and_never_raise(body):
    assert is_bounded_json_object(body) == reference(body)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(JSON_VALUES, st.integers(min_value=0, max_value=40))
def test_any_json_value_wrapped_to_any_depth_is_judged_by_its_depth(value, wraps):
    body = ("[" * wraps + json.dumps(value) + "]" * wraps)
    body = ('{"Body": ' + body + "}").encode()  # the top level is always an object here
    assert is_bounded_json_object(body) == reference(body)
