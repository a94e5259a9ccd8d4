"""Avro backward-compatibility check (a reader with the new schema reads data written with the old),
following the schema-resolution rules of the Avro specification."""
from __future__ import annotations

from fastavro.schema import expand_schema

PROMOTIONS = {"int": {"long", "float", "double"}, "long": {"float", "double"}, "float": {"double"},
              "string": {"bytes"}, "bytes": {"string"}}


def backward_compatibility_errors(writer: dict, reader: dict) -> list[str]:
    return _check(expand_schema(writer), expand_schema(reader), reader.get("name", "record"))


def _kind(schema) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        return schema["type"] if isinstance(schema["type"], str) else _kind(schema["type"])
    return schema


def _logical(schema):
    return schema.get("logicalType") if isinstance(schema, dict) else None


def _check(writer, reader, path: str) -> list[str]:
    w, r = _kind(writer), _kind(reader)
    if w == "union":
        return [e for branch in writer for e in _check(branch, reader, path)]
    if r == "union":
        for branch in reader:
            if not _check(writer, branch, path):
                return []
        return [f"{path}: writer type {w} matches no branch of the reader's union"]
    if _logical(writer) != _logical(reader):
        return [f"{path}: logical type changed from {_logical(writer)} to {_logical(reader)}"]
    if w != r:
        return [] if r in PROMOTIONS.get(w, ()) else [f"{path}: type changed from {w} to {r}"]
    if w == "record":
        return _check_record(writer, reader, path)
    if w == "enum":
        missing = set(writer["symbols"]) - set(reader["symbols"])
        return [f"{path}: enum symbols {sorted(missing)} removed"] if missing and "default" not in reader else []
    if w == "array":
        return _check(writer["items"], reader["items"], f"{path}[]")
    if w == "map":
        return _check(writer["values"], reader["values"], f"{path}{{}}")
    if w == "fixed" and writer["size"] != reader["size"]:
        return [f"{path}: fixed size changed"]
    return []


def _check_record(writer: dict, reader: dict, path: str) -> list[str]:
    written = {f["name"]: f for f in writer["fields"]}
    for f in writer["fields"]:
        for alias in f.get("aliases", []):
            written.setdefault(alias, f)
    errors = []
    for field in reader["fields"]:
        names = [field["name"], *field.get("aliases", [])]
        source = next((written[n] for n in names if n in written), None)
        if source is None:
            if "default" not in field:
                errors.append(f"{path}.{field['name']}: new field without a default")
            continue
        errors.extend(_check(source["type"], field["type"], f"{path}.{field['name']}"))
    return errors
