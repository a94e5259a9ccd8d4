"""Backward compatibility of two schema versions: can a reader with the new one read what the old one wrote?

Apache Avro's own checker decides (`avro.compatibility`, the Python port of Java's
org.apache.avro.SchemaCompatibility, the rules a schema registry applies); its reasons are returned as
they are. One project rule is added on top (schemas/README.md): a logical type never changes. Neither
Avro checker looks at logical types, so timestamp-millis -> timestamp-micros passes both, and then the
same bytes mean two times: fastavro converts with the writer's logical type, Java's GenericDatumReader
with the reader's, 1000 times smaller (docs/schema-compatibility.md).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType


def backward_compatibility_errors(writer: dict[str, Any], reader: dict[str, Any]) -> list[str]:
    """Why `reader` cannot read data written with `writer`; empty when it can."""
    parsed_writer, parsed_reader = avro.schema.parse(json.dumps(writer)), avro.schema.parse(json.dumps(reader))
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader=parsed_reader, writer=parsed_writer)
    errors = []
    if result.compatibility is SchemaCompatibilityType.incompatible:
        kinds = ", ".join(sorted({kind.value for kind in result.incompatibilities}))
        where = ", ".join(sorted(result.locations - {"/"}) or result.locations)
        errors.append(f"{kinds} at {where}: {'; '.join(sorted(result.messages))}")
    return errors + _logical_type_changes(parsed_writer, parsed_reader)


def _logical_type_changes(writer: avro.schema.Schema, reader: avro.schema.Schema) -> list[str]:
    written = dict(_logical_types(writer, ""))
    return [f"logical type of {path or '/'} ({kind}) changed from {written[path, kind]} to {logical}"
            for (path, kind), logical in _logical_types(reader, "")
            if (path, kind) in written and written[path, kind] != logical]


def _logical_types(schema: avro.schema.Schema, path: str,
                   seen: frozenset[str] = frozenset()) -> Iterator[tuple[tuple[str, str], str | None]]:
    """((field path, underlying type), logical type or None) for every value a schema can hold."""
    if isinstance(schema, avro.schema.UnionSchema):
        for branch in schema.schemas:
            yield from _logical_types(branch, path, seen)
    elif isinstance(schema, avro.schema.RecordSchema):
        if schema.fullname not in seen:  # a recursive record is walked once
            for field in schema.fields:
                yield from _logical_types(field.type, f"{path}/{field.name}", seen | {schema.fullname})
    elif isinstance(schema, avro.schema.ArraySchema):
        yield from _logical_types(schema.items, f"{path}/items", seen)
    elif isinstance(schema, avro.schema.MapSchema):
        yield from _logical_types(schema.values, f"{path}/values", seen)
    else:
        logical = schema.props.get("logicalType")
        yield (path, schema.type), logical if isinstance(logical, str) else None
