"""A payment as the ledger stores it: one typed row of `payments` (pure).

`PaymentRecord` has one field per column the ledger writes; a decision's `Changes` name a subset of
them, so `with_changes` cannot be handed a field with nowhere to go. `snapshot` is the view of it
the state machine decides on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from services.common.payment import PaymentState
from services.ledger.state_machine import CHANGES_FIELDS, Changes, Payment


@dataclass(frozen=True)
class NewPayment:
    """What a payment request brings to its row (schemas/payment_requested.avsc)."""
    payment_id: str
    channel_id: str
    amount: int
    phone: str
    account_reference: str | None
    description: str | None
    order_reference: str | None
    metadata: dict[str, str] | None
    requested_at: datetime


@dataclass(frozen=True)
class PaymentRecord:
    payment_id: str
    channel_id: str
    state: str
    amount: int
    phone: str
    account_reference: str | None
    description: str | None
    order_reference: str | None
    metadata: dict[str, str] | None
    merchant_request_id: str | None
    checkout_request_id: str | None
    mpesa_receipt: str | None
    transaction_time: datetime | None
    result_code: str | None
    result_desc: str | None
    requested_at: datetime
    push_unknown: bool
    pending_since: datetime | None
    next_query_at: datetime | None
    query_attempts: int
    review_reason: str | None
    final_at: datetime | None
    phone_check: str | None
    candidate_receipt: str | None
    candidate_checkout_request_id: str | None
    candidate_transaction_time: datetime | None
    late_receipt: str | None
    contradiction: str | None
    candidate_result_code: str | None
    review_alert: str | None

    def with_changes(self, state: str | None, *changes: Changes) -> PaymentRecord:
        """A copy with this state (None: the same) and these changes, the later winning."""
        written: dict[str, Any] = {}
        for c in changes:
            written.update(c.written())
        if state is not None:
            written["state"] = state
        if not written:
            return self
        # A copy of the attributes rather than dataclasses.replace(), which costs the ledger a tenth
        # of its CPU per event (bench/ledger_bench.py). Changes' fields are all columns (asserted below).
        copied = object.__new__(PaymentRecord)
        copied.__dict__.update(self.__dict__, **written)
        return copied


COLUMNS: Final = tuple(f.name for f in dataclasses.fields(PaymentRecord))
# Where a payment keeps a receipt or a CheckoutRequestID: one proves one payment, whichever column.
RECEIPT_COLUMNS: Final = ("mpesa_receipt", "candidate_receipt", "late_receipt")
CHECKOUT_COLUMNS: Final = ("checkout_request_id", "candidate_checkout_request_id")
_COLUMN_SET: Final = frozenset(COLUMNS)
assert set(CHANGES_FIELDS) <= _COLUMN_SET, "every field a decision may change is a column"


def new_record(request: NewPayment, now: datetime) -> PaymentRecord:
    """The row a payment starts as, before its first decision sets its state. Its deadlines count
    from its request time, which the event states: one dated in the future (a producer's clock, or
    a forgery straight to the topic) would put its review off for as long, so it counts from now."""
    return PaymentRecord(
        payment_id=request.payment_id, channel_id=request.channel_id, state=PaymentState.REQUESTED,
        amount=request.amount, phone=request.phone, account_reference=request.account_reference,
        description=request.description, order_reference=request.order_reference, metadata=request.metadata,
        merchant_request_id=None, checkout_request_id=None, mpesa_receipt=None, transaction_time=None,
        result_code=None, result_desc=None, requested_at=min(request.requested_at, now), push_unknown=False,
        pending_since=None, next_query_at=None, query_attempts=0, review_reason=None, final_at=None,
        phone_check=None, candidate_receipt=None, candidate_checkout_request_id=None,
        candidate_transaction_time=None, late_receipt=None, contradiction=None, candidate_result_code=None,
        review_alert=None)


def record_of(row: dict[str, Any]) -> PaymentRecord:
    """A payment read with SELECT of COLUMNS. Its attributes are set as a copy (see with_changes),
    without __init__'s per-field work: this runs for every payment a batch reads."""
    if row.keys() != _COLUMN_SET:
        raise ValueError(f"a payment row has columns {sorted(row.keys() ^ _COLUMN_SET)} it should not, or lacks them")
    record = object.__new__(PaymentRecord)
    record.__dict__.update(row)
    return record


def snapshot(record: PaymentRecord, *, confirm_by_query: bool, callbacks_closed: bool) -> Payment:
    return Payment(record.state, record.amount, record.phone, record.checkout_request_id, record.mpesa_receipt,
                   record.result_code, record.push_unknown, record.candidate_receipt,
                   record.candidate_checkout_request_id, record.candidate_transaction_time,
                   record.candidate_result_code, confirm_by_query=confirm_by_query,
                   callbacks_closed=callbacks_closed, review_alert=record.review_alert)
