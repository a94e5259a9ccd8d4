"""The payment state machine: pure, table-driven, no I/O (design.md, "Payment states").

`decide(payment, fact)` says what a fact does to a payment: APPLIED (maybe with a new state),
DUPLICATE (a repeat, a no-op), PARKED (it arrived before its payment: keep it for later) or
REJECTED (it cannot apply; says why). A contradiction never vanishes: it moves the payment to
Review with an alert label.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from typing import Callable, Union

from services.daraja.result_codes import FAILURE_MEANINGS
from services.ledger.callbacks import ParsedCallback


class Verdict(str, Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    PARKED = "parked"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Payment:
    state: str
    amount: int
    phone: str
    checkout_request_id: str | None = None
    mpesa_receipt: str | None = None
    result_code: str | None = None


# Facts: what the other services report.
@dataclass(frozen=True)
class Requested:
    invalid_reason: str | None = None  # a request produced straight to the topic may be invalid


@dataclass(frozen=True)
class PushAccepted:
    merchant_request_id: str | None
    checkout_request_id: str


@dataclass(frozen=True)
class PushRefused:
    code: str
    message: str


@dataclass(frozen=True)
class PushOutcomeUnknown:
    message: str


@dataclass(frozen=True)
class CallbackReceived:
    callback: ParsedCallback


@dataclass(frozen=True)
class QueryAnswered:
    status: str  # SUCCESS, FAILED, PROCESSING, ERROR (schemas/stk_query_result.avsc)
    checkout_request_id: str | None
    result_code: str | None
    result_desc: str | None


@dataclass(frozen=True)
class ReconciliationExpired:
    age_seconds: int


Fact = Union[Requested, PushAccepted, PushRefused, PushOutcomeUnknown, CallbackReceived, QueryAnswered,
             ReconciliationExpired]


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    new_state: str | None = None          # None: the state does not change
    changes: dict = field(default_factory=dict)  # payment columns to set
    reason: str | None = None
    alert: str | None = None              # a contradiction worth paging someone about


def applied(new_state=None, reason=None, **changes) -> Decision:
    return Decision(Verdict.APPLIED, new_state, changes, reason)


def duplicate(reason: str = "already applied") -> Decision:
    return Decision(Verdict.DUPLICATE, reason=reason)


def review(alert: str, reason: str, **changes) -> Decision:
    return Decision(Verdict.APPLIED, "Review", changes, reason, alert)


def rejected(reason: str) -> Decision:
    return Decision(Verdict.REJECTED, reason=reason)


PARK = Decision(Verdict.PARKED, reason="the payment is not known yet; kept until it is")
OPEN = ("Requested", "Pending")


# --- Requested -------------------------------------------------------------------------------

def on_requested(p: Payment | None, f: Requested) -> Decision:
    if p is not None:
        return duplicate("payment already recorded")
    if f.invalid_reason:
        return applied("Failed", f.invalid_reason, result_code="INVALID_REQUEST")
    return applied("Requested")


# --- STK push results ------------------------------------------------------------------------

def on_push_accepted(p: Payment, f: PushAccepted) -> Decision:
    if p.checkout_request_id not in (None, f.checkout_request_id):
        return review("second_push", f"a second push was accepted ({f.checkout_request_id}) "
                                     f"besides {p.checkout_request_id}")
    ids = {"merchant_request_id": f.merchant_request_id, "checkout_request_id": f.checkout_request_id}
    if p.state == "Requested":
        return applied("Pending", "Daraja accepted the push", **ids)
    if p.state in ("Settled", "Cancelled") and p.checkout_request_id is None:
        return applied(None, "push result arrived after the callback", **ids)
    if p.state == "Failed":
        return review("push_after_failure", "Daraja accepted a push for a payment recorded as Failed", **ids)
    return duplicate()


def on_push_refused(p: Payment, f: PushRefused) -> Decision:
    if p.state == "Requested":
        return applied("Failed", f"Daraja refused the push: {f.message}".strip(), result_code=f.code,
                       result_desc=f.message)
    if p.state == "Failed":
        return duplicate()
    return rejected(f"push refusal for a payment already {p.state}")


def on_push_unknown(p: Payment, f: PushOutcomeUnknown) -> Decision:
    if p.state == "Requested":
        return applied(None, f"push outcome unknown: {f.message}; awaiting callback or query", push_unknown=True)
    return duplicate("a later fact already settled what the push did")


# --- Callbacks -------------------------------------------------------------------------------

def on_callback(p: Payment, f: CallbackReceived) -> Decision:
    cb = f.callback
    if p.checkout_request_id not in (None, cb.checkout_request_id):
        return review("callback_mismatch", f"callback for CheckoutRequestID {cb.checkout_request_id}, "
                                           f"payment has {p.checkout_request_id}")
    if p.state in OPEN:
        return _callback_outcome(p, cb)
    if cb.succeeded:
        if p.state == "Settled" and p.mpesa_receipt in (None, cb.receipt):
            return duplicate()
        return review("success_after_final", f"success callback (receipt {cb.receipt}) for a payment "
                                             f"already {p.state}: money moved", mpesa_receipt_seen=cb.receipt)
    if p.state in ("Cancelled", "Failed"):
        return duplicate()
    if p.state == "Review":
        return duplicate("payment is under review")
    return review("failure_after_success", f"failure callback {cb.result_code} for a payment already Settled")


def _callback_outcome(p: Payment, cb: ParsedCallback) -> Decision:
    ids = {"checkout_request_id": cb.checkout_request_id, "merchant_request_id": cb.merchant_request_id}
    if cb.succeeded:
        mismatch = _cross_check(p, cb)
        if mismatch:
            return review("callback_mismatch", mismatch, **ids)
        return applied("Settled", cb.result_desc or "paid", mpesa_receipt=cb.receipt,
                       transaction_time=cb.transaction_time, result_code=cb.result_code,
                       result_desc=cb.result_desc, **ids)
    return _failure(cb.result_code, cb.result_desc, "callback", ids)


def _cross_check(p: Payment, cb: ParsedCallback) -> str | None:
    if not cb.receipt:
        return "success callback without a receipt number"
    if cb.amount is not None and cb.amount != Decimal(p.amount):
        return f"callback amount {cb.amount} differs from the payment's {p.amount}"
    if cb.phone is not None and cb.phone != p.phone:
        return "callback phone number differs from the payment's"
    return None


def _failure(code: str, desc: str | None, source: str, ids: dict) -> Decision:
    meaning = FAILURE_MEANINGS.get(code)
    if meaning is None:
        return review("unknown_result_code", f"{source} result code {code!r} is not a known outcome: {desc}",
                      result_code=code, result_desc=desc, **ids)
    return applied("Cancelled", meaning, result_code=code, result_desc=desc, **ids)


# --- STK query answers -----------------------------------------------------------------------

def on_query(p: Payment, f: QueryAnswered) -> Decision:
    if f.status in ("PROCESSING", "ERROR"):
        return applied(None, f"query: {f.status.lower()} ({f.result_code})")
    ids = {"checkout_request_id": f.checkout_request_id} if f.checkout_request_id else {}
    if p.state in OPEN:
        if f.status == "SUCCESS":
            return applied("Settled", "confirmed by STK query (the query gives no receipt number)",
                           result_code="0", result_desc=f.result_desc, **ids)
        return _failure(f.result_code or "", f.result_desc, "query", ids)
    agrees = (f.status == "SUCCESS") == (p.state == "Settled")
    if agrees or p.state == "Review":
        return duplicate()
    return review("query_contradicts", f"query says {f.status} {f.result_code} but the payment is {p.state}")


# --- Reconciliation --------------------------------------------------------------------------

def on_expired(p: Payment, f: ReconciliationExpired) -> Decision:
    if p.state in OPEN:
        return review("unresolved", f"no final answer after {f.age_seconds} s of callbacks and queries")
    return duplicate()


HANDLERS: dict[type, Callable[[Payment, Fact], Decision]] = {
    PushAccepted: on_push_accepted,
    PushRefused: on_push_refused,
    PushOutcomeUnknown: on_push_unknown,
    CallbackReceived: on_callback,
    QueryAnswered: on_query,
    ReconciliationExpired: on_expired,
}


def decide(payment: Payment | None, fact: Fact) -> Decision:
    if isinstance(fact, Requested):
        return on_requested(payment, fact)
    if payment is None:
        return PARK if isinstance(fact, (PushAccepted, PushRefused, PushOutcomeUnknown, CallbackReceived)) \
            else rejected("fact about an unknown payment")
    if payment.state == "Review" and not isinstance(fact, Requested):
        return duplicate("payment is under review; fact kept in the audit trail")
    return HANDLERS[type(fact)](payment, fact)
