"""Ids an upstream producer chooses itself, checked before its request goes on to payment.requested."""
from __future__ import annotations

import base64
import os
import uuid
from typing import Any

import pytest

from services.common.kafka import ConsumedEvent, new_event_fields
from services.common.topics import Topic, upstream_requested_topic
from services.ingress.upstream import NotAllowed, UpstreamReauthoriser


def _request(**ids) -> ConsumedEvent:
    value = {**new_event_fields("shop-1", str(uuid.uuid4())), "amount": 100, "phone": "254712345678",
             "account_reference": "INV1", "description": None, "order_reference": "o-1", "idempotency_key": None,
             "metadata": {}, "source": "TOPIC", **ids}
    return ConsumedEvent(upstream_requested_topic("erp").name, 0, 0, b"shop-1", "payment_requested", value)


class NothingPublished:
    async def publish(self, topic: Topic, record: dict[str, Any]) -> None:
        raise AssertionError("check() publishes nothing")


REAUTHORISER = UpstreamReauthoriser({"erp": frozenset({"shop-1"})}, publisher=NothingPublished())


@pytest.mark.parametrize("ids", [
    {"payment_id": "ws-" + base64.b64encode(os.urandom(4500)).decode()},  # too big for the claim's index
    {"payment_id": "../../callbacks"},  # it becomes a path segment of the callback URL
    {"payment_id": ""},
], ids=["huge-payment-id", "path-payment-id", "empty-payment-id"])
def test_an_upstream_request_whose_ids_the_pipeline_cannot_carry_is_not_passed_on(ids):
    with pytest.raises(NotAllowed):
        REAUTHORISER.check(_request(**ids))


def test_an_upstream_request_with_its_own_short_payment_id_is_passed_on():
    assert REAUTHORISER.check(_request(payment_id="order-2026.11_29~7"))["source"] == "TOPIC"


def test_an_upstream_request_goes_on_under_an_event_id_of_the_ingress():
    """The ledger applies an event id once: two requests under one producer-chosen id (not even a
    UUID), both pushed by the STK worker, would leave the second payment unrecorded."""
    first, second = (REAUTHORISER.check(_request(event_id="order-17")) for _ in range(2))
    assert first["event_id"] != second["event_id"]
    assert all(uuid.UUID(e["event_id"]) for e in (first, second))
