"""The compatibility checker itself catches what breaks readers, and lets through what doesn't."""
import copy
import json

import pytest

from services.common.avro import SCHEMA_DIR
from tests.schema_compat import backward_compatibility_errors

BASE = json.loads((SCHEMA_DIR / "payment_status.avsc").read_text())


def changed(edit) -> dict:
    schema = copy.deepcopy(BASE)
    edit(schema)
    return schema


def field(schema, name):
    return next(f for f in schema["fields"] if f["name"] == name)


@pytest.mark.parametrize("edit, why", [
    (lambda s: s["fields"].append({"name": "fee", "type": "long"}), "new field without a default"),
    (lambda s: field(s, "amount").update(type="string"), "type changed"),
    (lambda s: field(s, "status")["type"]["symbols"].remove("Review"), "enum symbols"),
    (lambda s: field(s, "occurred_at").update(type={"type": "long", "logicalType": "timestamp-micros"}), "logical"),
    (lambda s: field(s, "order_reference").update(type="string", default=""), "from null to string"),
])
def test_breaking_changes_are_caught(edit, why):
    errors = backward_compatibility_errors(BASE, changed(edit))
    assert errors and why in " ".join(errors)


@pytest.mark.parametrize("edit", [
    lambda s: s["fields"].append({"name": "fee", "type": ["null", "long"], "default": None}),
    lambda s: s["fields"].remove(field(s, "reason")),
    lambda s: field(s, "status")["type"]["symbols"].append("Refunded"),
    lambda s: field(s, "amount").update(type="double"),
    lambda s: field(s, "order_reference").update(doc="changed wording"),
])
def test_compatible_changes_pass(edit):
    assert backward_compatibility_errors(BASE, changed(edit)) == []
