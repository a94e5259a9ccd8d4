"""The payment state machine: pure, table-driven, no I/O (docs/design.md, "Payment states").

`decide(payment, fact, owners)` says what a fact does to a payment: APPLIED (maybe with a new
state), DUPLICATE (a repeat, a no-op), PARKED (it arrived before its payment: keep it for later) or
REJECTED (it cannot apply; says why). What an applied fact writes on the payment is a `Changes`
value: a field it has no column for does not type-check. Every rule lives here, including the two
that look across payments (one receipt proves one payment; one CheckoutRequestID is one push),
which `owners` feeds. A contradiction never vanishes: it moves an open payment to Review with an
alert label; on a final payment it is recorded and alerted, and the state stays. A success
callback proves itself before it settles anything (docs/callback-proof.md). An operator's
instruction is a fact too: it asks an STK query, or resolves a payment in Review (docs/design.md,
"The review desk's instructions").
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Final

from services.common.payment import FINAL_STATES, OPEN_STATES, PaymentState
from services.common.text import untrusted
from services.daraja.result_codes import FAILURE_MEANINGS
from services.ledger.callbacks import ParsedCallback
from services.ledger.phones import PhoneCheck, check_phone

State = PaymentState


class Verdict(str, Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    PARKED = "parked"
    REJECTED = "rejected"


class Keep(Enum):
    """A Changes field left as it is (None is a value: it clears the column)."""
    KEEP = "keep"


KEEP: Final = Keep.KEEP


@dataclass(frozen=True)
class Changes:
    """What a decision writes on a payment besides its state; each field is a column of payments
    (services/ledger/record.py), and a field left KEEP is not touched."""
    merchant_request_id: str | None | Keep = KEEP
    checkout_request_id: str | None | Keep = KEEP
    mpesa_receipt: str | None | Keep = KEEP
    transaction_time: datetime | None | Keep = KEEP
    result_code: str | None | Keep = KEEP
    result_desc: str | None | Keep = KEEP
    phone_check: str | None | Keep = KEEP
    push_unknown: bool | Keep = KEEP
    candidate_receipt: str | None | Keep = KEEP
    candidate_checkout_request_id: str | None | Keep = KEEP
    candidate_transaction_time: datetime | None | Keep = KEEP
    candidate_result_code: str | None | Keep = KEEP
    late_receipt: str | None | Keep = KEEP            # a proven success after Cancelled or Failed: money moved
    contradiction: str | None | Keep = KEEP           # the last contradiction recorded on a final payment
    # Reconciliation and review bookkeeping, set by services/ledger/deadlines.py, never by a fact.
    pending_since: datetime | None | Keep = KEEP
    next_query_at: datetime | None | Keep = KEEP
    query_attempts: int | Keep = KEEP
    final_at: datetime | None | Keep = KEEP
    review_reason: str | None | Keep = KEEP
    review_alert: str | None | Keep = KEEP            # the alert that sent the payment to Review

    def written(self) -> dict[str, Any]:
        """The fields this value sets, by column name."""
        return {name: v for name, v in self.__dict__.items() if v is not KEEP}  # the ledger's hot path

    def without(self, *names: str) -> Changes:
        return Changes(**{name: v for name, v in self.written().items() if name not in names})

    def merged(self, later: Changes) -> Changes:
        """These changes, overridden by the fields `later` sets."""
        return Changes(**{**self.written(), **later.written()})


CHANGES_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Changes))
NO_CHANGES: Final = Changes()
CANDIDATE_CLEARED: Final = Changes(candidate_receipt=None, candidate_checkout_request_id=None,
                                   candidate_transaction_time=None, candidate_result_code=None)
CANDIDATE_FIELDS: Final = ("candidate_receipt", "candidate_checkout_request_id", "candidate_transaction_time",
                           "candidate_result_code")


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
    review_alert: str | None = None  # why it is in Review (the alert label), when it is


@dataclass(frozen=True)
class Owners:
    """Which payments hold receipts and CheckoutRequestIDs, as far as the caller read them: the
    inputs of the rules across payments. `payment_id` is the payment being decided."""
    payment_id: str
    receipts: Mapping[str, str] = dataclasses.field(default_factory=dict)   # receipt -> payment it proves
    checkouts: Mapping[str, str] = dataclasses.field(default_factory=dict)  # CheckoutRequestID -> its payment

    def of_receipt(self, receipt: str) -> str | None:
        owner = self.receipts.get(receipt)
        return owner if owner != self.payment_id else None

    def of_checkout(self, checkout_request_id: str) -> str | None:
        owner = self.checkouts.get(checkout_request_id)
        return owner if owner != self.payment_id else None


# Facts: what the other services report, and what the clock brings.
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
    receipt_owner: str | None = None   # another payment this receipt already proves (decide reads Owners)
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


# An operator's instructions (schemas/operator_command.avsc). Actor and reason are foreign text,
# cleaned and bounded when the event becomes a fact (services/ledger/facts.py).
@dataclass(frozen=True)
class OperatorQuery:
    """Ask Daraja about the payment's push now."""
    actor: str
    reason: str
    receipt: str | None = None  # a query carries none; one that does is refused


@dataclass(frozen=True)
class OperatorResolution:
    """Resolve a payment in Review: SETTLE (with the receipt that proves the money moved) or CANCEL."""
    action: str
    receipt: str | None
    actor: str
    reason: str


OperatorInstruction = OperatorQuery | OperatorResolution
Fact = (Requested | PushAccepted | PushRefused | PushOutcomeUnknown | CallbackReceived | QueryAnswered
        | ReconciliationExpired | OperatorQuery | OperatorResolution)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    new_state: PaymentState | None = None  # None: the state does not change
    changes: Changes = NO_CHANGES
    reason: str | None = None
    alert: str | None = None              # a contradiction worth paging someone about
    query: str | None = None              # a CheckoutRequestID to confirm by an STK query at once
    refusal: str | None = None            # why a fact was refused, as a metric label
    query_reason: str = "CONFIRM_CALLBACK"  # why the query is asked (schemas/stk_query_requested.avsc)
    detail: str | None = None             # what the audit entry says, when it says more than the reason


def applied(new_state: PaymentState | None = None, reason: str | None = None,
            changes: Changes = NO_CHANGES) -> Decision:
    return Decision(Verdict.APPLIED, new_state, changes, reason)


def duplicate(reason: str = "already applied") -> Decision:
    return Decision(Verdict.DUPLICATE, reason=reason)


def review(alert: str, reason: str, changes: Changes = NO_CHANGES) -> Decision:
    return Decision(Verdict.APPLIED, State.REVIEW, changes, reason, alert)


def rejected(reason: str, refusal: str | None = None) -> Decision:
    return Decision(Verdict.REJECTED, reason=reason, refusal=refusal)


def contradiction(alert: str, reason: str) -> Decision:
    """Recorded on the payment and alerted; the state does not move (a final state stays final)."""
    return Decision(Verdict.APPLIED, None, Changes(contradiction=reason), reason, alert)


def confirming(checkout_request_id: str, reason: str, changes: Changes) -> Decision:
    """The callback is kept as a candidate while an STK query confirms it."""
    return Decision(Verdict.APPLIED, None, changes, reason, query=checkout_request_id)


PARK: Final = Decision(Verdict.PARKED, reason="the payment is not known yet; kept until it is")
WAIT_FOR_PUSH: Final = Decision(Verdict.PARKED, reason="the push result has not arrived: the callback's "
                                "CheckoutRequestID cannot be checked yet; kept until it arrives")
OPEN = OPEN_STATES
# M-Pesa receipts are 10 upper-case letters and digits (docs/callback-proof.md).
RECEIPT = re.compile(r"[A-Z0-9]{10}")
# The alert of a Review the review deadline alone caused (on_expired).
DEADLINE_ALERT: Final = "unresolved"


# --- Requested -------------------------------------------------------------------------------

def on_requested(p: Payment | None, f: Requested) -> Decision:
    if p is not None:
        return duplicate("payment already recorded")
    if f.invalid_reason:
        return applied(State.FAILED, f.invalid_reason, Changes(result_code="INVALID_REQUEST"))
    return applied(State.REQUESTED)


# --- STK push results ------------------------------------------------------------------------

def on_push_accepted(p: Payment, f: PushAccepted) -> Decision:
    if p.checkout_request_id not in (None, f.checkout_request_id):
        why = f"a second push was accepted ({f.checkout_request_id}) besides {p.checkout_request_id}"
        if p.state == State.SETTLED:  # a final state stays final: recorded and alerted, not moved back
            return contradiction("second_push", f"{why}; the payment stays Settled")
        return review("second_push", why)
    if p.candidate_checkout_request_id not in (None, f.checkout_request_id):
        return review("callback_mismatch", f"the push was accepted as {f.checkout_request_id}, but the callback "
                                           f"awaiting confirmation named {p.candidate_checkout_request_id}")
    ids = Changes(merchant_request_id=f.merchant_request_id, checkout_request_id=f.checkout_request_id)
    if p.state == State.REQUESTED:
        return applied(State.PENDING, "Daraja accepted the push", ids)
    if p.state in (State.SETTLED, State.CANCELLED) and p.checkout_request_id is None:
        return applied(None, "push result arrived after the callback", ids)
    if p.state == State.FAILED:
        return review("push_after_failure", "Daraja accepted a push for a payment recorded as Failed", ids)
    return duplicate()


def on_push_refused(p: Payment, f: PushRefused) -> Decision:
    if p.state == State.REQUESTED and p.candidate_receipt:
        return review("push_refused_after_success", f"Daraja refused the push ({f.code}), but a success callback "
                                                    f"(receipt {p.candidate_receipt}) awaits confirmation")
    if p.state == State.REQUESTED:
        return applied(State.FAILED, f"Daraja refused the push: {f.message}".strip(),
                       Changes(result_code=f.code, result_desc=f.message))
    if p.state == State.FAILED:
        return duplicate()
    return rejected(f"push refusal for a payment already {p.state}")


def on_push_unknown(p: Payment, f: PushOutcomeUnknown) -> Decision:
    if p.state == State.REQUESTED:
        return applied(None, f"push outcome unknown: {f.message}; awaiting callback or query",
                       Changes(push_unknown=True))
    return duplicate("a later fact already settled what the push did")


# --- Callbacks -------------------------------------------------------------------------------
# Daraja signs nothing: anyone who learns a callback URL can post to it. A success moves money
# only with all of its proof (_proof_problem). A callback never moves Settled; after Cancelled or
# Failed only a proven success does, to Review (money moved).

def on_callback(p: Payment, f: CallbackReceived) -> Decision:
    if p.callbacks_closed:
        return rejected(f"callback for a payment {p.state} for longer than the callback TTL: its URL has expired",
                        refusal="expired")
    if p.state == State.REQUESTED and p.checkout_request_id is None and not p.push_unknown:
        return WAIT_FOR_PUSH
    if p.state in OPEN:
        if p.candidate_checkout_request_id is not None:
            return _while_confirming(p, f)
        return _success(p, f) if f.callback.succeeded else _open_failure(p, f)
    if p.state == State.SETTLED:
        return _after_settled(p, f)
    return _after_unpaid_final(p, f)  # Cancelled or Failed; Review is handled by decide()


def _success(p: Payment, f: CallbackReceived) -> Decision:
    cb = f.callback
    problem = _proof_problem(p, f)
    if problem:
        kind, why = problem
        return review(kind, f"success callback not proven: {why}", Changes(phone_check=_phone_flag(p, cb)))
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
                          Changes(candidate_receipt=cb.receipt, candidate_checkout_request_id=cb.checkout_request_id,
                                  candidate_transaction_time=cb.transaction_time, phone_check=phone.value,
                                  merchant_request_id=cb.merchant_request_id))
    return applied(State.SETTLED, untrusted(cb.result_desc) or "paid",
                   Changes(mpesa_receipt=cb.receipt, transaction_time=cb.transaction_time,
                           result_code=cb.result_code, result_desc=untrusted(cb.result_desc),
                           phone_check=phone.value, checkout_request_id=cb.checkout_request_id,
                           merchant_request_id=cb.merchant_request_id))


def _proof_problem(p: Payment, f: CallbackReceived) -> tuple[str, str] | None:
    """(alert kind, why) when a success callback lacks part of its proof; None when all of it holds:
    the accepted push's CheckoutRequestID, the exact amount, an unused receipt of M-Pesa's form and a
    phone number that does not differ from the payment's."""
    cb = f.callback
    if p.checkout_request_id is not None and cb.checkout_request_id != p.checkout_request_id:
        return "callback_mismatch", (f"CheckoutRequestID {untrusted(cb.checkout_request_id)} is not the accepted "
                                     f"push's {p.checkout_request_id}")
    if f.checkout_owner is not None:
        return "callback_mismatch", (f"CheckoutRequestID {untrusted(cb.checkout_request_id)} belongs to payment "
                                     f"{f.checkout_owner}")
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
                          Changes(candidate_checkout_request_id=cb.checkout_request_id,
                                  candidate_result_code=untrusted(cb.result_code, 64),
                                  merchant_request_id=cb.merchant_request_id))
    ids = Changes(checkout_request_id=cb.checkout_request_id, merchant_request_id=cb.merchant_request_id)
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
                       Changes(mpesa_receipt=cb.receipt, transaction_time=cb.transaction_time,
                               phone_check=_phone_flag(p, cb)))
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
                                         f"{p.state}: money moved", Changes(late_receipt=cb.receipt))


def _failure(code: str, desc: str | None, source: str, ids: Changes) -> Decision:
    meaning = FAILURE_MEANINGS.get(code)
    if meaning is None:
        return review("unknown_result_code", f"{source} result code {code!r} is not a known outcome: {desc}",
                      ids.merged(Changes(result_code=code, result_desc=desc)))
    return applied(State.CANCELLED, meaning, ids.merged(Changes(result_code=code, result_desc=desc)))


# --- STK query answers -----------------------------------------------------------------------

def on_query(p: Payment, f: QueryAnswered) -> Decision:
    asked = p.checkout_request_id or p.candidate_checkout_request_id
    if f.checkout_request_id and asked and f.checkout_request_id != asked:
        return rejected(f"query answer for CheckoutRequestID {f.checkout_request_id}, the payment's is {asked}")
    if f.status in ("PROCESSING", "ERROR"):
        return applied(None, f"query: {f.status.lower()} ({f.result_code})")
    ids = Changes(checkout_request_id=f.checkout_request_id) if f.checkout_request_id else NO_CHANGES
    if p.state in OPEN and p.candidate_receipt:
        return _confirmation(p, f)
    if p.state in OPEN and p.candidate_result_code:
        return _failure_confirmation(p, f)
    if p.state in OPEN:
        if f.status == "SUCCESS":
            return applied(State.SETTLED, "confirmed by STK query (the query gives no receipt number)",
                           ids.merged(Changes(result_code="0", result_desc=f.result_desc)))
        return _failure(f.result_code or "", f.result_desc, "query", ids)
    if (f.status == "SUCCESS") == (p.state == State.SETTLED):
        return duplicate()
    if p.state == State.SETTLED:
        return contradiction("query_contradicts", f"STK query says {f.status} {f.result_code} for a payment "
                                                  f"Settled; the payment stays Settled")
    return review("query_contradicts", f"query says {f.status} {f.result_code} but the payment is {p.state}")


def _confirmation(p: Payment, f: QueryAnswered) -> Decision:
    """The answer to the query that confirms a success callback: the authenticated channel decides."""
    if f.status == "SUCCESS":
        return applied(State.SETTLED, f"success callback confirmed by STK query (receipt {p.candidate_receipt})",
                       CANDIDATE_CLEARED.merged(Changes(
                           mpesa_receipt=p.candidate_receipt, checkout_request_id=p.candidate_checkout_request_id,
                           transaction_time=p.candidate_transaction_time, result_code="0",
                           result_desc=f.result_desc)))
    return review("query_contradicts", f"STK query says {f.status} {f.result_code}, contradicting the success "
                                       f"callback (receipt {p.candidate_receipt})")


def _failure_confirmation(p: Payment, f: QueryAnswered) -> Decision:
    """The answer to the query that confirms a failure callback after an unknown push outcome. A
    success here does not settle: the id came from an unproven callback, and a query only tells that
    some push under that id succeeded, not that it was this payment's (docs/callback-proof.md)."""
    ids = CANDIDATE_CLEARED.merged(Changes(checkout_request_id=p.candidate_checkout_request_id))
    if f.status == "SUCCESS":
        return review("query_contradicts", f"STK query says SUCCESS for the CheckoutRequestID of the failure "
                                           f"callback {p.candidate_result_code}")
    return _failure(f.result_code or p.candidate_result_code or "", f.result_desc, "query", ids)


# --- Reconciliation --------------------------------------------------------------------------

def on_expired(p: Payment, f: ReconciliationExpired) -> Decision:
    if p.state in OPEN:
        return review(DEADLINE_ALERT, f"no final answer after {f.age_seconds} s of callbacks and queries")
    return duplicate()


# --- Review ----------------------------------------------------------------------------------

def in_review(p: Payment, fact: Fact, owners: Owners | None) -> Decision:
    """A payment under review waits for an operator; facts are kept in the audit trail. A Review
    that the review deadline alone caused is not a doubt but a lack of news, and the news may come
    late (a ledger that was behind, a push retried for long): a fact that would have closed the
    payment before its deadline still closes it, with the same proof (a proven success settles, a
    definite failure cancels), and what a fact teaches without closing it (the push's
    CheckoutRequestID) is kept while it stays in Review. A contradiction leaves it in Review.

    Daraja's refusal of the push ends it only if no push may have reached the customer (none
    accepted, none of unknown outcome, no callback awaiting its query): then Daraja never prompted
    the customer, and the payment is Failed.

    A query's answer that is kept says what it answered: an operator may have asked it, and reads
    the answer in the audit trail."""
    if p.review_alert != DEADLINE_ALERT:
        return duplicate(_kept_in_review(fact, "fact kept in the audit trail"))
    if isinstance(fact, PushRefused):
        if p.checkout_request_id is None and not p.push_unknown and p.candidate_checkout_request_id is None:
            return applied(State.FAILED, f"Daraja refused the push after the review deadline, so it never "
                                         f"prompted the customer: {fact.message}".strip(),
                           Changes(result_code=fact.code, result_desc=fact.message))
        return duplicate("payment is under review; fact kept in the audit trail")
    as_open = dataclasses.replace(p, state=State.PENDING if p.checkout_request_id else State.REQUESTED)
    d = _decide_open(as_open, fact, owners)
    if d.verdict is not Verdict.APPLIED:
        return d
    if d.new_state in FINAL_STATES:
        return dataclasses.replace(d, reason=f"after the review deadline: {d.reason}")
    if d.new_state == State.REVIEW:
        return duplicate(_kept_in_review(fact, str(d.reason)))
    return dataclasses.replace(d, new_state=None)


def _kept_in_review(fact: Fact, why: str) -> str:
    if not isinstance(fact, QueryAnswered):
        return f"payment is under review; {why}"
    return (f"payment is under review; the STK query answered {untrusted(fact.status, 20)} (result code "
            f"{untrusted(fact.result_code, 64)}: {untrusted(fact.result_desc)}); {why}")


# --- Operator instructions -------------------------------------------------------------------
# An operator acts on what the audit trail, the callbacks and the STK query showed. The ledger
# still checks what it can: a query needs a push to ask about; a resolution applies only to a
# payment in Review (a final state stays final, an open one is still being decided by Daraja's
# answers); and a settlement's receipt has M-Pesa's form and proves no other payment.

def on_operator(p: Payment | None, f: OperatorInstruction, owners: Owners | None) -> Decision:
    if not f.actor or not f.reason:
        return rejected("an operator's instruction names who gave it and why", refusal="no_actor_or_reason")
    if p is None:  # never parked: the desk showed the operator a payment that exists
        return rejected("no such payment", refusal="unknown_payment")
    if isinstance(f, OperatorQuery):
        return _operator_query(p, f)
    return _operator_resolution(p, f, owners or Owners(""))


def _operator_query(p: Payment, f: OperatorQuery) -> Decision:
    if f.receipt is not None:
        return rejected("a query carries no receipt (only SETTLE does)", refusal="receipt_not_expected")
    if p.state not in OPEN and p.state != State.REVIEW:
        return rejected(f"the payment is {p.state}: only an open payment or one in Review is queried",
                        refusal="final")
    checkout = p.checkout_request_id or p.candidate_checkout_request_id
    if checkout is None:
        return rejected("no CheckoutRequestID is known for this payment: there is no push to query",
                        refusal="nothing_to_query")
    if checkout.startswith("ck_"):  # services/common/pseudonyms.py CHECKOUT: Daraja knows no pseudonym
        return rejected("the push's CheckoutRequestID was replaced by its pseudonym with the payer's data: "
                        "Daraja cannot be asked about it", refusal="nothing_to_query")
    return Decision(Verdict.APPLIED, None, NO_CHANGES, f.reason, query=checkout, query_reason="OPERATOR",
                    detail=f"STK query of {checkout} asked: {f.reason}")


def _operator_resolution(p: Payment, f: OperatorResolution, owners: Owners) -> Decision:
    if p.state != State.REVIEW:
        return rejected(f"the payment is {p.state}, not in Review: only a payment in Review is resolved",
                        refusal="not_in_review")
    if f.action not in ("SETTLE", "CANCEL"):
        return rejected(f"no such resolution: {untrusted(f.action, 20)}", refusal="unknown_action")
    if f.action == "CANCEL":
        if f.receipt is not None:
            return rejected("a cancellation carries no receipt (only SETTLE does)", refusal="receipt_not_expected")
        return applied(State.CANCELLED, f.reason)
    if f.receipt is None:
        return rejected("SETTLE needs the M-Pesa receipt that proves the money moved", refusal="no_receipt")
    if not RECEIPT.fullmatch(f.receipt):
        return rejected(f"receipt {untrusted(f.receipt, 40)} is not of M-Pesa's form (10 upper-case letters "
                        f"and digits)", refusal="receipt_malformed")
    if p.mpesa_receipt is not None and p.mpesa_receipt != f.receipt:
        return rejected(f"the payment holds receipt {p.mpesa_receipt} already", refusal="receipt_differs")
    other = owners.of_receipt(f.receipt)
    if other is not None:
        return rejected(f"receipt {f.receipt} already proves payment {other}", refusal="receipt_reused")
    return Decision(Verdict.APPLIED, State.SETTLED, Changes(mpesa_receipt=f.receipt), f.reason,
                    detail=f"settled with receipt {f.receipt}: {f.reason}")


# --- Rules across payments -------------------------------------------------------------------

def _with_owners(fact: CallbackReceived, owners: Owners) -> CallbackReceived:
    """The callback with the other payments its receipt and CheckoutRequestID already belong to."""
    cb = fact.callback
    receipt_owner = fact.receipt_owner or (owners.of_receipt(cb.receipt) if cb.receipt else None)
    checkout_owner = fact.checkout_owner or owners.of_checkout(cb.checkout_request_id)
    if (receipt_owner, checkout_owner) == (fact.receipt_owner, fact.checkout_owner):
        return fact
    return dataclasses.replace(fact, receipt_owner=receipt_owner, checkout_owner=checkout_owner)


def _receipt_checked(d: Decision, owners: Owners) -> Decision:
    """One receipt proves one payment: a receipt already used elsewhere is a case for review."""
    receipt = d.changes.mpesa_receipt
    other = owners.of_receipt(receipt) if isinstance(receipt, str) else None
    if other is None:
        return d
    return review("receipt_reused", f"receipt {receipt} already proves payment {other}",
                  d.changes.without("mpesa_receipt", *CANDIDATE_FIELDS))


def _checkout_checked(p: Payment | None, d: Decision, owners: Owners) -> Decision:
    """One CheckoutRequestID is one push. An accepted push whose id another payment holds already
    (a callback for a payment whose push outcome was unknown named it) is a contradiction: written,
    it would break the unique index and dead-letter whichever event applied it, even an innocent
    one that un-parked it. A final payment stays final."""
    checkout = d.changes.checkout_request_id
    other = owners.of_checkout(checkout) if isinstance(checkout, str) else None
    if other is None:
        return d
    reason = f"CheckoutRequestID {untrusted(checkout)} already belongs to payment {other}"
    if p is not None and p.state in FINAL_STATES:
        return contradiction("checkout_reused", f"{reason}; the payment stays {p.state}")
    return review("checkout_reused", reason, d.changes.without("checkout_request_id", "merchant_request_id"))


HANDLERS: Final[dict[type, Callable[[Payment, Fact], Decision]]] = {
    PushAccepted: on_push_accepted,  # type: ignore[dict-item]
    PushRefused: on_push_refused,  # type: ignore[dict-item]
    PushOutcomeUnknown: on_push_unknown,  # type: ignore[dict-item]
    CallbackReceived: on_callback,  # type: ignore[dict-item]
    QueryAnswered: on_query,  # type: ignore[dict-item]
    ReconciliationExpired: on_expired,  # type: ignore[dict-item]
}


def decide(payment: Payment | None, fact: Fact, owners: Owners | None = None) -> Decision:
    """owners: who holds the receipts and CheckoutRequestIDs this fact may write (None: nobody else)."""
    if isinstance(fact, Requested):
        return on_requested(payment, fact)
    if isinstance(fact, (OperatorQuery, OperatorResolution)):
        return on_operator(payment, fact, owners)
    if payment is None:
        return PARK if isinstance(fact, (PushAccepted, PushRefused, PushOutcomeUnknown, CallbackReceived)) \
            else rejected("fact about an unknown payment")
    if payment.state == State.REVIEW:
        return in_review(payment, fact, owners)
    return _decide_open(payment, fact, owners)


def _decide_open(payment: Payment, fact: Fact, owners: Owners | None) -> Decision:
    if owners is None:
        return HANDLERS[type(fact)](payment, fact)
    if isinstance(fact, CallbackReceived):
        fact = _with_owners(fact, owners)
    decision = _receipt_checked(HANDLERS[type(fact)](payment, fact), owners)
    return _checkout_checked(payment, decision, owners)
