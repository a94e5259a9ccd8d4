"""The ledger's own input, and the translation of the events it consumes into it (pure).

A `LedgerInput` is what the application service applies: a fact about one payment, with the id it
is applied once under, where it came from, the channel it claims, and the bytes to keep should it
have to wait for its payment. Events from Kafka become inputs at the consumer's edge
(services/ledger/service.py); the reconciler's timer facts are inputs of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from services.common.payment import event_problem
from services.common.text import untrusted
from services.ledger import state_machine as sm
from services.ledger.callbacks import parse_callback
from services.ledger.record import NewPayment

RECONCILIATION: Final = "reconciliation"  # the source of the reconciler's timer facts
ACTOR_MAX: Final = 199   # characters of an operator's name, with untrusted()'s ellipsis: audit_log.actor's 200
REASON_MAX: Final = 499  # characters of an operator's reason, with the ellipsis: 500 (schemas/operator_command.avsc)


class NotAFact(ValueError):
    """The event cannot be applied to any payment (it is dead-lettered with this reason)."""


@dataclass(frozen=True)
class LedgerInput:
    event_id: str                 # applied once under this id (processed_events)
    source: str                   # the topic it came from, or RECONCILIATION
    payment_id: str
    fact: sm.Fact
    claimed_channel: str | None   # the channel the event names; the reconciler's facts name none
    request: NewPayment | None = None  # what a payment request brings to its new row
    raw: bytes | None = None      # the event as consumed, kept as is if it must wait (parked)
    callback_body: bytes | None = None  # a callback's body as received, kept for the review desk


def input_of(source: str, schema: str, value: dict[str, Any], raw: bytes | None) -> LedgerInput:
    """Raises NotAFact, CallbackParseError (or KeyError on a shapeless value) for what can't apply."""
    payment_id = value.get("payment_id")
    if not payment_id:
        raise NotAFact(f"{schema} event without a payment id")
    fact, request = _fact(schema, value)
    body = value["body"] if schema == "callback_raw" else None
    return LedgerInput(value["event_id"], source, payment_id, fact, value.get("channel_id"), request, raw, body)


def _fact(schema: str, v: dict[str, Any]) -> tuple[sm.Fact, NewPayment | None]:
    if schema == "payment_requested":
        return sm.Requested(invalid_reason=event_problem(v)), _new_payment(v)
    if schema == "stk_push_result":
        return _push_fact(v), None
    if schema == "callback_raw":
        return sm.CallbackReceived(parse_callback(v["body"])), None
    if schema == "stk_query_result":
        return sm.QueryAnswered(v["status"], v["checkout_request_id"], v["result_code"], v["result_desc"]), None
    if schema == "operator_command":
        return _operator_fact(v), None
    raise NotAFact(f"the ledger does not consume {schema} events")


def _new_payment(v: dict[str, Any]) -> NewPayment:
    return NewPayment(v["payment_id"], v["channel_id"], v["amount"], v["phone"], v["account_reference"],
                      v["description"], v["order_reference"], v["metadata"], v["occurred_at"])


def _operator_fact(v: dict[str, Any]) -> sm.Fact:
    """Who and why are foreign text, kept in the audit trail and the status event: cleaned and
    bounded here (audit_log.actor holds up to 200 characters). The receipt is checked by decide()."""
    actor, reason = untrusted(v["actor"], ACTOR_MAX).strip(), untrusted(v["reason"], REASON_MAX).strip()
    if v["action"] == "QUERY":
        return sm.OperatorQuery(actor, reason, v["mpesa_receipt"])
    return sm.OperatorResolution(v["action"], v["mpesa_receipt"], actor, reason)


def _push_fact(v: dict[str, Any]) -> sm.Fact:
    outcome = v["outcome"]
    if outcome == "ACCEPTED":
        if not v["checkout_request_id"]:
            raise NotAFact("accepted push result without a CheckoutRequestID")
        return sm.PushAccepted(v["merchant_request_id"], v["checkout_request_id"])
    if outcome in ("REFUSED", "INVALID"):
        return sm.PushRefused(v["error_code"] or outcome, v["error_message"] or "")
    return sm.PushOutcomeUnknown(v["error_message"] or "no answer from Daraja")
