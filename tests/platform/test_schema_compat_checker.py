"""The compatibility check (Apache Avro's checker, tests/schema_compat.py) refuses what breaks readers, with
Avro's reason, and lets through what doesn't. Each case is a throwaway writer/reader pair, and fastavro, which
our consumers read with, is asked too: a change refused must be one it fails to read."""
from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from tests.schema_compat import backward_compatibility_errors

WRITER: dict[str, Any] = {
    "type": "record", "name": "Thing", "namespace": "compat.test",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "state", "type": {"type": "enum", "name": "State", "symbols": ["Open", "Closed"]}},
        {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 4}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "count", "type": "int"},
    ],
}
RECORD = {"id": "t-1", "state": "Closed", "digest": b"\x00\x01\x02\x03", "at": 1_700_000_000_000, "note": None,
          "count": 7}


def changed(edit: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    schema = copy.deepcopy(WRITER)
    edit(schema)
    return schema


def field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


def read_with(reader: dict[str, Any]) -> dict[str, Any]:
    """RECORD written with WRITER, read with `reader`, as a consumer would."""
    buffer = io.BytesIO()
    schemaless_writer(buffer, parse_schema(WRITER), RECORD)
    buffer.seek(0)
    return schemaless_reader(buffer, parse_schema(WRITER), parse_schema(reader))  # type: ignore[return-value]


BREAKING = {
    "record renamed without an alias": (lambda s: s.update(name="Item"),
                                        "name_mismatch at /name: expected: compat.test.Thing"),
    "enum renamed": (lambda s: field(s, "state")["type"].update(name="Status"),
                     "name_mismatch at /fields/1/type/name: expected: compat.test.State"),
    "fixed size changed": (lambda s: field(s, "digest")["type"].update(size=8),
                           "fixed_size_mismatch at /fields/2/type/size: expected: 4, found: 8"),
    "fixed renamed": (lambda s: field(s, "digest")["type"].update(name="Hash"),
                      "name_mismatch at /fields/2/type/name: expected: compat.test.Digest"),
    "enum symbol removed": (lambda s: field(s, "state")["type"].update(symbols=["Open"]),
                            "missing_enum_symbols at /fields/1/type/symbols: {'Closed'}"),
    "new field without a default": (lambda s: s["fields"].append({"name": "fee", "type": "long"}),
                                    "reader_field_missing_default_value at /fields/6: fee"),
    "type changed": (lambda s: field(s, "id").update(type="long"),
                     "type_mismatch at /fields/0/type: reader type: long not compatible with writer type: string"),
    "optional made required": (lambda s: field(s, "note").update(type="string", default=""),
                               # Avro's Python checker loses the location of a writer union's branch: "/".
                               "type_mismatch at /: reader type: string not compatible with writer type: null"),
}


@pytest.mark.parametrize("edit, reason", BREAKING.values(), ids=BREAKING.keys())
def test_a_breaking_change_fails_with_the_checkers_reason(edit, reason):
    reader = changed(edit)
    assert backward_compatibility_errors(WRITER, reader) == [reason]
    with pytest.raises(Exception, match="mismatch|not found|size|No default"):  # fastavro agrees: it cannot read
        read_with(reader)


def test_a_renamed_record_with_the_old_name_as_alias_is_compatible():
    reader = changed(lambda s: s.update(name="Item", aliases=["compat.test.Thing"]))
    assert backward_compatibility_errors(WRITER, reader) == []
    assert read_with(reader)["id"] == "t-1"


def test_a_changed_logical_type_is_refused():
    # Avro's checker compares underlying types only; the project rule adds this (tests/schema_compat.py says why).
    reader = changed(lambda s: field(s, "at").update(type={"type": "long", "logicalType": "timestamp-micros"}))
    assert backward_compatibility_errors(WRITER, reader) == [
        "logical type of /at (long) changed from timestamp-millis to timestamp-micros"]


COMPATIBLE = {
    "optional field added": lambda s: s["fields"].append({"name": "fee", "type": ["null", "long"], "default": None}),
    "field removed": lambda s: s["fields"].remove(field(s, "note")),
    "enum symbol added": lambda s: field(s, "state")["type"]["symbols"].append("Archived"),
    "int promoted to long": lambda s: field(s, "count").update(type="long"),
    "doc changed": lambda s: field(s, "id").update(doc="changed wording"),
    "required made optional": lambda s: field(s, "id").update(type=["null", "string"], default=None),
}


@pytest.mark.parametrize("edit", COMPATIBLE.values(), ids=COMPATIBLE.keys())
def test_a_compatible_change_passes_and_reads(edit):
    reader = changed(edit)
    assert backward_compatibility_errors(WRITER, reader) == []
    assert read_with(reader)["digest"] == RECORD["digest"]
