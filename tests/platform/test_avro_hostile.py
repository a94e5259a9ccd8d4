"""The Avro decoder against a hostile producer: whatever the bytes, a record that re-encodes to
exactly those bytes, or DecodeError, and nothing else (no other exception, no unbounded loop)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from services.common.avro import (
    MESSAGE_BYTES_MAX,
    Codec,
    DecodeError,
    load_schema,
)
from services.common.topics import Topic
from tests.platform.test_schemas import SCHEMA_NAMES, load_sample

CODEC = Codec()  # hypothesis does not mix with function-scoped fixtures; the codec holds no state
SAMPLES = {name: CODEC.encode(Topic(name, name), load_sample(name)) for name in SCHEMA_NAMES}
M = Topic("m", "m")  # the topic of codec_of's schema
HEADERS = [encoded[:10] for encoded in SAMPLES.values()]


def zigzag(n: int) -> bytes:
    """Avro's long encoding (spec: zig-zag, then base-128 varint, low group first)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def assert_decodes_to_itself_or_refuses(data: bytes) -> None:
    try:
        name, record = CODEC.decode(data)
    except DecodeError:
        return
    assert CODEC.encode(Topic(name, name), record) == data


def test_trailing_bytes_after_the_record_are_refused():
    with pytest.raises(DecodeError, match="3 bytes after the record"):
        CODEC.decode(SAMPLES["payment_requested"] + b"\x00\x00\x00")


def test_a_varint_padded_with_continuation_bytes_is_refused():
    # payment_requested begins with event_id, a string: its length 36 written in two bytes, not one.
    encoded = SAMPLES["payment_requested"]
    assert encoded[10] == 72  # zig-zag(36)
    padded = encoded[:10] + bytes([72 | 0x80, 0x00]) + encoded[11:]
    with pytest.raises(DecodeError, match="canonical"):
        CODEC.decode(padded)


def test_a_map_with_a_block_count_of_two_to_the_62_is_refused():
    # A record whose only interesting part is a map: the count claims 2**62 entries, the message has none.
    schema = {"type": "record", "name": "M", "fields": [{"name": "m", "type": {"type": "map", "values": "string"}}]}
    codec = codec_of(schema)
    with pytest.raises(DecodeError):
        codec.decode(codec.encode(M, {"m": {}})[:10] + zigzag(2**62))
    with pytest.raises(DecodeError):  # a negative count is followed by a byte size, also a lie here
        codec.decode(codec.encode(M, {"m": {}})[:10] + zigzag(-(2**62)) + zigzag(2**62))


def test_a_map_split_into_blocks_is_not_the_canonical_encoding():
    schema = {"type": "record", "name": "M", "fields": [{"name": "m", "type": {"type": "map", "values": "string"}}]}
    codec = codec_of(schema)
    header = codec.encode(M, {"m": {}})[:10]
    one_by_one = zigzag(1) + zigzag(1) + b"a" + zigzag(1) + b"x" + zigzag(1) + zigzag(1) + b"b" + zigzag(1) + b"y"
    with pytest.raises(DecodeError, match="canonical"):
        codec.decode(header + one_by_one + zigzag(0))
    assert codec.decode(header + zigzag(2) + zigzag(1) + b"a" + zigzag(1) + b"x" + zigzag(1) + b"b" + zigzag(1)
                        + b"y" + zigzag(0)) == ("m", {"m": {"a": "x", "b": "y"}})


def test_a_schema_with_zero_width_array_items_is_refused_when_loaded(tmp_path):
    path = tmp_path / "nulls.avsc"
    path.write_text(json.dumps({"type": "record", "name": "N", "fields": [
        {"name": "a", "type": {"type": "array", "items": "null"}}]}))
    with pytest.raises(ValueError, match="zero bytes"):
        load_schema(path)


def test_a_message_above_the_size_cap_is_refused_before_parsing():
    with pytest.raises(DecodeError, match="larger than"):
        CODEC.decode(SAMPLES["callback_raw"][:10] + b"\x00" * MESSAGE_BYTES_MAX)


@pytest.mark.parametrize("data", [
    None, "text, not bytes", b"", b"\xc3\x01" + b"\x00" * 8 + b"x",  # unknown fingerprint
    b"\x00\x00\x00\x00\x01abc",  # Confluent framing
    b"\xc3\x02" + b"\x00" * 20,  # wrong marker
])
def test_what_is_not_a_known_record_is_a_decode_error(data):
    with pytest.raises(DecodeError):
        CODEC.decode(data)


@pytest.mark.parametrize("change", ["truncated", "negative length", "bad utf-8", "length past the end"])
def test_corrupt_bodies_are_decode_errors(change):
    header, body = SAMPLES["payment_requested"][:10], SAMPLES["payment_requested"][10:]
    mutated = {  # the body begins with event_id, a string of 36 characters
        "truncated": body[:5],
        "negative length": zigzag(-5) + body[1:],
        "bad utf-8": zigzag(36) + b"\xff" * 36 + body[37:],
        "length past the end": zigzag(10**6) + body[1:],
    }[change]
    with pytest.raises(DecodeError):
        CODEC.decode(header + mutated)


def test_an_enum_index_out_of_range_is_a_decode_error():
    codec = codec_of({"type": "record", "name": "E", "fields": [
        {"name": "e", "type": {"type": "enum", "name": "S", "symbols": ["A", "B"]}}]})
    header = codec.encode(M, {"e": "A"})[:10]
    for index in (2, -1, 2**40):
        with pytest.raises(DecodeError):
            codec.decode(header + zigzag(index))


def test_a_timestamp_out_of_range_is_a_decode_error():
    codec = codec_of({"type": "record", "name": "T", "fields": [
        {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}}]})
    header = codec.encode(M, {"t": 0})[:10]
    with pytest.raises(DecodeError):
        codec.decode(header + zigzag(2**62))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_or_read_exactly(data):
    assert_decodes_to_itself_or_refuses(data)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(HEADERS), st.binary(max_size=300))
def test_arbitrary_bodies_behind_a_known_header_are_refused_or_read_exactly(header, body):
    assert_decodes_to_itself_or_refuses(header + body)


@st.composite
def mutated_samples(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(list(SAMPLES.values()))))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut", "append", "big varint"]))
        if kind == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "cut":
            del data[at:]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=8))
        elif kind == "big varint":
            data[at:at] = zigzag(draw(st.sampled_from([2**31, 2**62, -(2**62), -1, 2**63 - 1, -(2**63)])))
    return bytes(data)


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_samples())
def test_mutated_messages_are_refused_or_read_exactly(data):
    assert_decodes_to_itself_or_refuses(data)


def codec_of(schema: dict) -> Codec:
    """A codec whose only schema is `schema`, under the name "m"."""
    with tempfile.TemporaryDirectory() as schema_dir:
        (Path(schema_dir) / "m.avsc").write_text(json.dumps(schema))
        return Codec(Path(schema_dir))
