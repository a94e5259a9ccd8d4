"""The pure rules of an operator's instructions (docs/design.md, "The review desk's instructions"):
a query needs a push to ask about, a resolution applies only to a payment in Review, and a
settlement's receipt has M-Pesa's form and proves no other payment. Everything else is refused
with its reason and changes nothing."""
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from services.common.payment import FINAL_STATES, PaymentState
from services.ledger import state_machine as sm

REVIEW = sm.Payment("Review", 100, "254712345678", "ws_CO_1", review_alert="callback_mismatch")
PENDING = sm.Payment("Pending", 100, "254712345678", "ws_CO_1")
RECEIPT = "NLJ7RT61SV"


def settle(receipt: str | None = RECEIPT, actor: str = "wanjiru", reason: str = "paid at the till") -> sm.Fact:
    return sm.OperatorResolution("SETTLE", receipt, actor, reason)


def cancel(receipt: str | None = None, actor: str = "wanjiru", reason: str = "customer refunded") -> sm.Fact:
    return sm.OperatorResolution("CANCEL", receipt, actor, reason)


def query(receipt: str | None = None, actor: str = "wanjiru", reason: str = "customer says paid") -> sm.Fact:
    return sm.OperatorQuery(actor, reason, receipt)


def owners(receipts: dict[str, str] | None = None) -> sm.Owners:
    return sm.Owners("this", receipts or {})


def assert_refused(d: sm.Decision, refusal: str) -> None:
    assert (d.verdict, d.new_state, d.changes, d.query, d.refusal) == (
        sm.Verdict.REJECTED, None, sm.NO_CHANGES, None, refusal), d


def test_settle_resolves_a_payment_in_review_with_its_receipt_and_the_operators_words():
    d = sm.decide(REVIEW, settle(), owners())
    assert (d.verdict, d.new_state, d.changes.mpesa_receipt, d.reason) == (
        sm.Verdict.APPLIED, "Settled", RECEIPT, "paid at the till")
    assert RECEIPT in str(d.detail) and "paid at the till" in str(d.detail)


def test_cancel_resolves_a_payment_in_review():
    d = sm.decide(REVIEW, cancel(), owners())
    assert (d.verdict, d.new_state, d.changes, d.reason) == (sm.Verdict.APPLIED, "Cancelled", sm.NO_CHANGES,
                                                            "customer refunded")


def test_settle_with_the_late_receipt_the_payment_holds_itself_is_allowed():
    late = replace(REVIEW, state="Review", review_alert="success_after_final")
    d = sm.decide(late, settle(), owners({RECEIPT: "this"}))
    assert (d.new_state, d.changes.mpesa_receipt) == ("Settled", RECEIPT)


@pytest.mark.parametrize("state", [s for s in PaymentState if s != PaymentState.REVIEW])
@pytest.mark.parametrize("instruction", [settle(), cancel()])
def test_a_resolution_of_a_payment_not_in_review_is_refused(state, instruction):
    d = sm.decide(replace(REVIEW, state=state), instruction, owners())
    assert_refused(d, "not_in_review")
    assert str(state) in str(d.reason)


@pytest.mark.parametrize("receipt, refusal", [
    (None, "no_receipt"),
    ("", "receipt_malformed"),
    ("nlj7rt61sv", "receipt_malformed"),
    ("NLJ7RT61S", "receipt_malformed"),
    ("NLJ7RT61SV\n", "receipt_malformed"),
    ("NLJ7RT61SV ' OR 1=1", "receipt_malformed"),
])
def test_settle_without_a_receipt_of_mpesas_form_is_refused(receipt, refusal):
    assert_refused(sm.decide(REVIEW, settle(receipt), owners()), refusal)


def test_settle_with_a_receipt_that_proves_another_payment_is_refused():
    d = sm.decide(REVIEW, settle(), owners({RECEIPT: "other-payment"}))
    assert_refused(d, "receipt_reused")
    assert "other-payment" in str(d.reason)


def test_settle_with_another_receipt_than_the_one_the_payment_holds_is_refused():
    assert_refused(sm.decide(replace(REVIEW, mpesa_receipt="QWERTY1234"), settle(), owners()), "receipt_differs")


def test_a_cancel_or_a_query_carrying_a_receipt_is_refused():
    assert_refused(sm.decide(REVIEW, cancel(RECEIPT), owners()), "receipt_not_expected")
    assert_refused(sm.decide(REVIEW, query(RECEIPT), owners()), "receipt_not_expected")


@pytest.mark.parametrize("instruction", [settle(actor=""), settle(reason=""), cancel(actor=""), query(reason="")])
def test_an_instruction_without_who_or_why_is_refused(instruction):
    assert_refused(sm.decide(REVIEW, instruction, owners()), "no_actor_or_reason")


def test_an_instruction_about_an_unknown_payment_is_refused_not_parked():
    for instruction in (settle(), cancel(), query()):
        assert_refused(sm.decide(None, instruction, owners()), "unknown_payment")


@pytest.mark.parametrize("payment", [PENDING, REVIEW, sm.Payment("Requested", 100, "254712345678", push_unknown=True,
                                                                 candidate_checkout_request_id="ws_CO_1")])
def test_a_query_of_an_open_or_review_payment_asks_about_its_push_and_changes_no_state(payment):
    d = sm.decide(payment, query(), owners())
    assert (d.verdict, d.new_state, d.changes, d.query, d.query_reason) == (
        sm.Verdict.APPLIED, None, sm.NO_CHANGES, "ws_CO_1", "OPERATOR")
    assert "customer says paid" in str(d.detail)


def test_a_query_without_a_known_checkout_request_id_is_refused():
    assert_refused(sm.decide(sm.Payment("Requested", 100, "254712345678"), query(), owners()), "nothing_to_query")
    assert_refused(sm.decide(replace(REVIEW, checkout_request_id=None), query(), owners()), "nothing_to_query")


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
def test_a_query_of_a_final_payment_is_refused(state):
    assert_refused(sm.decide(replace(PENDING, state=state), query(), owners()), "final")


def test_a_query_answer_kept_for_a_payment_in_review_says_what_it_answered():
    answer = sm.QueryAnswered("FAILED", "ws_CO_1", "1032", "Request cancelled by user\x1b[2J")
    d = sm.decide(REVIEW, answer)
    assert d.verdict is sm.Verdict.DUPLICATE
    assert "FAILED" in str(d.reason) and "1032" in str(d.reason) and "Request cancelled by user" in str(d.reason)
    assert "\x1b" not in str(d.reason)  # Daraja's words are foreign text


def test_a_query_answer_kept_after_the_review_deadline_says_what_it_answered_too():
    unresolved = replace(REVIEW, review_alert=sm.DEADLINE_ALERT, candidate_receipt=RECEIPT,
                         candidate_checkout_request_id="ws_CO_1")
    d = sm.decide(unresolved, sm.QueryAnswered("FAILED", "ws_CO_1", "1032", "cancelled by user"))
    assert d.verdict is sm.Verdict.DUPLICATE and "FAILED (result code 1032: cancelled by user)" in str(d.reason)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(state=st.sampled_from(list(PaymentState)), action=st.sampled_from(["SETTLE", "CANCEL", "QUERY"]),
       receipt=st.none() | st.just(RECEIPT) | st.text(max_size=12),
       actor=st.text(max_size=5), reason=st.text(max_size=5), taken=st.booleans())
def test_no_instruction_moves_a_payment_out_of_any_state_but_review(state, action, receipt, actor, reason, taken):
    payment = replace(REVIEW, state=state)
    fact = query(receipt, actor, reason) if action == "QUERY" else sm.OperatorResolution(action, receipt, actor, reason)
    d = sm.decide(payment, fact, owners({RECEIPT: "other"} if taken else {}))
    if d.new_state is not None:
        assert state == "Review" and actor and reason
        assert d.new_state == ("Settled" if action == "SETTLE" else "Cancelled")
    if d.new_state == "Settled":  # settled only with an unused receipt of M-Pesa's form
        assert receipt == RECEIPT and not taken
    if d.verdict is sm.Verdict.REJECTED:
        assert (d.changes, d.query, d.new_state) == (sm.NO_CHANGES, None, None) and d.refusal
