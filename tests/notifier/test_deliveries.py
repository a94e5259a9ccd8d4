"""Status events as deliveries, pure: what announces nothing, what is refused (dead-lettered) because
no delivery row could hold it, and which endpoints get one."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given, settings, strategies as st

from services.notifier.deliveries import (
    BODY_MAX_BYTES,
    Endpoint,
    NotAStatusEvent,
    deliveries_of,
    status_change_of,
)
from tests.notifier.conftest import status_event

AT = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)


def test_a_requested_payment_announces_nothing():
    assert status_change_of("payment_status", status_event("ch", "p1", "Requested", AT)) is None


def test_a_status_change_carries_its_type_and_body():
    change = status_change_of("payment_status", status_event("ch", "p1", "Settled", AT, event_id="e1"))
    assert change is not None
    assert (change.event_id, change.channel_id, change.payment_id, change.event_type) == ("e1", "ch", "p1",
                                                                                           "payment.settled")
    assert '"type":"payment.settled"' in change.body and "254" not in change.body  # no phone, not even masked


@pytest.mark.parametrize("schema, change", [
    ("payment_requested", {}),                                       # another topic's record
    ("payment_status", {"event_id": "e" * 101}),                     # longer than webhook_id's column
    ("payment_status", {"payment_id": ""}),
    ("payment_status", {"channel_id": "ch\x00"}),                    # PostgreSQL text holds no NUL
    ("payment_status", {"event_id": "e\u202e1"}),                    # a bidi override in a header value
    ("payment_status", {"event_id": "e 1"}),                         # the sender refuses such a webhook-id:
    ("payment_status", {"event_id": "\u00e91"}),                     # retried for days, its payment's next waiting
    ("payment_status", {"occurred_at": "yesterday"}),
    ("payment_status", {"status": "Refunded"}),                      # not a state of ours
    ("payment_status", {"status": {}}),
    ("payment_status", {"metadata": {"k": "x" * (BODY_MAX_BYTES + 1)}}),  # a body no row may hold
])
def test_an_event_no_delivery_can_hold_is_refused(schema, change):
    with pytest.raises(NotAStatusEvent):
        status_change_of(schema, {**status_event("ch", "p1", "Pending", AT), **change})


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(["event_id", "channel_id", "payment_id", "order_reference", "reason",
                                        "amount", "metadata", "status", "occurred_at"]),
                       st.one_of(st.none(), st.text(max_size=120), st.integers(),
                                 st.dictionaries(st.text(), st.text()))))
def test_any_hostile_status_event_is_a_change_or_refused_never_an_unexpected_error(change):
    try:
        result = status_change_of("payment_status", {**status_event("ch", "p1", "Pending", AT), **change})
    except NotAStatusEvent:
        return
    assert result is None or len(result.body.encode()) <= BODY_MAX_BYTES


def test_each_enabled_endpoint_of_the_channel_subscribed_to_the_type_gets_one_delivery():
    change = status_change_of("payment_status", status_event("ch", "p1", "Settled", AT))
    assert change is not None
    endpoints = [Endpoint("ep_all", "ch", "https://a.example/h", frozenset({"payment.settled", "payment.pending"})),
                 Endpoint("ep_pending", "ch", "https://b.example/h", frozenset({"payment.pending"})),
                 Endpoint("ep_off", "ch", "https://c.example/h", frozenset({"payment.settled"}), enabled=False),
                 Endpoint("ep_other", "other", "https://d.example/h", frozenset({"payment.settled"}))]
    [delivery] = deliveries_of(change, endpoints)
    assert (delivery.endpoint_id, delivery.webhook_id, delivery.event_id) == ("ep_all", change.event_id,
                                                                             change.event_id)


def test_an_endpoint_gets_only_what_happened_from_its_creation_on():
    """A notifier reading the topic from its start (a new group, an offset reset) sends a new endpoint
    none of the channel's past."""
    change = status_change_of("payment_status", status_event("ch", "p1", "Settled", AT))
    assert change is not None
    endpoint = Endpoint("ep_new", "ch", "https://a.example/h", frozenset({"payment.settled"}), created_at=AT)
    assert [d.endpoint_id for d in deliveries_of(change, [endpoint])] == ["ep_new"]  # at its creation: its
    later = Endpoint("ep_later", "ch", "https://a.example/h", frozenset({"payment.settled"}),
                     created_at=AT.replace(microsecond=AT.microsecond + 1))
    assert deliveries_of(change, [later]) == []
