"""Avro codec: single-object encoding, so every message names its own schema.

Spec (Avro 1.11, "Single object encoding"): marker C3 01, then the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's parsing canonical form, then the binary body.
fastavro's fingerprint() already returns those 8 bytes in that order (verified against the
spec's value for "int": 8f5c393f1ad57572).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
SINGLE_OBJECT_MARKER = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"


class DecodeError(ValueError):
    """The bytes are not a record this codec can read."""


@dataclass(frozen=True)
class Schema:
    name: str  # file stem, e.g. "payment_requested"
    parsed: dict
    fingerprint: bytes


def load_schema(path: Path) -> Schema:
    parsed = parse_schema(json.loads(path.read_text()))
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
        """Returns (schema name, record) read with the current version of the writer's schema."""
        if not data or len(data) < 10:
            raise DecodeError("message too short to be an Avro record")
        if data[:1] == CONFLUENT_MAGIC:
            raise DecodeError("Confluent wire format needs a schema registry, none is configured")
        if data[:2] != SINGLE_OBJECT_MARKER:
            raise DecodeError("message does not start with the Avro single-object marker")
        writer = self._writers.get(data[2:10])
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {data[2:10].hex()}")
        reader = self.current[writer.name]
        try:
            record = schemaless_reader(io.BytesIO(data[10:]), writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError(f"corrupt {writer.name} body: {type(exc).__name__}") from exc
        return writer.name, record
