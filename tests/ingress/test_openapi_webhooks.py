"""The OpenAPI document's `webhooks` section against what the notifier really sends: every body
services/notifier/events.webhook_body makes validates against the documented schema of its event
type and carries exactly the documented keys, and the documented verification example verifies a
message signed as the notifier signs. Pure: no broker or database."""
from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from standardwebhooks.webhooks import Webhook

from services.common.payment import PaymentState
from services.notifier.events import EVENT_TYPE_OF_STATE, EVENT_TYPES, webhook_body
from services.notifier.secrets import new_secret
from tests.ingress.test_openapi import DOCUMENT_PATH, DOCUMENT_URI

DOCUMENT = json.loads(DOCUMENT_PATH.read_text())
REGISTRY = Registry().with_resource(DOCUMENT_URI, DRAFT202012.create_resource(DOCUMENT))
STATES = list(EVENT_TYPE_OF_STATE)
# jsonschema checks "date-time" only when an optional package is installed; the rule is spelled out
# here so that a body with a malformed time fails whatever is installed.
FORMATS = FormatChecker()
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")


@FORMATS.checks("date-time")
def is_rfc3339(value: object) -> bool:
    if not isinstance(value, str):
        return True  # a format constrains strings only (JSON Schema 2020-12, "format")
    if not RFC3339.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def validator(event_type: str) -> Draft202012Validator:
    """The documented request body schema of one webhook, where it sits (so its refs resolve)."""
    pointer = f"/webhooks/{event_type}/post/requestBody/content/application~1json/schema"
    return Draft202012Validator({"$ref": f"{DOCUMENT_URI}#{pointer}"}, registry=REGISTRY, format_checker=FORMATS)


def status_event(status: str, **changes) -> dict:
    at = datetime(2026, 11, 29, 10, 0, 0, 123000, tzinfo=timezone.utc)
    event = {"event_id": "0b5b2f6e-8c1f-4d7e-9a57-3d7f0c9b1a06", "occurred_at": at, "channel_id": "shop-nairobi-01",
             "payment_id": "pay_01JD0000000000000000000001", "schema_version": 2, "status": status,
             "previous_status": "Pending", "amount": 1500, "phone_masked": "*********149",
             "order_reference": "ord-98765", "checkout_request_id": "ws_CO_1007202409152617172396192",
             "mpesa_receipt": "NLJ7RT61SV", "transaction_time": at - timedelta(seconds=6), "result_code": "0",
             "reason": "The service request is processed successfully.", "metadata": {"cart": "42"},
             "late_mpesa_receipt": None}
    return {**event, **changes}


def documented_errors(event_type: str, body: dict) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator(event_type).iter_errors(body)]


def test_the_webhooks_section_names_every_event_type_and_nothing_else():
    assert list(DOCUMENT["webhooks"]) == list(EVENT_TYPES)
    for event_type in EVENT_TYPES:
        headers = [DOCUMENT["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]
                   for p in DOCUMENT["webhooks"][event_type]["post"]["parameters"]]
        assert {(h["name"], h["in"], h["required"]) for h in headers} == {
            ("webhook-id", "header", True), ("webhook-timestamp", "header", True),
            ("webhook-signature", "header", True)}


@pytest.mark.parametrize("status", STATES)
@pytest.mark.parametrize("changes", [
    {},
    {"previous_status": None, "order_reference": None, "mpesa_receipt": None, "transaction_time": None,
     "result_code": None, "reason": None, "metadata": {}},
    {"late_mpesa_receipt": "NLJ7RT61SW", "previous_status": "Cancelled", "reason": "Malipo yamekamilika \u2713"},
    {"resolved_by": "wanjiru", "previous_status": "Review", "reason": "paid at the till, receipt checked"},
])
def test_every_body_the_notifier_sends_validates_against_its_documented_schema(status, changes):
    event_type = EVENT_TYPE_OF_STATE[status]
    body = json.loads(webhook_body(status_event(status, **changes)))
    assert documented_errors(event_type, body) == []
    schemas = DOCUMENT["components"]["schemas"]
    # Receivers may ignore unknown keys, so the schema does not forbid them: this keeps the document
    # from falling behind when the body gains one.
    assert set(body) == set(schemas["WebhookEvent"]["properties"])
    payment = schemas["WebhookPayment"]
    assert set(body["data"]) == set(payment["properties"]) == set(payment["required"])


@pytest.mark.parametrize("status", STATES)
def test_a_body_of_another_type_or_with_a_malformed_time_does_not_validate(status):
    # The per-type schemas do constrain: a Settled body is not a valid payment.pending.
    event_type = EVENT_TYPE_OF_STATE[status]
    other = next(s for s in STATES if s != status)
    body = json.loads(webhook_body(status_event(other)))
    assert documented_errors(event_type, body)
    own = json.loads(webhook_body(status_event(status)))
    assert documented_errors(event_type, {**own, "timestamp": "29/11/2026 10:00"})


optional_text = st.none() | st.text(max_size=30)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(status=st.sampled_from(STATES), amount=st.integers(1, 250_000), order=optional_text, receipt=optional_text,
       reason=optional_text, code=optional_text, late=optional_text,
       previous=st.none() | st.sampled_from(list(PaymentState)),
       metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=5),
       settled_at=st.none() | st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2099, 1, 1),
                                           timezones=st.just(timezone.utc)))
def test_any_status_event_becomes_a_documented_body(status, amount, order, receipt, reason, code, late, previous,
                                                     metadata, settled_at):
    event = status_event(status, amount=amount, order_reference=order, mpesa_receipt=receipt, reason=reason,
                         result_code=code, late_mpesa_receipt=late, previous_status=previous, metadata=metadata,
                         transaction_time=settled_at)
    raw = webhook_body(event)
    assert raw.isascii()
    assert documented_errors(EVENT_TYPE_OF_STATE[status], json.loads(raw)) == []


def test_the_documented_python_example_verifies_a_signed_delivery(monkeypatch):
    description = DOCUMENT["components"]["parameters"]["WebhookSignature"]["description"]
    [example] = re.findall(r"```python\n(.*?)```", description, re.DOTALL)
    secret, old_secret = new_secret(), new_secret()
    monkeypatch.setenv("WEBHOOK_SECRET", secret)
    handled: list[tuple[str, dict]] = []
    namespace: dict[str, Any] = {"seen_before": lambda webhook_id: False,
                                 "close_order": lambda t, d: handled.append((t, d))}
    exec(compile(example, "openapi-example", "exec"), namespace)  # the document's own code, run as written
    assert os.environ["WEBHOOK_SECRET"] == secret

    body = webhook_body(status_event("Settled"))
    webhook_id, now = "0b5b2f6e-8c1f-4d7e-9a57-3d7f0c9b1a06", datetime.now(timezone.utc)
    # Signed as during a rotation: the new secret's signature and the old one's, space-separated.
    signature = " ".join(Webhook(s).sign(webhook_id, now, body) for s in (secret, old_secret))
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": signature}
    assert namespace["receive"](body.encode(), headers) == 204
    assert handled == [("payment.settled", json.loads(body)["data"])]
    forged = {**headers, "webhook-signature": Webhook(new_secret()).sign(webhook_id, now, body)}
    assert namespace["receive"](body.encode(), forged) == 400
    altered = body.replace('"amount":1500', '"amount":1')
    assert namespace["receive"](altered.encode(), headers) == 400
