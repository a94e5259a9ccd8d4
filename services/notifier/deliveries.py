"""Deliveries, pure: which status events become which deliveries, and the values the notifier keeps.

A status event is hostile until proven (any principal that may write the topic could have written
it): its ids must fit the columns they go to, and its body must fit one delivery row, or the
event is refused (dead-lettered) here rather than failing its whole batch in PostgreSQL.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.common.kafka import EventRejected
from services.common.payment import PaymentState
from services.common.topics import PAYMENT_STATUS
from services.notifier.events import event_type_of, webhook_body, webhook_id_of

ID_MAX = 100  # webhook_deliveries.webhook_id's CHECK; the other ids get the same bound
BODY_MAX_BYTES = 65536  # webhook_deliveries.body's CHECK
STATES = frozenset(state.value for state in PaymentState)


class NotAStatusEvent(EventRejected):
    """The event cannot be delivered, ever: not a status event, or values no delivery may carry."""


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    channel_id: str
    url: str
    event_types: frozenset[str]
    enabled: bool = True
    created_at: datetime | None = None  # events that happened before it are not its to receive


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to insert: one (status event, endpoint)."""
    event_id: str
    webhook_id: str
    endpoint_id: str
    channel_id: str
    payment_id: str
    event_type: str
    occurred_at: datetime
    body: str


@dataclass(frozen=True)
class Delivery:
    """A pending delivery this process holds (leased to it)."""
    id: int
    webhook_id: str
    endpoint_id: str
    payment_id: str
    occurred_at: datetime
    body: str
    attempts: int
    created_at: datetime

    @property
    def order(self) -> tuple[datetime, int]:
        """Deliveries of one (endpoint, payment) are attempted in this order, as the poller's SQL does."""
        return (self.occurred_at, self.id)


@dataclass(frozen=True)
class StatusChange:
    """A status event that webhooks announce: its type and the body every attempt sends."""
    event_id: str
    channel_id: str
    payment_id: str
    event_type: str
    occurred_at: datetime
    body: str


def status_change_of(schema: str, value: dict[str, Any]) -> StatusChange | None:
    """The event as a webhook's content; None for a state no webhook announces (Requested);
    NotAStatusEvent if it cannot be delivered."""
    if schema != PAYMENT_STATUS.schema:
        raise NotAStatusEvent(f"a {schema!r} record is not a status event")
    status = value.get("status")
    if not isinstance(status, str) or status not in STATES:
        raise NotAStatusEvent("its status is not a payment state")
    event_type = event_type_of(status)
    if event_type is None:
        return None
    ids = {name: value.get(name) for name in ("event_id", "channel_id", "payment_id")}
    for name, text in ids.items():
        if not isinstance(text, str) or not 1 <= len(text) <= ID_MAX or not text.isprintable():
            raise NotAStatusEvent(f"{name} must be printable text of 1 to {ID_MAX} characters")
    event_id = str(ids["event_id"])
    if not event_id.isascii() or " " in event_id:
        # It is the webhook-id header of every attempt, which the sender refuses otherwise: the
        # delivery would fail for the whole retry window, its payment's later events waiting behind it.
        raise NotAStatusEvent("event_id must be printable ASCII without spaces (it is the webhook-id header)")
    try:
        body = webhook_body(value)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise NotAStatusEvent(f"no webhook body can be made of it: {type(exc).__name__}") from None
    if len(body.encode()) > BODY_MAX_BYTES:
        raise NotAStatusEvent(f"its webhook body would exceed {BODY_MAX_BYTES} bytes")
    return StatusChange(ids["event_id"], ids["channel_id"], ids["payment_id"], event_type,  # type: ignore[arg-type]
                        value["occurred_at"], body)


def deliveries_of(change: StatusChange, endpoints: list[Endpoint]) -> list[NewDelivery]:
    """One delivery per enabled endpoint of the channel subscribed to the event's type that existed
    when the event happened. An endpoint receives what happens from its creation on, as webhook
    providers do: a notifier reading the status topic from its start (a new consumer group, an
    offset reset) must not send a new endpoint the channel's whole past."""
    return [NewDelivery(change.event_id, webhook_id_of(change.event_id), e.endpoint_id, change.channel_id,
                        change.payment_id, change.event_type, change.occurred_at, change.body)
            for e in endpoints
            if e.enabled and e.channel_id == change.channel_id and change.event_type in e.event_types
            and (e.created_at is None or change.occurred_at >= e.created_at)]
