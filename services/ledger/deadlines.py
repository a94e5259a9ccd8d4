"""When a payment is looked at again, as a pure function of a decision and the time an injected
clock gives (docs/daraja.md §4): STK queries with back-off while it is open, Review at its review
deadline, and the end of its callbacks some time after it is final.

Every deadline counts from the payment's request: the review deadline is `requested_at +
review_after` whatever happened since (a push retried for minutes, an unknown outcome recorded
late), and no query is scheduled past it, so the reconciler notices it on its next tick.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from services.common.payment import FINAL_STATES, OPEN_STATES, PaymentState
from services.ledger.record import PaymentRecord
from services.ledger.state_machine import KEEP, NO_CHANGES, Changes, Decision, Keep


@dataclass(frozen=True)
class LedgerSettings:
    first_query_after: timedelta = timedelta(seconds=90)   # Pending this long: start STK queries
    query_backoff_max: timedelta = timedelta(seconds=120)  # queries back off up to this interval
    review_after: timedelta = timedelta(minutes=15)        # no final answer this long after the request: Review
    callback_ttl_after_final: timedelta = timedelta(hours=24)  # callbacks for a payment final longer: refused
    channel_cache_ttl_s: float = 5.0                       # how long a channel's confirm-by-query setting is trusted


def next_query_delay(attempt: int, settings: LedgerSettings) -> timedelta:
    """15 s, 30 s, 60 s ... capped: the query is rate-limited like everything else."""
    return min(timedelta(seconds=15 * 2 ** min(attempt - 1, 30)), settings.query_backoff_max)


def review_deadline(record: PaymentRecord, settings: LedgerSettings) -> datetime:
    return record.requested_at + settings.review_after


def callbacks_closed(record: PaymentRecord, now: datetime, settings: LedgerSettings) -> bool:
    """Final for longer than the callback TTL: its callback URL has expired."""
    return record.final_at is not None and now - record.final_at > settings.callback_ttl_after_final


def _capped(at: datetime, record: PaymentRecord, settings: LedgerSettings) -> datetime:
    return min(at, review_deadline(record, settings))


def scheduled(previous_state: str | None, payment: PaymentRecord, d: Decision, now: datetime,
              settings: LedgerSettings) -> Changes:
    """The bookkeeping an applied decision on this payment adds: when to query or review next, when
    it became final, and why it is in Review. (One Changes built once: this runs for every fact.)"""
    state = d.new_state
    pending_since: datetime | Keep = KEEP
    next_query_at: datetime | None | Keep = KEEP
    if state == PaymentState.PENDING or d.changes.push_unknown is True:
        pending_since = now
        next_query_at = _capped(now + settings.first_query_after, payment, settings)
    elif state == PaymentState.REQUESTED:  # a push result may never come (its request dead-lettered): a deadline
        next_query_at = review_deadline(payment, settings)
    elif state in FINAL_STATES or state == PaymentState.REVIEW:
        next_query_at = None
    final_at: datetime | Keep = now if state in FINAL_STATES and state != previous_state else KEEP
    reviewed = bool(d.alert) and state == PaymentState.REVIEW
    if pending_since is KEEP and next_query_at is KEEP and final_at is KEEP and not reviewed:
        return NO_CHANGES
    return Changes(pending_since=pending_since, next_query_at=next_query_at, final_at=final_at,
                   review_reason=d.reason if reviewed else KEEP, review_alert=d.alert if reviewed else KEEP)


def query_asked(record: PaymentRecord, now: datetime, settings: LedgerSettings) -> Changes:
    """An STK query is asked now: the next one backs off, never past the review deadline."""
    attempt = record.query_attempts + 1
    return Changes(query_attempts=attempt,
                   next_query_at=_capped(now + next_query_delay(attempt, settings), record, settings))


# --- What the reconciler does with a payment that is due ---------------------------------------

@dataclass(frozen=True)
class Expire:
    """The review deadline has passed: the payment goes to Review."""
    age_seconds: int


@dataclass(frozen=True)
class AskQuery:
    checkout_request_id: str
    attempt: int
    reason: str  # CONFIRM_CALLBACK, PUSH_OUTCOME_UNKNOWN or PENDING_TOO_LONG (schemas/stk_query_requested.avsc)
    changes: Changes


@dataclass(frozen=True)
class WaitForDeadline:
    """Nothing to query (no CheckoutRequestID is known): only a callback can tell, until the deadline."""
    changes: Changes


Step = Expire | AskQuery | WaitForDeadline


def is_due(record: PaymentRecord, now: datetime) -> bool:
    return record.state in OPEN_STATES and record.next_query_at is not None and record.next_query_at <= now


def reconciliation_step(record: PaymentRecord, now: datetime, settings: LedgerSettings) -> Step:
    if now >= review_deadline(record, settings):
        return Expire(int((now - record.requested_at).total_seconds()))
    # A callback awaiting confirmation names the CheckoutRequestID to ask about when the push's is unknown.
    checkout = record.checkout_request_id or record.candidate_checkout_request_id
    if not checkout:
        return WaitForDeadline(Changes(next_query_at=review_deadline(record, settings)))
    asked = query_asked(record, now, settings)
    reason = ("CONFIRM_CALLBACK" if record.candidate_checkout_request_id else
              "PUSH_OUTCOME_UNKNOWN" if record.push_unknown else "PENDING_TOO_LONG")
    attempt = asked.query_attempts
    assert attempt is not KEEP
    return AskQuery(checkout, attempt, reason, asked)
