"""The pure state machine: every callback case of docs/daraja.md, duplicates, early facts, contradictions,
and what a success callback must prove before it settles anything."""
import json
import re
import string
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from services.daraja.result_codes import FAILURE_MEANINGS
from services.ledger import state_machine as sm
from services.ledger.callbacks import CallbackParseError, parse_callback
from services.ledger.phones import PhoneCheck, check_phone
from tests.ledger.callbacks import OMIT, failure, success

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
    assert d.new_state == "Pending" and d.changes.checkout_request_id == "ws_CO_1"
    assert sm.decide(PENDING, sm.PushAccepted("m1", "ws_CO_1")).verdict is sm.Verdict.DUPLICATE


def test_a_second_accepted_push_goes_to_review():
    d = sm.decide(PENDING, sm.PushAccepted("m2", "ws_CO_2"))
    assert (d.new_state, d.alert) == ("Review", "second_push")


def test_a_refused_push_fails_the_payment():
    d = sm.decide(sm.Payment("Requested", 100, "254712345678"),
                  sm.PushRefused("500.001.1001", "Merchant does not exist"))
    assert (d.new_state, d.changes.result_code) == ("Failed", "500.001.1001")


def test_success_callback_settles_with_receipt():
    d = sm.decide(PENDING, callback(success("ws_CO_1")))
    assert d.new_state == "Settled" and d.changes.mpesa_receipt == "NLJ7RT61SV"


@pytest.mark.parametrize("code", sorted(FAILURE_MEANINGS))
def test_every_failure_code_of_the_catalogue_cancels_with_its_meaning(code):
    code_value = int(code) if code.isdigit() else code
    d = sm.decide(PENDING, callback(failure("ws_CO_1", code_value, "whatever")))
    assert (d.new_state, d.reason, d.changes.result_code) == ("Cancelled", FAILURE_MEANINGS[code], code)


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
    assert d.new_state == "Review" and why in str(d.reason)


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


def test_a_callback_before_the_push_result_waits_for_it():
    """Until the push result names the accepted CheckoutRequestID, any id would do: the callback waits."""
    requested = sm.Payment("Requested", 100, "254712345678")
    assert sm.decide(requested, callback(success("ws_CO_1"))).verdict is sm.Verdict.PARKED
    assert sm.decide(requested, callback(failure("ws_CO_1", 1032))).verdict is sm.Verdict.PARKED
    settled = sm.Payment("Settled", 100, "254712345678", "ws_CO_1", "NLJ7RT61SV", "0")
    assert sm.decide(settled, sm.PushAccepted("m1", "ws_CO_1")).verdict is sm.Verdict.DUPLICATE


@pytest.mark.parametrize("status, code, state", [("SUCCESS", "0", "Settled"), ("FAILED", "1032", "Cancelled")])
def test_query_answers_settle_open_payments(status, code, state):
    assert sm.decide(PENDING, sm.QueryAnswered(status, "ws_CO_1", code, "x")).new_state == state


@pytest.mark.parametrize("status", ["PROCESSING", "ERROR"])
def test_still_processing_keeps_waiting(status):
    d = sm.decide(PENDING, sm.QueryAnswered(status, "ws_CO_1", "4999", "still under processing"))
    assert d.verdict is sm.Verdict.APPLIED and d.new_state is None


def test_a_query_contradicting_the_callback_is_surfaced_and_recorded_but_settled_stays_settled():
    settled = sm.Payment("Settled", 100, "254712345678", "ws_CO_1", "NLJ7RT61SV", "0")
    d = sm.decide(settled, sm.QueryAnswered("FAILED", "ws_CO_1", "1032", "cancelled"))
    assert (d.verdict, d.new_state, d.alert) == (sm.Verdict.APPLIED, None, "query_contradicts")
    assert "1032" in str(d.changes.contradiction)


def test_reconciliation_deadline_sends_open_payments_to_review():
    assert sm.decide(PENDING, sm.ReconciliationExpired(900)).new_state == "Review"


# --- A success proves itself (issue #11) -----------------------------------------------------

def decide_success(payment=PENDING, **body) -> sm.Decision:
    return sm.decide(payment, callback(success("ws_CO_1", **body)))


@pytest.mark.parametrize("body, kind, why", [
    ({"amount": OMIT}, "amount_mismatch", "no amount"),
    ({"amount": 99}, "amount_mismatch", "differs"),
    ({"amount": "100.01"}, "amount_mismatch", "differs"),
    ({"amount": 0}, "amount_mismatch", "differs"),  # NaN never gets this far: the parser refuses it
    ({"receipt": OMIT}, "receipt_malformed", "M-Pesa's form"),
    ({"receipt": ""}, "receipt_malformed", "M-Pesa's form"),
    ({"receipt": "   "}, "receipt_malformed", "M-Pesa's form"),
    ({"receipt": "nlj7rt61sv"}, "receipt_malformed", "M-Pesa's form"),
    ({"receipt": "NLJ7RT61S"}, "receipt_malformed", "M-Pesa's form"),
    ({"receipt": "NLJ7RT61SV\n"}, "receipt_malformed", "M-Pesa's form"),
    ({"receipt": "NLJ7-T61SV"}, "receipt_malformed", "M-Pesa's form"),
    ({"phone": 254799999999}, "phone_mismatch", "phone"),
    ({"phone": "0799999999"}, "phone_mismatch", "phone"),
    ({"phone": "25479****678"}, "phone_mismatch", "phone"),
])
def test_a_success_without_its_proof_goes_to_review_with_an_alert_and_a_reason(body, kind, why):
    d = decide_success(**body)
    assert (d.verdict, d.new_state, d.alert) == (sm.Verdict.APPLIED, "Review", kind)
    assert why in str(d.reason) and "mpesa_receipt" not in d.changes.written()


def test_a_forged_success_with_only_a_made_up_receipt_does_not_settle():
    body = json.dumps({"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0, "ResultDesc": "ok",
                                                "CallbackMetadata": {"Item": [{"Name": "MpesaReceiptNumber",
                                                                               "Value": "ABCDEFGHIJ"}]}}}}).encode()
    d = sm.decide(PENDING, callback(body))
    assert (d.new_state, d.alert) == ("Review", "amount_mismatch")


def test_a_receipt_or_checkout_id_that_proves_another_payment_goes_to_review():
    cb = parse_callback(success("ws_CO_1"))
    d = sm.decide(PENDING, sm.CallbackReceived(cb, receipt_owner="other-payment"))
    assert (d.new_state, d.alert) == ("Review", "receipt_reused") and "other-payment" in str(d.reason)
    unknown = sm.Payment("Requested", 100, "254712345678", push_unknown=True)
    d = sm.decide(unknown, sm.CallbackReceived(cb, checkout_owner="other-payment"))
    assert (d.new_state, d.alert) == ("Review", "callback_mismatch")


@pytest.mark.parametrize("amount", [100, "100", "100.00", "100.0", 100.0])  # 1E+2: the parser refuses it
def test_the_amount_is_compared_as_a_decimal(amount):
    assert decide_success(amount=amount).new_state == "Settled"


@pytest.mark.parametrize("phone", [254712345678, "254712345678", "+254712345678", "0712345678", "712345678",
                                   "25471****678", "2547******78", "254712****78"])
def test_a_genuine_success_with_a_masked_or_reformatted_phone_settles(phone):
    d = decide_success(phone=phone)
    assert (d.new_state, d.changes.phone_check) == ("Settled", "match")


@pytest.mark.parametrize("phone", [OMIT, "", "************", "254*********", "**********78",
                                   "25471234567", "2547123456789", 254712345678.0, "2547 1234 5678", "unknown", True])
def test_a_phone_that_cannot_be_compared_is_flagged_and_confirmed_by_query_not_settled(phone):
    d = decide_success(phone=phone)
    assert (d.verdict, d.new_state, d.query) == (sm.Verdict.APPLIED, None, "ws_CO_1")
    assert d.changes.phone_check == "unverifiable" and d.changes.candidate_receipt == "NLJ7RT61SV"
    assert "cannot be compared" in str(d.reason)
    assert all("254" not in str(v) for v in d.changes.written().values() if isinstance(v, str)
               and v != d.changes.candidate_checkout_request_id)  # never the number itself


def test_a_channel_that_confirms_by_query_keeps_the_success_pending_until_the_query():
    confirming = sm.Payment("Pending", 100, "254712345678", "ws_CO_1", confirm_by_query=True)
    d = decide_success(confirming)
    assert (d.new_state, d.query, d.changes.candidate_receipt) == (None, "ws_CO_1", "NLJ7RT61SV")
    waiting = replace(confirming, candidate_receipt="NLJ7RT61SV", candidate_checkout_request_id="ws_CO_1")
    settled = sm.decide(waiting, sm.QueryAnswered("SUCCESS", "ws_CO_1", "0", "ok"))
    assert (settled.new_state, settled.changes.mpesa_receipt, settled.changes.candidate_receipt) == (
        "Settled", "NLJ7RT61SV", None)
    contradicted = sm.decide(waiting, sm.QueryAnswered("FAILED", "ws_CO_1", "1032", "cancelled"))
    assert (contradicted.new_state, contradicted.alert) == ("Review", "query_contradicts")
    assert "NLJ7RT61SV" in str(contradicted.reason)
    still = sm.decide(waiting, sm.QueryAnswered("PROCESSING", "ws_CO_1", "4999", "processing"))
    assert (still.verdict, still.new_state) == (sm.Verdict.APPLIED, None)
    assert sm.decide(waiting, callback(success("ws_CO_1"))).verdict is sm.Verdict.DUPLICATE
    other = sm.decide(waiting, callback(success("ws_CO_1", receipt="QKH94M1Z11")))
    assert (other.new_state, other.alert) == ("Review", "callback_contradicts")
    assert sm.decide(waiting, callback(failure("ws_CO_1", 1032))).new_state == "Review"


def test_a_success_after_an_unknown_push_outcome_is_confirmed_by_a_query_for_its_checkout_id():
    unknown = sm.Payment("Requested", 100, "254712345678", push_unknown=True)
    d = sm.decide(unknown, callback(success("ws_CO_7")))
    assert (d.new_state, d.query, d.changes.candidate_checkout_request_id) == (None, "ws_CO_7", "ws_CO_7")
    waiting = replace(unknown, candidate_receipt="NLJ7RT61SV", candidate_checkout_request_id="ws_CO_7")
    assert sm.decide(waiting, sm.QueryAnswered("SUCCESS", "ws_CO_8", "0", "ok")).verdict is sm.Verdict.REJECTED
    settled = sm.decide(waiting, sm.QueryAnswered("SUCCESS", "ws_CO_7", "0", "ok"))
    assert (settled.new_state, settled.changes.checkout_request_id, settled.changes.mpesa_receipt) == (
        "Settled", "ws_CO_7", "NLJ7RT61SV")
    refused = sm.decide(waiting, sm.PushRefused("500.001.1001", "x"))
    assert (refused.new_state, refused.alert) == ("Review", "push_refused_after_success")


def test_a_failure_after_an_unknown_push_outcome_waits_for_a_query_for_its_checkout_id():
    """Nothing proves a failure's CheckoutRequestID when the push outcome is unknown: believed at once,
    anyone holding the URL could cancel the payment under a made-up id."""
    unknown = sm.Payment("Requested", 100, "254712345678", push_unknown=True)
    d = sm.decide(unknown, callback(failure("ws_CO_7", 1032)))
    assert (d.verdict, d.new_state, d.query) == (sm.Verdict.APPLIED, None, "ws_CO_7")
    assert (d.changes.candidate_checkout_request_id, d.changes.candidate_result_code) == ("ws_CO_7", "1032")
    waiting = replace(unknown, candidate_checkout_request_id="ws_CO_7", candidate_result_code="1032")
    assert sm.decide(waiting, callback(failure("ws_CO_7", 1032))).verdict is sm.Verdict.DUPLICATE
    assert sm.decide(waiting, sm.QueryAnswered("FAILED", "ws_CO_8", "1032", "x")).verdict is sm.Verdict.REJECTED
    cancelled = sm.decide(waiting, sm.QueryAnswered("FAILED", "ws_CO_7", "1032", "cancelled"))
    assert (cancelled.new_state, cancelled.changes.checkout_request_id, cancelled.changes.candidate_result_code
            ) == ("Cancelled", "ws_CO_7", None)
    # A query only says that some push under that id succeeded: not that it was this payment's.
    contradicted = sm.decide(waiting, sm.QueryAnswered("SUCCESS", "ws_CO_7", "0", "ok"))
    assert (contradicted.new_state, contradicted.alert) == ("Review", "query_contradicts")
    genuine = sm.decide(waiting, callback(success("ws_CO_1")))
    assert (genuine.new_state, genuine.alert) == ("Review", "callback_contradicts")


def test_a_contradicting_callback_after_settled_is_recorded_and_alerted_but_does_not_move_it():
    settled = sm.Payment("Settled", 100, "254712345678", "ws_CO_1", "NLJ7RT61SV", "0")
    for body in (failure("ws_CO_1", 1032), success("ws_CO_1", receipt="QKH94M1Z11"), success("ws_CO_9"),
                 success("ws_CO_1", amount=OMIT, receipt="QKH94M1Z11")):
        d = sm.decide(settled, callback(body))
        assert (d.verdict, d.new_state, d.alert) == (sm.Verdict.APPLIED, None, "contradiction_after_settled")
        assert "stays Settled" in str(d.changes.contradiction)


def test_a_proven_callback_after_a_query_settled_the_payment_brings_its_receipt():
    by_query = sm.Payment("Settled", 100, "254712345678", "ws_CO_1", None, "0")
    d = sm.decide(by_query, callback(success("ws_CO_1")))
    assert (d.verdict, d.new_state, d.alert, d.changes.mpesa_receipt) == (sm.Verdict.APPLIED, None, None, "NLJ7RT61SV")
    forged = sm.decide(by_query, callback(success("ws_CO_1", amount=OMIT)))
    assert (forged.new_state, forged.alert, "mpesa_receipt" in forged.changes.written()) == (
        None, "contradiction_after_settled", False)


@pytest.mark.parametrize("state", ["Cancelled", "Failed"])
def test_a_proven_success_after_cancel_or_failure_goes_to_review_keeping_its_receipt(state):
    final = sm.Payment(state, 100, "254712345678", "ws_CO_1" if state == "Cancelled" else None, None, "1032")
    d = sm.decide(final, callback(success("ws_CO_1")))
    assert (d.new_state, d.alert, d.changes.late_receipt) == ("Review", "success_after_final", "NLJ7RT61SV")
    assert "NLJ7RT61SV" in str(d.reason)  # the status event carries the reason


def test_an_unproven_success_after_cancel_is_recorded_and_the_payment_stays_cancelled():
    cancelled = sm.Payment("Cancelled", 100, "254712345678", "ws_CO_1", None, "1032")
    d = sm.decide(cancelled, callback(success("ws_CO_1", amount=OMIT)))
    assert (d.verdict, d.new_state, d.alert) == (sm.Verdict.APPLIED, None, "amount_mismatch")
    assert "stays Cancelled" in str(d.changes.contradiction)


def test_a_callback_after_the_url_expired_is_refused_without_an_alert():
    closed = sm.Payment("Settled", 100, "254712345678", "ws_CO_1", "NLJ7RT61SV", "0", callbacks_closed=True)
    for body in (success("ws_CO_1"), failure("ws_CO_1", 1032), success("ws_CO_1", receipt="QKH94M1Z11")):
        d = sm.decide(closed, callback(body))
        assert (d.verdict, d.new_state, d.alert, d.refusal, d.changes) == (
            sm.Verdict.REJECTED, None, None, "expired", sm.NO_CHANGES)


# --- Properties ------------------------------------------------------------------------------

RECEIPTS = st.text(alphabet=string.ascii_uppercase + string.digits, min_size=10, max_size=10)
ANY_TEXT = st.one_of(st.none(), st.text(max_size=14), st.integers(), st.floats(allow_nan=True), st.booleans())
PAYMENTS = st.builds(
    sm.Payment, state=st.sampled_from(["Requested", "Pending", "Settled", "Cancelled", "Failed"]),
    amount=st.integers(1, 250_000), phone=st.sampled_from(["254712345678", "254110000001"]),
    checkout_request_id=st.sampled_from([None, "ws_CO_1"]), mpesa_receipt=st.sampled_from([None, "NLJ7RT61SV"]),
    push_unknown=st.booleans(), confirm_by_query=st.booleans(),
).filter(lambda p: p.state != "Pending" or p.checkout_request_id)  # as the database's CHECK requires


def _item(name, value):
    return {"Name": name, "Value": value}


def _maybe_genuine(draw, genuine, hostile):
    """Mostly what a real payment sends, else absent or hostile: the proof is complete often enough
    that every rule is exercised, and broken in every single way."""
    how = draw(st.sampled_from(["genuine", "genuine", "genuine", "absent", "hostile"]))
    return draw(genuine) if how == "genuine" else OMIT if how == "absent" else draw(hostile)


@st.composite
def payment_and_callback(draw):
    payment = draw(PAYMENTS)
    phone, amount = payment.phone, payment.amount
    values = {
        "Amount": _maybe_genuine(draw, st.sampled_from([amount, float(amount), f"{amount}.00"]),
                                 st.one_of(ANY_TEXT, st.integers(0, 300_000), st.decimals(allow_nan=True).map(str))),
        "MpesaReceiptNumber": _maybe_genuine(draw, RECEIPTS, st.one_of(ANY_TEXT, RECEIPTS.map(str.lower),
                                                                       RECEIPTS.map(lambda r: r + "\n"))),
        "PhoneNumber": _maybe_genuine(draw, st.sampled_from([int(phone), phone[:5] + "****" + phone[-3:]]),
                                      st.one_of(ANY_TEXT, st.sampled_from(["254799999999", "2547******11",
                                                                           "************"]))),
        "Balance": draw(ANY_TEXT),
    }
    items = [_item(name, value) for name, value in values.items() if value is not OMIT]
    checkout = draw(st.sampled_from(["ws_CO_1", "ws_CO_1", "ws_CO_2"]))
    body = json.dumps({"Body": {"stkCallback": {
        "CheckoutRequestID": checkout, "ResultCode": draw(st.sampled_from([0, "0", " 0 "])), "ResultDesc": "x",
        "CallbackMetadata": {"Item": draw(st.permutations(items))}}}}).encode()
    return payment, body


@settings(max_examples=600, deadline=None, derandomize=True)
@given(payment_and_callback(), st.sampled_from([None, None, "other"]), st.sampled_from([None, None, "other"]))
def test_nothing_settles_from_a_callback_without_all_of_its_proof(case, receipt_owner, checkout_owner):
    payment, body = case
    try:
        cb = parse_callback(body)
    except CallbackParseError:
        return
    d = sm.decide(payment, sm.CallbackReceived(cb, receipt_owner, checkout_owner))
    if d.new_state == "Settled" or d.changes.written().get("mpesa_receipt") or d.query:
        assert cb.amount is not None and cb.amount.is_finite() and cb.amount == payment.amount
        assert cb.receipt is not None and re.fullmatch(r"[A-Z0-9]{10}", cb.receipt) and receipt_owner is None
        assert checkout_owner is None and check_phone(payment.phone, cb.phone) is not PhoneCheck.MISMATCH
        assert payment.state in ("Requested", "Pending") or (  # or the receipt of a payment a query settled
            payment.state == "Settled" and payment.mpesa_receipt is None and d.new_state is None
            and cb.checkout_request_id == payment.checkout_request_id)
    if d.new_state == "Settled":
        assert cb.checkout_request_id == payment.checkout_request_id  # the accepted push's, known
        assert check_phone(payment.phone, cb.phone) is PhoneCheck.MATCH and not payment.confirm_by_query
    if d.query:
        assert d.new_state is None and (payment.checkout_request_id in (None, cb.checkout_request_id))
        assert payment.push_unknown or payment.checkout_request_id is not None


@st.composite
def genuine_success(draw, amount: int, phone: str):
    """The shapes Daraja is known to send for a real payment (docs/callback-proof.md)."""
    amount_value = draw(st.sampled_from([amount, float(amount), f"{amount}.00", f"{amount}", f"{amount}.0"]))
    masked = draw(st.sampled_from([int(phone), phone, phone[:5] + "****" + phone[-3:],
                                   phone[:4] + "******" + phone[-2:], "0" + phone[3:]]))
    items = [_item("Amount", amount_value), _item("MpesaReceiptNumber", draw(RECEIPTS)),
             _item("TransactionDate", 20261127102115), _item("PhoneNumber", masked)]
    if draw(st.booleans()):
        items.append({"Name": "Balance"})
    code = draw(st.sampled_from([0, "0"]))
    stk = {"MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": "ws_CO_1", "ResultCode": code,
           "ResultDesc": "The service request is processed successfully.",
           "CallbackMetadata": {"Item": draw(st.permutations(items))}}
    return json.dumps({"Body": {"stkCallback": stk}}).encode()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 250_000), st.sampled_from(["254712345678", "254110000001", "254799000149"]), st.data())
def test_every_well_formed_genuine_success_settles(amount, phone, data):
    body = data.draw(genuine_success(amount, phone))
    d = sm.decide(sm.Payment("Pending", amount, phone, "ws_CO_1"), callback(body))
    assert d.new_state == "Settled", d.reason


BROKEN = {  # one proof element, broken in the ways fuzzing found (and the ones a forger would try)
    "Amount": st.one_of(st.just(OMIT), ANY_TEXT, st.integers(0, 300_000), st.decimals(allow_nan=True).map(str)),
    "MpesaReceiptNumber": st.one_of(st.just(OMIT), ANY_TEXT, RECEIPTS.map(str.lower), RECEIPTS.map(lambda r: r[:9]),
                                    RECEIPTS.map(lambda r: " " + r), RECEIPTS.map(lambda r: r + "\n")),
    "PhoneNumber": st.one_of(st.just(OMIT), ANY_TEXT, st.sampled_from(["254799999999", 254799999999, "2547******11",
                                                                      "************", "25471234567", "0799999999"])),
}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(1, 250_000), st.sampled_from(sorted(BROKEN)), st.data())
def test_a_genuine_success_with_any_one_proof_element_broken_does_not_settle(amount, broken, data):
    phone = "254712345678"
    value = data.draw(BROKEN[broken])
    items = {"Amount": amount, "MpesaReceiptNumber": data.draw(RECEIPTS), "PhoneNumber": int(phone),
             "TransactionDate": 20261127102115, broken: value}
    stk = {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0, "ResultDesc": "x",
           "CallbackMetadata": {"Item": [_item(k, v) for k, v in items.items() if v is not OMIT]}}
    try:
        cb = parse_callback(json.dumps({"Body": {"stkCallback": stk}}).encode())
    except CallbackParseError:
        return
    proven = (cb.amount == amount and cb.receipt is not None and re.fullmatch(r"[A-Z0-9]{10}", cb.receipt)
              and check_phone(phone, cb.phone) is PhoneCheck.MATCH)
    d = sm.decide(sm.Payment("Pending", amount, phone, "ws_CO_1"), sm.CallbackReceived(cb))
    assert (d.new_state == "Settled") == bool(proven)
    if not proven:
        assert d.new_state == "Review" or (d.query and check_phone(phone, cb.phone) is PhoneCheck.UNVERIFIABLE)


# --- What a decision writes, the rules across payments, Review -------------------------------

def test_a_change_with_no_column_to_go_to_cannot_be_made():
    with pytest.raises(TypeError):
        sm.Changes(mpesa_receipt_seen="NLJ7RT61SV")  # type: ignore[call-arg]
    from services.ledger.record import COLUMNS
    assert set(sm.CHANGES_FIELDS) <= set(COLUMNS)  # every field a decision may write has its column


def test_a_receipt_another_payment_holds_is_refused_by_decide_whichever_fact_writes_it():
    waiting = sm.Payment("Pending", 100, "254712345678", "ws_CO_1", candidate_receipt="NLJ7RT61SV",
                         candidate_checkout_request_id="ws_CO_1")
    owners = sm.Owners("this", receipts={"NLJ7RT61SV": "other"})
    d = sm.decide(waiting, sm.QueryAnswered("SUCCESS", "ws_CO_1", "0", "ok"), owners)
    assert (d.new_state, d.alert) == ("Review", "receipt_reused") and "other" in str(d.reason)
    assert d.changes.mpesa_receipt is sm.KEEP and d.changes.candidate_receipt is sm.KEEP
    assert sm.decide(waiting, sm.QueryAnswered("SUCCESS", "ws_CO_1", "0", "ok"),
                     sm.Owners("this", receipts={"NLJ7RT61SV": "this"})).new_state == "Settled"


def test_a_callback_reads_the_owners_of_its_receipt_and_checkout_id_from_decide():
    owners = sm.Owners("this", receipts={"NLJ7RT61SV": "other"})
    d = sm.decide(PENDING, callback(success("ws_CO_1")), owners)
    assert (d.new_state, d.alert) == ("Review", "receipt_reused")


def test_an_accepted_push_whose_checkout_id_another_payment_holds_goes_to_review_or_is_recorded_if_final():
    owners = sm.Owners("this", checkouts={"ws_CO_9": "other"})
    d = sm.decide(sm.Payment("Requested", 100, "254712345678"), sm.PushAccepted("m", "ws_CO_9"), owners)
    assert (d.new_state, d.alert, d.changes.checkout_request_id) == ("Review", "checkout_reused", sm.KEEP)
    settled = sm.Payment("Settled", 100, "254712345678", None, "NLJ7RT61SV", "0")
    d = sm.decide(settled, sm.PushAccepted("m", "ws_CO_9"), owners)
    assert (d.new_state, d.alert, d.changes.checkout_request_id) == (None, "checkout_reused", sm.KEEP)


def test_a_review_only_the_deadline_caused_ends_failed_on_a_definite_refusal_of_a_push_never_accepted():
    reviewed = sm.Payment("Review", 100, "254712345678", review_alert=sm.DEADLINE_ALERT)
    d = sm.decide(reviewed, sm.PushRefused("500.001.1001", "Merchant does not exist"))
    assert (d.verdict, d.new_state, d.changes.result_code) == (sm.Verdict.APPLIED, "Failed", "500.001.1001")


@pytest.mark.parametrize("reviewed", [
    sm.Payment("Review", 100, "254712345678", "ws_CO_1", review_alert="callback_mismatch"),  # a contradiction
    sm.Payment("Review", 100, "254712345678", "ws_CO_1"),  # reviewed before the alert was kept
])
def test_a_review_for_a_contradiction_stays_review_whatever_comes(reviewed):
    for fact in (sm.PushRefused("500.001.1001", "x"), sm.PushAccepted("m", "ws_CO_1"),
                 callback(failure("ws_CO_1", 1032)), callback(success("ws_CO_1")),
                 sm.QueryAnswered("FAILED", "ws_CO_1", "1032", "x"), sm.QueryAnswered("SUCCESS", "ws_CO_1", "0", "x")):
        assert sm.decide(reviewed, fact).verdict is sm.Verdict.DUPLICATE


@pytest.mark.parametrize("reviewed", [
    sm.Payment("Review", 100, "254712345678", "ws_CO_1", review_alert=sm.DEADLINE_ALERT),  # a push was accepted
    sm.Payment("Review", 100, "254712345678", candidate_receipt="NLJ7RT61SV", candidate_checkout_request_id="ws_CO_1",
               review_alert=sm.DEADLINE_ALERT),  # a success callback awaits its query
    sm.Payment("Review", 100, "254712345678", push_unknown=True, review_alert=sm.DEADLINE_ALERT),  # maybe prompted
])
def test_a_deadline_review_whose_push_may_have_prompted_is_not_failed_by_a_refusal(reviewed):
    assert sm.decide(reviewed, sm.PushRefused("500.001.1001", "x")).verdict is sm.Verdict.DUPLICATE


def test_a_deadline_review_settles_on_a_proven_success_that_came_late():
    """The ledger was behind (or the push slow): the deadline passed before the callback was applied."""
    reviewed = sm.Payment("Review", 100, "254712345678", "ws_CO_1", review_alert=sm.DEADLINE_ALERT)
    d = sm.decide(reviewed, callback(success("ws_CO_1")))
    assert (d.new_state, d.changes.mpesa_receipt) == ("Settled", "NLJ7RT61SV")
    assert d.reason is not None and d.reason.startswith("after the review deadline")


def test_a_deadline_review_keeps_an_unproven_success_in_review():
    reviewed = sm.Payment("Review", 100, "254712345678", "ws_CO_1", review_alert=sm.DEADLINE_ALERT)
    for forged in (success("ws_CO_1", amount=99), success("ws_CO_9")):
        d = sm.decide(reviewed, callback(forged))
        assert d.new_state in (None, "Review") and d.changes.mpesa_receipt is sm.KEEP


def test_a_deadline_review_cancels_on_a_definite_failure_of_its_accepted_push():
    reviewed = sm.Payment("Review", 100, "254712345678", "ws_CO_1", review_alert=sm.DEADLINE_ALERT)
    assert sm.decide(reviewed, callback(failure("ws_CO_1", 1032))).new_state == "Cancelled"
    assert sm.decide(reviewed, callback(failure("ws_CO_9", 1032))).new_state is None  # not its push


def test_a_deadline_review_learns_its_push_s_checkout_id_and_stays_in_review():
    reviewed = sm.Payment("Review", 100, "254712345678", review_alert=sm.DEADLINE_ALERT)
    d = sm.decide(reviewed, sm.PushAccepted("m", "ws_CO_1"))
    assert (d.verdict, d.new_state, d.changes.checkout_request_id) == (sm.Verdict.APPLIED, None, "ws_CO_1")


def test_a_deadline_review_settles_when_the_query_confirms_the_success_that_awaited_it():
    reviewed = sm.Payment("Review", 100, "254712345678", candidate_receipt="NLJ7RT61SV",
                          candidate_checkout_request_id="ws_CO_1", review_alert=sm.DEADLINE_ALERT)
    d = sm.decide(reviewed, sm.QueryAnswered("SUCCESS", "ws_CO_1", "0", "processed successfully"))
    assert (d.new_state, d.changes.mpesa_receipt) == ("Settled", "NLJ7RT61SV")
