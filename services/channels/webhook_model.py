"""Webhook endpoints as the onboarding side manages them: the validation of every management input
(clean values, or errors by field) and the limits. Pure: no I/O (the DNS half of the destination
check runs in webhooks.py).

Error keys are the camelCase field names of the API, as in model.py; messages never repeat what was
sent, apart from names cleaned by untrusted().
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from services.channels.model import Errors
from services.common.text import untrusted
from services.notifier.destinations import DestinationPolicy, DestinationRefused
from services.notifier.events import EVENT_TYPES

ENABLED, DISABLED, DELETED = "enabled", "disabled", "deleted"
DELIVERY_STATES = ("pending", "delivered", "parked", "cancelled")
ENDPOINT_ID = re.compile(r"ep_[0-9a-f]{20}")  # migrations/0014_webhooks.sql's CHECK
# Every endpoint turns each status event of its channel into one more delivery row and one more
# HTTP request, and the notifier keeps a dispatcher per endpoint: the bound keeps what one channel
# can ask of the notifier in proportion. Ten covers a shop, its ERP and a few tools; a channel that
# needs more fans out on its own side.
ENDPOINTS_PER_CHANNEL_MAX = 10
URL_MIN = 10  # the table's CHECK: shorter cannot be an absolute URL with a host anyway
DESCRIPTION_MAX = 200
REASON_MAX = 500
OVERLAP_DEFAULT_S = 24 * 3600  # a day: time for the receiver's team to deploy the new secret
OVERLAP_MAX_S = 7 * 24 * 3600  # past a week an "old" secret is simply a second live one
PAGE_DEFAULT, PAGE_MAX = 50, 200
ATTEMPTS_SHOWN_MAX = 500  # a delivery retried for 3 days with back-off capped at an hour has ~80
# Past this many deliveries, a redelivery by time asks for a narrower window (`until`): one
# request, one transaction, bounded work for the database and for the receiver.
REDELIVER_MAX = 10_000
EVENT_ID_MAX = 100
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")
_DATETIME_TEXT_MAX = 40
_ID_MAX = 2**63 - 1  # bigserial


@dataclass(frozen=True)
class EndpointInput:
    """What an operator may set on an endpoint."""

    url: str
    event_types: tuple[str, ...]
    description: str | None


@dataclass(frozen=True)
class DeliveryQuery:
    state: str | None
    since: datetime | None
    before_id: int | None  # the cursor: the smallest id of the previous page
    limit: int


@dataclass(frozen=True)
class RedeliverySelector:
    """One event (by its id) or every delivery whose event occurred in [since, until)."""

    event_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def describe(self) -> str:
        if self.event_id is not None:
            return f"event {untrusted(self.event_id, EVENT_ID_MAX)}"
        return f"events since {self.since.isoformat() if self.since else '?'}" + (
            f" until {self.until.isoformat()}" if self.until else "")


def endpoint_id_valid(value: str) -> bool:
    return ENDPOINT_ID.fullmatch(value) is not None


def delivery_id_of(value: str) -> int | None:
    """A delivery id from a path or a cursor; None for anything else (answered 404 or 400)."""
    if not re.fullmatch(r"[0-9]{1,19}", value):
        return None
    number = int(value)
    return number if 1 <= number <= _ID_MAX else None


def parse_new_endpoint(body: Any, policy: DestinationPolicy) -> tuple[EndpointInput | None, Errors]:
    """A new endpoint: `url` required, `eventTypes` (default all) and `description` optional."""
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors = _unknown_fields(body, {"url", "eventTypes", "description"})
    url, message = _url(body.get("url"), policy)
    if message:
        errors["url"] = message
    event_types, message = _event_types(body.get("eventTypes", list(EVENT_TYPES)))
    if message:
        errors["eventTypes"] = message
    description, message = _description(body.get("description"))
    if message:
        errors["description"] = message
    if errors:
        return None, errors
    return EndpointInput(url, event_types, description), {}


def parse_endpoint_changes(current: EndpointInput, body: Any,
                           policy: DestinationPolicy) -> tuple[EndpointInput | None, Errors]:
    """The endpoint with a partial update applied; `"description": null` removes the description."""
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors = _unknown_fields(body, {"url", "eventTypes", "description"})
    if not body:
        errors["body"] = "must change at least one of url, eventTypes, description"
    changes: dict[str, Any] = {}
    if "url" in body:
        changes["url"], message = _url(body["url"], policy)
        if message:
            errors["url"] = message
    if "eventTypes" in body:
        changes["event_types"], message = _event_types(body["eventTypes"])
        if message:
            errors["eventTypes"] = message
    if "description" in body:
        changes["description"], message = _description(body["description"])
        if message:
            errors["description"] = message
    if errors:
        return None, errors
    return replace(current, **changes), {}


def parse_disable(body: Any) -> tuple[str | None, Errors]:
    """The reason an operator disables an endpoint (kept on the endpoint and in the audit)."""
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors = _unknown_fields(body, {"reason"})
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip() or not _PRINTABLE.fullmatch(reason) \
            or len(reason) > REASON_MAX:
        errors["reason"] = f"is required: a non-empty string of at most {REASON_MAX} characters without " \
                           "control characters"
    if errors:
        return None, errors
    assert isinstance(reason, str), "checked above"
    return _cleaned(reason.strip(), REASON_MAX), {}


def parse_rotation(body: Any) -> tuple[int | None, Errors]:
    """How long the previous secret keeps signing, in seconds (0: it stops at once)."""
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors = _unknown_fields(body, {"overlapSeconds"})
    overlap = body.get("overlapSeconds", OVERLAP_DEFAULT_S)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= OVERLAP_MAX_S:
        errors["overlapSeconds"] = f"must be a whole number of seconds from 0 to {OVERLAP_MAX_S} (7 days)"
    if errors:
        return None, errors
    return overlap, {}


def parse_delivery_query(query: Mapping[str, str]) -> tuple[DeliveryQuery | None, Errors]:
    """The delivery log's filters from query parameters: state, since, cursor, limit."""
    errors = _unknown_fields(dict(query), {"state", "since", "cursor", "limit"})
    state = query.get("state")
    if state is not None and state not in DELIVERY_STATES:
        errors["state"] = f"must be one of: {', '.join(DELIVERY_STATES)}"
    since, message = _moment(query["since"]) if "since" in query else (None, None)
    if message:
        errors["since"] = message
    before_id = None
    if "cursor" in query:
        before_id = delivery_id_of(query["cursor"])
        if before_id is None:
            errors["cursor"] = "must be the nextCursor of a previous page"
    limit = PAGE_DEFAULT
    if "limit" in query:
        raw = query["limit"]
        limit = int(raw) if re.fullmatch(r"[0-9]{1,4}", raw) else 0
        if not 1 <= limit <= PAGE_MAX:
            errors["limit"] = f"must be a whole number from 1 to {PAGE_MAX}"
    if errors:
        return None, errors
    return DeliveryQuery(state, since, before_id, limit), {}


def parse_redelivery(body: Any) -> tuple[RedeliverySelector | None, Errors]:
    """`{"eventId": ...}` for one event, or `{"since": ..., "until": ...}` (until optional)."""
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors = _unknown_fields(body, {"eventId", "since", "until"})
    if ("eventId" in body) == ("since" in body):
        errors["body"] = "must name either eventId or since"
    if "until" in body and "since" not in body:
        errors["until"] = "is allowed only with since"
    event_id = body.get("eventId")
    if "eventId" in body and (not isinstance(event_id, str) or not event_id or len(event_id) > EVENT_ID_MAX
                              or not _PRINTABLE.fullmatch(event_id)):
        errors["eventId"] = f"must be an event id (text of 1 to {EVENT_ID_MAX} characters)"
    moments: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        moments[name], message = _moment(body[name]) if name in body else (None, None)
        if message:
            errors[name] = message
    since, until = moments["since"], moments["until"]
    if since and until and until <= since:
        errors["until"] = "must be after since"
    if errors:
        return None, errors
    return RedeliverySelector(event_id if isinstance(event_id, str) else None, since, until), {}


def _url(value: Any, policy: DestinationPolicy) -> tuple[Any, str | None]:
    if not isinstance(value, str):
        return None, "is required: the https URL of the receiver"
    if len(value) < URL_MIN:
        return None, f"must be an absolute URL of at least {URL_MIN} characters"
    try:
        policy.check_url(value)
    except DestinationRefused as refused:
        return None, untrusted(str(refused), 300)  # the refusal may quote the URL's host
    return value, None


def _event_types(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        return None, f"must be a non-empty list of event types: {', '.join(EVENT_TYPES)}"
    unknown = [v for v in dict.fromkeys(value) if v not in EVENT_TYPES]
    if unknown:
        names = ", ".join(untrusted(v, 40) for v in unknown[:5])
        return None, f"has unknown event types ({names}); known: {', '.join(EVENT_TYPES)}"
    return tuple(t for t in EVENT_TYPES if t in value), None  # one canonical order, no repeats


def _description(value: Any) -> tuple[Any, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip() or not _PRINTABLE.fullmatch(value) \
            or len(value) > DESCRIPTION_MAX:
        return None, f"must be null or a non-empty string of at most {DESCRIPTION_MAX} characters without " \
                     "control characters"
    return _cleaned(value.strip(), DESCRIPTION_MAX), None


def _moment(value: Any) -> tuple[datetime | None, str | None]:
    message = "must be a date and time with its offset, e.g. 2026-11-29T10:00:00Z"
    if not isinstance(value, str) or len(value) > _DATETIME_TEXT_MAX:
        return None, message
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            return None, message
        moment = moment.astimezone(timezone.utc)  # year 1 at +01:00 would overflow: refused here, not later
    except (ValueError, OverflowError):
        return None, message
    return moment, None


def _cleaned(value: str, limit: int) -> str:
    """Shown in terminals and logs: format characters (bidi overrides, zero-width) escaped, and the
    result still within the column's limit."""
    text = untrusted(value, limit)
    return text if len(text) <= limit else untrusted(value, limit - 1)


def _unknown_fields(body: dict[str, Any], known: set[str]) -> Errors:
    return {untrusted(name, 64): "is not a known field" for name in body if name not in known}
