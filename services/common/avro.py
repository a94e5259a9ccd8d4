"""Avro codec: single-object encoding, so every message names its own schema.

Spec (Avro 1.11, "Single object encoding"): marker C3 01, then the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's parsing canonical form, then the binary body.
fastavro's fingerprint() already returns those 8 bytes in that order (verified against the
spec's value for "int": 8f5c393f1ad57572).

Whatever a producer sends, `decode` returns a record or raises DecodeError, and what it returns is
exactly what `encode` would have written for that record. fastavro's `schemaless_reader` alone
does not promise that (fastavro 1.13, fastavro/_read.pyx and the reader docs,
https://fastavro.readthedocs.io/en/latest/reader.html#fastavro._read_py.schemaless_reader):
- it reads one record and stops, leaving any trailing bytes unread and unreported;
- it raises whatever the failing step raises (EOFError, IndexError, StopIteration from the Cython
  read_long at end of input, UnicodeDecodeError, KeyError/IndexError for an enum or union index out
  of range, OverflowError for a timestamp out of range...);
- it accepts encodings no Avro writer produces: a varint padded with 0x80 bytes, a boolean byte other
  than 0 or 1, a map split into several blocks or with a negative count and byte size;
- it believes a block count: it loops `count` times, reading one item each time.
So `decode` caps the message size first, maps every failure to DecodeError, and re-encodes the record
and compares: trailing bytes and non-canonical encodings are refused. The loop on a block count is
bounded because no item type of our schemas can be encoded in zero bytes (checked when a schema is
loaded): each item consumes at least one byte, so a message of MESSAGE_BYTES_MAX bytes yields at most
that many items, and a count of 2**62 ends at the end of the message with an error.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

# Package data (services/schemas links to the repository's schemas/), so an installed wheel carries it.
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
SINGLE_OBJECT_MARKER = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
# Kafka's default message.max.bytes (1048588) rounded down: a larger message was not sent through a
# default broker, so it is refused before any parsing.
MESSAGE_BYTES_MAX = 1024 * 1024


class DecodeError(ValueError):
    """The bytes are not a record this codec can read."""


@dataclass(frozen=True)
class Schema:
    name: str  # file stem, e.g. "payment_requested"
    parsed: dict[str, Any]
    fingerprint: bytes


def load_schema(path: Path) -> Schema:
    parsed = parse_schema(json.loads(path.read_text()))
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise ValueError(f"{path.name}: every event is a record, this schema is not one")
    _refuse_zero_width_items(parsed, path.name)
    canonical = to_parsing_canonical_form(parsed)
    return Schema(path.name.split(".")[0], parsed, bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")))


class Codec:
    """Writes the current version of each schema; reads the current and every historic one."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR):
        self.current = {s.name: s for s in map(load_schema, sorted(schema_dir.glob("*.avsc")))}
        historic = [load_schema(p) for p in sorted((schema_dir / "history").glob("*.avsc"))]
        self._writers = {s.fingerprint: s for s in [*historic, *self.current.values()]}

    def encode(self, schema_name: str, record: dict[str, Any]) -> bytes:
        schema = self.current[schema_name]
        out = io.BytesIO()
        out.write(SINGLE_OBJECT_MARKER + schema.fingerprint)
        schemaless_writer(out, schema.parsed, record)
        return out.getvalue()

    def decode(self, data: bytes | None) -> tuple[str, dict[str, Any]]:
        """Returns (schema name, record) read with the current version of the writer's schema.

        Raises DecodeError, and only DecodeError, for anything that is not exactly the encoding of
        one record of a known schema."""
        if isinstance(data, (bytearray, memoryview)):  # e.g. a bytea column read back
            data = bytes(data)
        if not isinstance(data, bytes) or len(data) < 10:
            raise DecodeError("message too short to be an Avro record")
        if len(data) > MESSAGE_BYTES_MAX:
            raise DecodeError(f"message of {len(data)} bytes is larger than {MESSAGE_BYTES_MAX}")
        if data[:1] == CONFLUENT_MAGIC:
            raise DecodeError("Confluent wire format needs a schema registry, none is configured")
        if data[:2] != SINGLE_OBJECT_MARKER:
            raise DecodeError("message does not start with the Avro single-object marker")
        writer = self._writers.get(data[2:10])
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {data[2:10].hex()}")
        reader = self.current[writer.name]
        body = data[10:]
        try:
            record = schemaless_reader(io.BytesIO(body), writer.parsed, None)
            canonical = _body(writer, record)
            if canonical == body and reader is not writer:  # an older version: resolve to the current one
                record = schemaless_reader(io.BytesIO(body), writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises many types on corrupt bodies (module docstring)
            raise DecodeError(f"corrupt {writer.name} body: {type(exc).__name__}") from exc
        assert isinstance(record, dict), "every schema is a record (load_schema)"
        if canonical != body:
            extra = len(body) - len(canonical)
            raise DecodeError(f"{writer.name} body has {extra} bytes after the record" if body.startswith(canonical)
                              else f"{writer.name} body is not in the canonical Avro encoding")
        return writer.name, record


def _body(schema: Schema, record: object) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, schema.parsed, record)
    return out.getvalue()


def _refuse_zero_width_items(schema: dict[str, Any], where: str) -> None:
    """Raises ValueError if an array's items can be encoded in zero bytes (null, an empty record, a
    fixed of size 0): a hostile block count would then make the reader loop without consuming input.
    A map's entries cannot: each has a key, whose length takes at least one byte."""
    named = schema.get("__named_schemas", {})  # fastavro's parse_schema: name -> definition
    for items in _array_items(schema, named, set()):
        if _can_be_empty(items, named, set()):
            raise ValueError(f"{where}: an array of items that take zero bytes cannot be read safely")


def _array_items(schema: Any, named: dict, seen: set[str]):
    if isinstance(schema, str):
        if schema in named and schema not in seen:
            seen.add(schema)
            yield from _array_items(named[schema], named, seen)
    elif isinstance(schema, list):
        for branch in schema:
            yield from _array_items(branch, named, seen)
    elif schema["type"] == "array":
        yield schema["items"]
        yield from _array_items(schema["items"], named, seen)
    elif schema["type"] == "map":
        yield from _array_items(schema["values"], named, seen)
    elif schema["type"] in ("record", "error"):
        for f in schema["fields"]:
            yield from _array_items(f["type"], named, seen)


def _can_be_empty(schema: Any, named: dict, seen: set[str]) -> bool:
    if isinstance(schema, str):
        if schema in named and schema not in seen:
            return _can_be_empty(named[schema], named, seen | {schema})
        return schema == "null"
    if isinstance(schema, list):  # a union writes its branch index: at least one byte
        return False
    if schema["type"] in ("record", "error"):
        return all(_can_be_empty(f["type"], named, seen) for f in schema["fields"])
    if schema["type"] == "fixed":
        return schema["size"] == 0
    return schema["type"] == "null"
