"""Turns consumed events into the state machine's facts (pure)."""
from __future__ import annotations

from services.common.kafka import ConsumedEvent
from services.common.payment import event_problem
from services.ledger import state_machine as sm
from services.ledger.callbacks import parse_callback


class NotAFact(ValueError):
    """The event cannot be applied to any payment (it is dead-lettered with this reason)."""


def fact_of(event: ConsumedEvent) -> tuple[str, sm.Fact]:
    """Returns (payment id, fact); raises NotAFact or CallbackParseError for what can't apply."""
    v = event.value
    payment_id = v.get("payment_id")
    if not payment_id:
        raise NotAFact(f"{event.schema} event without a payment id")
    if event.schema == "payment_requested":
        return payment_id, sm.Requested(invalid_reason=event_problem(v))
    if event.schema == "stk_push_result":
        return payment_id, _push_fact(v)
    if event.schema == "callback_raw":
        return payment_id, sm.CallbackReceived(parse_callback(v["body"]))
    if event.schema == "stk_query_result":
        return payment_id, sm.QueryAnswered(v["status"], v["checkout_request_id"], v["result_code"], v["result_desc"])
    raise NotAFact(f"the ledger does not consume {event.schema} events")


def _push_fact(v: dict) -> sm.Fact:
    outcome = v["outcome"]
    if outcome == "ACCEPTED":
        if not v["checkout_request_id"]:
            raise NotAFact("accepted push result without a CheckoutRequestID")
        return sm.PushAccepted(v["merchant_request_id"], v["checkout_request_id"])
    if outcome in ("REFUSED", "INVALID"):
        return sm.PushRefused(v["error_code"] or outcome, v["error_message"] or "")
    return sm.PushOutcomeUnknown(v["error_message"] or "no answer from Daraja")
