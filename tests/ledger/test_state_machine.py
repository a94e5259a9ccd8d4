"""The pure state machine: every callback case of daraja.md, duplicates, early facts, contradictions."""
import pytest

from services.ledger import state_machine as sm
from services.daraja.result_codes import FAILURE_MEANINGS
from services.ledger.callbacks import parse_callback
from tests.ledger.callbacks import failure, success

PENDING = sm.Payment("Pending", 100, "254712345678", "ws_CO_1")


def callback(body: bytes) -> sm.CallbackReceived:
    return sm.CallbackReceived(parse_callback(body))


def test_a_new_request_is_recorded_and_a_repeat_is_a_duplicate():
    assert sm.decide(None, sm.Requested()).new_state == "Requested"
    assert sm.decide(PENDING, sm.Requested()).verdict is sm.Verdict.DUPLICATE


def test_an_invalid_request_from_the_topic_ends_failed_with_its_reason():
    d = sm.decide(None, sm.Requested(invalid_reason="invalid request: amount must be ..."))
    assert (d.new_state, d.reason) == ("Failed", "invalid request: amount must be ...")


def test_push_accepted_makes_the_payment_pending():
    d = sm.decide(sm.Payment("Requested", 100, "254712345678"), sm.PushAccepted("m1", "ws_CO_1"))
    assert d.new_state == "Pending" and d.changes["checkout_request_id"] == "ws_CO_1"
    assert sm.decide(PENDING, sm.PushAccepted("m1", "ws_CO_1")).verdict is sm.Verdict.DUPLICATE


def test_a_second_accepted_push_goes_to_review():
    d = sm.decide(PENDING, sm.PushAccepted("m2", "ws_CO_2"))
    assert (d.new_state, d.alert) == ("Review", "second_push")


def test_a_refused_push_fails_the_payment():
    d = sm.decide(sm.Payment("Requested", 100, "254712345678"), sm.PushRefused("500.001.1001", "Merchant does not exist"))
    assert (d.new_state, d.changes["result_code"]) == ("Failed", "500.001.1001")


def test_success_callback_settles_with_receipt():
    d = sm.decide(PENDING, callback(success("ws_CO_1")))
    assert d.new_state == "Settled" and d.changes["mpesa_receipt"] == "NLJ7RT61SV"


@pytest.mark.parametrize("code", sorted(FAILURE_MEANINGS))
def test_every_failure_code_of_the_catalogue_cancels_with_its_meaning(code):
    code_value = int(code) if code.isdigit() else code
    d = sm.decide(PENDING, callback(failure("ws_CO_1", code_value, "whatever")))
    assert (d.new_state, d.reason, d.changes["result_code"]) == ("Cancelled", FAILURE_MEANINGS[code], code)


def test_an_unknown_result_code_goes_to_review_not_to_a_guess():
    d = sm.decide(PENDING, callback(failure("ws_CO_1", 4242)))
    assert (d.new_state, d.alert) == ("Review", "unknown_result_code")


@pytest.mark.parametrize("body, why", [
    (success("ws_CO_1", amount=99), "amount"),
    (success("ws_CO_1", phone=254799999999), "phone"),
    (success("ws_CO_9"), "CheckoutRequestID"),
])
def test_callbacks_that_do_not_match_the_payment_go_to_review(body, why):
    d = sm.decide(PENDING, callback(body))
    assert d.new_state == "Review" and why in d.reason


def test_duplicate_callbacks_change_nothing():
    settled = sm.Payment("Settled", 100, "254712345678", "ws_CO_1", "NLJ7RT61SV", "0")
    cancelled = sm.Payment("Cancelled", 100, "254712345678", "ws_CO_1", None, "1032")
    assert sm.decide(settled, callback(success("ws_CO_1"))).verdict is sm.Verdict.DUPLICATE
    assert sm.decide(cancelled, callback(failure("ws_CO_1", 1032))).verdict is sm.Verdict.DUPLICATE


def test_success_after_cancel_surfaces_as_review_with_an_alert():
    cancelled = sm.Payment("Cancelled", 100, "254712345678", "ws_CO_1", None, "1032")
    d = sm.decide(cancelled, callback(success("ws_CO_1")))
    assert (d.verdict, d.new_state, d.alert) == (sm.Verdict.APPLIED, "Review", "success_after_final")


def test_facts_before_their_payment_are_parked():
    assert sm.decide(None, callback(success("ws_CO_1"))).verdict is sm.Verdict.PARKED
    assert sm.decide(None, sm.PushAccepted("m", "ws_CO_1")).verdict is sm.Verdict.PARKED


def test_a_callback_before_the_push_result_still_settles():
    requested = sm.Payment("Requested", 100, "254712345678")
    assert sm.decide(requested, callback(success("ws_CO_1"))).new_state == "Settled"
    settled = sm.Payment("Settled", 100, "254712345678", "ws_CO_1", "NLJ7RT61SV", "0")
    assert sm.decide(settled, sm.PushAccepted("m1", "ws_CO_1")).verdict is sm.Verdict.DUPLICATE


@pytest.mark.parametrize("status, code, state", [("SUCCESS", "0", "Settled"), ("FAILED", "1032", "Cancelled")])
def test_query_answers_settle_open_payments(status, code, state):
    assert sm.decide(PENDING, sm.QueryAnswered(status, "ws_CO_1", code, "x")).new_state == state


@pytest.mark.parametrize("status", ["PROCESSING", "ERROR"])
def test_still_processing_keeps_waiting(status):
    d = sm.decide(PENDING, sm.QueryAnswered(status, "ws_CO_1", "4999", "still under processing"))
    assert d.verdict is sm.Verdict.APPLIED and d.new_state is None


def test_a_query_contradicting_the_callback_is_surfaced():
    settled = sm.Payment("Settled", 100, "254712345678", "ws_CO_1", "NLJ7RT61SV", "0")
    d = sm.decide(settled, sm.QueryAnswered("FAILED", "ws_CO_1", "1032", "cancelled"))
    assert (d.new_state, d.alert) == ("Review", "query_contradicts")


def test_reconciliation_deadline_sends_open_payments_to_review():
    assert sm.decide(PENDING, sm.ReconciliationExpired(900)).new_state == "Review"
