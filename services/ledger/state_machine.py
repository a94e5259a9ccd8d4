"""The payment state machine: pure, table-driven, no I/O (docs/design.md, "Payment states").

`decide(payment, fact)` says what a fact does to a payment: APPLIED (maybe with a new state),
DUPLICATE (a repeat, a no-op), PARKED (it arrived before its payment: keep it for later) or
REJECTED (it cannot apply; says why). A contradiction never vanishes: it moves an open payment
to Review with an alert label; on a final payment it is recorded and alerted, and the state stays.
A success callback proves itself before it settles anything (docs/callback-proof.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Callable, Union

from services.daraja.result_codes import FAILURE_MEANINGS
from services.common.text import untrusted
from services.ledger.callbacks import ParsedCallback
from services.ledger.phones import PhoneCheck, check_phone


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
    push_unknown: bool = False
    candidate_receipt: str | None = None              # a proven success awaiting its STK query
    candidate_checkout_request_id: str | None = None
    candidate_transaction_time: datetime | None = None
    candidate_result_code: str | None = None          # or a failure, after an unknown push, awaiting its query
    confirm_by_query: bool = False  # the channel wants every success confirmed by an STK query
    callbacks_closed: bool = False  # final for longer than the callback TTL: its URL has expired


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
    receipt_owner: str | None = None   # another payment this receipt already proves (the ledger looks it up)
    checkout_owner: str | None = None  # another payment whose push has this CheckoutRequestID


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
    query: str | None = None              # a CheckoutRequestID to confirm by an STK query at once
    refusal: str | None = None            # why a fact was refused, as a metric label


def applied(new_state=None, reason=None, **changes) -> Decision:
    return Decision(Verdict.APPLIED, new_state, changes, reason)


def duplicate(reason: str = "already applied") -> Decision:
    return Decision(Verdict.DUPLICATE, reason=reason)


def review(alert: str, reason: str, **changes) -> Decision:
    return Decision(Verdict.APPLIED, "Review", changes, reason, alert)


def rejected(reason: str, refusal: str | None = None) -> Decision:
    return Decision(Verdict.REJECTED, reason=reason, refusal=refusal)


def contradiction(alert: str, reason: str) -> Decision:
    """Recorded on the payment and alerted; the state does not move (a final state stays final)."""
    return Decision(Verdict.APPLIED, None, {"contradiction": reason}, reason, alert)


def confirming(checkout_request_id: str, reason: str, **changes) -> Decision:
    """The callback is kept as a candidate while an STK query confirms it."""
    return Decision(Verdict.APPLIED, None, changes, reason, query=checkout_request_id)


PARK = Decision(Verdict.PARKED, reason="the payment is not known yet; kept until it is")
WAIT_FOR_PUSH = Decision(Verdict.PARKED, reason="the push result has not arrived: the callback's CheckoutRequestID "
                                                "cannot be checked yet; kept until it arrives")
OPEN = ("Requested", "Pending")
# M-Pesa receipts are 10 upper-case letters and digits (docs/callback-proof.md).
RECEIPT = re.compile(r"[A-Z0-9]{10}")
CANDIDATE_CLEARED = {"candidate_receipt": None, "candidate_checkout_request_id": None,
                     "candidate_transaction_time": None, "candidate_result_code": None}


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
        why = f"a second push was accepted ({f.checkout_request_id}) besides {p.checkout_request_id}"
        if p.state == "Settled":  # a final state stays final: recorded and alerted, not moved back
            return contradiction("second_push", f"{why}; the payment stays Settled")
        return review("second_push", why)
    if p.candidate_checkout_request_id not in (None, f.checkout_request_id):
        return review("callback_mismatch", f"the push was accepted as {f.checkout_request_id}, but the callback "
                                           f"awaiting confirmation named {p.candidate_checkout_request_id}")
    ids = {"merchant_request_id": f.merchant_request_id, "checkout_request_id": f.checkout_request_id}
    if p.state == "Requested":
        return applied("Pending", "Daraja accepted the push", **ids)
    if p.state in ("Settled", "Cancelled") and p.checkout_request_id is None:
        return applied(None, "push result arrived after the callback", **ids)
    if p.state == "Failed":
        return review("push_after_failure", "Daraja accepted a push for a payment recorded as Failed", **ids)
    return duplicate()


def on_push_refused(p: Payment, f: PushRefused) -> Decision:
    if p.state == "Requested" and p.candidate_receipt:
        return review("push_refused_after_success", f"Daraja refused the push ({f.code}), but a success callback "
                                                    f"(receipt {p.candidate_receipt}) awaits confirmation")
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
# Daraja signs nothing: anyone who learns a callback URL can post to it. A success moves money
# only with all of its proof (_proof_problem). A callback never moves Settled; after Cancelled or
# Failed only a proven success does, to Review (money moved).

def on_callback(p: Payment, f: CallbackReceived) -> Decision:
    if p.callbacks_closed:
        return rejected(f"callback for a payment {p.state} for longer than the callback TTL: its URL has expired",
                        refusal="expired")
    if p.state == "Requested" and p.checkout_request_id is None and not p.push_unknown:
        return WAIT_FOR_PUSH
    if p.state in OPEN:
        if p.candidate_checkout_request_id is not None:
            return _while_confirming(p, f)
        return _success(p, f) if f.callback.succeeded else _open_failure(p, f)
    if p.state == "Settled":
        return _after_settled(p, f)
    return _after_unpaid_final(p, f)  # Cancelled or Failed; Review is handled by decide()


def _success(p: Payment, f: CallbackReceived) -> Decision:
    cb = f.callback
    problem = _proof_problem(p, f)
    if problem:
        kind, why = problem
        return review(kind, f"success callback not proven: {why}", phone_check=_phone_flag(p, cb))
    phone = check_phone(p.phone, cb.phone)
    reasons = []
    if p.checkout_request_id is None:
        reasons.append("the push outcome is unknown, so its CheckoutRequestID is confirmed by an STK query")
    if phone is PhoneCheck.UNVERIFIABLE:
        reasons.append("the callback's phone number cannot be compared")
    if p.confirm_by_query:
        reasons.append("the channel confirms every success by an STK query")
    if reasons:
        return confirming(cb.checkout_request_id, "success callback awaiting STK query: " + "; ".join(reasons),
                          candidate_receipt=cb.receipt, candidate_checkout_request_id=cb.checkout_request_id,
                          candidate_transaction_time=cb.transaction_time, phone_check=phone.value,
                          merchant_request_id=cb.merchant_request_id)
    return applied("Settled", untrusted(cb.result_desc) or "paid", mpesa_receipt=cb.receipt,
                   transaction_time=cb.transaction_time, result_code=cb.result_code,
                   result_desc=untrusted(cb.result_desc), phone_check=phone.value,
                   checkout_request_id=cb.checkout_request_id, merchant_request_id=cb.merchant_request_id)


def _proof_problem(p: Payment, f: CallbackReceived) -> tuple[str, str] | None:
    """(alert kind, why) when a success callback lacks part of its proof; None when all of it holds:
    the accepted push's CheckoutRequestID, the exact amount, an unused receipt of M-Pesa's form and a
    phone number that does not differ from the payment's."""
    cb = f.callback
    if p.checkout_request_id is not None and cb.checkout_request_id != p.checkout_request_id:
        return "callback_mismatch", (f"CheckoutRequestID {untrusted(cb.checkout_request_id)} is not the accepted "
                                     f"push's {p.checkout_request_id}")
    if f.checkout_owner is not None:
        return "callback_mismatch", f"CheckoutRequestID {untrusted(cb.checkout_request_id)} belongs to payment {f.checkout_owner}"
    if cb.amount is None:
        return "amount_mismatch", "no amount"
    if not cb.amount.is_finite() or cb.amount != p.amount:
        return "amount_mismatch", f"amount {untrusted(str(cb.amount), 40)} differs from the payment's {p.amount}"
    if cb.receipt is None or not RECEIPT.fullmatch(cb.receipt):
        return "receipt_malformed", "no receipt number of M-Pesa's form (10 upper-case letters and digits)"
    if f.receipt_owner is not None:
        return "receipt_reused", f"receipt {cb.receipt} already proves payment {f.receipt_owner}"
    if check_phone(p.phone, cb.phone) is PhoneCheck.MISMATCH:
        return "phone_mismatch", "the phone number differs from the payment's"
    return None


def _phone_flag(p: Payment, cb: ParsedCallback) -> str:
    return check_phone(p.phone, cb.phone).value  # a flag only: the callback's number is never stored


def _open_failure(p: Payment, f: CallbackReceived) -> Decision:
    cb = f.callback
    if p.checkout_request_id is not None and cb.checkout_request_id != p.checkout_request_id:
        return review("callback_mismatch", f"callback for CheckoutRequestID {untrusted(cb.checkout_request_id)}, "
                                           f"payment has {p.checkout_request_id}")
    if f.checkout_owner is not None:
        return review("callback_mismatch", f"callback's CheckoutRequestID {untrusted(cb.checkout_request_id)} "
                                           f"belongs to payment {f.checkout_owner}")
    if p.checkout_request_id is None:
        # The push outcome is unknown: nothing proves this CheckoutRequestID is the payment's push. A
        # failure believed at once would let anyone holding the URL cancel the payment under a made-up
        # id, and the payer's genuine success would then fail the id check against it.
        return confirming(cb.checkout_request_id, "failure callback awaiting STK query: the push outcome is "
                          "unknown, so its CheckoutRequestID is confirmed by an STK query",
                          candidate_checkout_request_id=cb.checkout_request_id,
                          candidate_result_code=untrusted(cb.result_code, 64),
                          merchant_request_id=cb.merchant_request_id)
    ids = {"checkout_request_id": cb.checkout_request_id, "merchant_request_id": cb.merchant_request_id}
    return _failure(cb.result_code, untrusted(cb.result_desc), "callback", ids)


def _while_confirming(p: Payment, f: CallbackReceived) -> Decision:
    cb = f.callback
    same_id = cb.checkout_request_id == p.candidate_checkout_request_id
    if same_id and cb.succeeded and cb.receipt == p.candidate_receipt:
        return duplicate("this success already awaits its STK query")
    if same_id and not cb.succeeded and cb.result_code == p.candidate_result_code:
        return duplicate("this failure already awaits its STK query")
    what = f"success with receipt {untrusted(cb.receipt)}" if cb.succeeded else f"failure {untrusted(cb.result_code)}"
    awaiting = (f"the success (receipt {p.candidate_receipt})" if p.candidate_receipt
                else f"the failure {p.candidate_result_code}")
    return review("callback_contradicts", f"a callback ({what}) contradicts {awaiting} awaiting its STK query")


def _after_settled(p: Payment, f: CallbackReceived) -> Decision:
    cb = f.callback
    if cb.succeeded and (cb.receipt, cb.checkout_request_id) == (p.mpesa_receipt, p.checkout_request_id):
        return duplicate()
    if (cb.succeeded and p.mpesa_receipt is None and p.checkout_request_id == cb.checkout_request_id
            and not _proof_problem(p, f)):
        # Settled by an STK query, which gives no receipt: the callback that proves itself brings it.
        return applied(None, f"receipt {cb.receipt} from the success callback of a payment the query settled",
                       mpesa_receipt=cb.receipt, transaction_time=cb.transaction_time,
                       phone_check=_phone_flag(p, cb))
    what = f"success with receipt {untrusted(cb.receipt)}" if cb.succeeded else f"failure {untrusted(cb.result_code)}"
    return contradiction("contradiction_after_settled", f"a callback ({what}, CheckoutRequestID "
                         f"{untrusted(cb.checkout_request_id)}) contradicts the settlement; the payment stays Settled")


def _after_unpaid_final(p: Payment, f: CallbackReceived) -> Decision:
    cb = f.callback
    if not cb.succeeded:
        return duplicate()
    problem = _proof_problem(p, f)
    if problem:
        kind, why = problem
        return contradiction(kind, f"success callback for a payment already {p.state}, not proven ({why}); "
                                   f"the payment stays {p.state}")
    return review("success_after_final", f"success callback (receipt {cb.receipt}) for a payment already "
                                         f"{p.state}: money moved", late_receipt=cb.receipt)


def _failure(code: str, desc: str | None, source: str, ids: dict) -> Decision:
    meaning = FAILURE_MEANINGS.get(code)
    if meaning is None:
        return review("unknown_result_code", f"{source} result code {code!r} is not a known outcome: {desc}",
                      result_code=code, result_desc=desc, **ids)
    return applied("Cancelled", meaning, result_code=code, result_desc=desc, **ids)


# --- STK query answers -----------------------------------------------------------------------

def on_query(p: Payment, f: QueryAnswered) -> Decision:
    asked = p.checkout_request_id or p.candidate_checkout_request_id
    if f.checkout_request_id and asked and f.checkout_request_id != asked:
        return rejected(f"query answer for CheckoutRequestID {f.checkout_request_id}, the payment's is {asked}")
    if f.status in ("PROCESSING", "ERROR"):
        return applied(None, f"query: {f.status.lower()} ({f.result_code})")
    ids = {"checkout_request_id": f.checkout_request_id} if f.checkout_request_id else {}
    if p.state in OPEN and p.candidate_receipt:
        return _confirmation(p, f)
    if p.state in OPEN and p.candidate_result_code:
        return _failure_confirmation(p, f)
    if p.state in OPEN:
        if f.status == "SUCCESS":
            return applied("Settled", "confirmed by STK query (the query gives no receipt number)",
                           result_code="0", result_desc=f.result_desc, **ids)
        return _failure(f.result_code or "", f.result_desc, "query", ids)
    if (f.status == "SUCCESS") == (p.state == "Settled"):
        return duplicate()
    if p.state == "Settled":
        return contradiction("query_contradicts", f"STK query says {f.status} {f.result_code} for a payment "
                                                  f"Settled; the payment stays Settled")
    return review("query_contradicts", f"query says {f.status} {f.result_code} but the payment is {p.state}")


def _confirmation(p: Payment, f: QueryAnswered) -> Decision:
    """The answer to the query that confirms a success callback: the authenticated channel decides."""
    if f.status == "SUCCESS":
        return applied("Settled", f"success callback confirmed by STK query (receipt {p.candidate_receipt})",
                       mpesa_receipt=p.candidate_receipt, checkout_request_id=p.candidate_checkout_request_id,
                       transaction_time=p.candidate_transaction_time, result_code="0",
                       result_desc=f.result_desc, **CANDIDATE_CLEARED)
    return review("query_contradicts", f"STK query says {f.status} {f.result_code}, contradicting the success "
                                       f"callback (receipt {p.candidate_receipt})")


def _failure_confirmation(p: Payment, f: QueryAnswered) -> Decision:
    """The answer to the query that confirms a failure callback after an unknown push outcome. A
    success here does not settle: the id came from an unproven callback, and a query only tells that
    some push under that id succeeded, not that it was this payment's (docs/callback-proof.md)."""
    ids = {"checkout_request_id": p.candidate_checkout_request_id, **CANDIDATE_CLEARED}
    if f.status == "SUCCESS":
        return review("query_contradicts", f"STK query says SUCCESS for the CheckoutRequestID of the failure "
                                           f"callback {p.candidate_result_code}")
    return _failure(f.result_code or p.candidate_result_code or "", f.result_desc, "query", ids)


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
