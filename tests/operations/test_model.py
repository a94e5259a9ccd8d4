"""The desk's pure rules: what a search and an instruction may say, the cursor, and masking."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from services.common.payment import mask_phones_in
from services.operations.model import (
    Action,
    Cursor,
    Instruction,
    actor_of,
    audit_entry,
    decode_cursor,
    parse_query_instruction,
    parse_resolution,
    parse_search,
    payment_summary,
    refusal,
)

GOOD = {"outcome": "Settled", "mpesaReceipt": "NLJ7RT61SV", "reason": "customer showed the SMS", "operator": "wanjiku"}


@pytest.mark.parametrize("typed", ["0712345678", "712345678", "254712345678", "+254712345678", "+254 712 345 678",
                                   "00254712345678", "+254 (0)712-345-678"])
def test_every_form_the_ingress_accepts_finds_the_stored_number(typed):
    search, errors = parse_search({"phone": typed})
    assert errors == {} and search is not None and search.phone == "254712345678"


@pytest.mark.parametrize("typed", ["0812345678", "12345", "2547123456789", "0712345678\n", "x" * 100, ""])
def test_a_number_that_is_not_a_payer_number_is_refused_without_quoting_it(typed):
    search, errors = parse_search({"phone": typed})
    assert search is None and set(errors) == {"phone"}
    assert typed.strip() == "" or typed not in errors["phone"]


@pytest.mark.parametrize("query, field", [
    ({"state": "review"}, "state"), ({"state": "Review' OR 1=1 --"}, "state"), ({"limit": "0"}, "limit"),
    ({"limit": "201"}, "limit"), ({"limit": "1e3"}, "limit"), ({"limit": "-1"}, "limit"),
    ({"limit": "9" * 400}, "limit"),
    ({"from": "2026-11-30"}, "from"), ({"from": "2026-11-30T08:00:00"}, "from"), ({"to": "yesterday"}, "to"),
    ({"from": "2026-11-30T08:00:00+03:00", "to": "2026-11-30T08:00:00+03:00"}, "to"),
    ({"channel": "Shop; DROP TABLE payments"}, "channel"), ({"receipt": "NLJ7RT61S"}, "receipt"),
    ({"receipt": "' OR ''='"}, "receipt"), ({"checkoutRequestId": "ws_CO_1' OR '1'='1"}, "checkoutRequestId"),
    ({"orderReference": "o" * 129}, "orderReference"), ({"orderReference": "o-1\u0000"}, "orderReference"),
    ({"cursor": "not-a-cursor"}, "cursor"), ({"cursor": "x" * 5000}, "cursor"), ({"sort": "amount"}, "sort"),
])
def test_a_bad_search_parameter_is_refused_naming_it(query, field):
    search, errors = parse_search(query)
    assert search is None and field in errors


def test_a_repeated_parameter_is_refused_as_ambiguous():
    search, errors = parse_search({"state": "Review"}, frozenset({"state"}))
    assert search is None and "state" in errors


def test_a_receipt_is_searched_in_upper_case():
    search, _ = parse_search({"receipt": " nlj7rt61sv "})
    assert search is not None and search.receipt == "NLJ7RT61SV"


def test_a_cursor_round_trips_and_a_tampered_one_is_refused():
    cursor = Cursor(datetime(2026, 11, 30, 5, 0, 1, 123456, tzinfo=timezone(timedelta(hours=3))), "p-1")
    assert decode_cursor(cursor.encode()) == cursor
    text = cursor.encode()
    assert decode_cursor(text[:-3]) is None and decode_cursor(text + "!") is None
    forged = Cursor(cursor.requested_at, "a'; DROP TABLE payments; --").encode()
    assert decode_cursor(forged) is None  # not a payment id: never reaches SQL even as a parameter


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=300))
def test_no_text_makes_the_cursor_or_the_search_raise(text):
    decode_cursor(text)
    for name in ("channel", "state", "from", "to", "orderReference", "receipt", "checkoutRequestId", "phone",
                 "cursor", "limit", text[:50] or "x"):
        parse_search({name: text})


def test_a_settlement_needs_a_receipt_of_m_pesas_form_a_reason_and_an_operator():
    instruction, errors = parse_resolution(GOOD)
    assert errors == {} and instruction == Instruction(Action.SETTLE, "wanjiku", "customer showed the SMS",
                                                       "NLJ7RT61SV")
    changes: list[tuple[dict[str, object], str]] = [
        ({"mpesaReceipt": None}, "mpesaReceipt"), ({"mpesaReceipt": "NLJ7RT61"}, "mpesaReceipt"),
        ({"reason": ""}, "reason"), ({"reason": "  "}, "reason"), ({"reason": "x" * 501}, "reason"),
        ({"reason": "line\nforged log line"}, "reason"), ({"reason": 5}, "reason"),
        ({"operator": ""}, "operator"), ({"operator": "a" * 65}, "operator"),
        ({"operator": "eve via cli"}, "operator"), ({"operator": "eve\n"}, "operator"),
        ({"outcome": "Failed"}, "outcome"), ({"outcome": None}, "outcome"), ({"extra": 1}, "extra")]
    for change, field in changes:
        instruction, errors = parse_resolution({**GOOD, **change})
        assert instruction is None and field in errors, change
    assert parse_resolution([GOOD])[1] == {"body": "must be a JSON object"}


def test_a_cancellation_takes_no_receipt_and_a_query_takes_only_reason_and_operator():
    cancel = {"outcome": "Cancelled", "reason": "no money moved", "operator": "otieno"}
    assert parse_resolution(cancel)[0] == Instruction(Action.CANCEL, "otieno", "no money moved")
    assert "mpesaReceipt" in parse_resolution({**cancel, "mpesaReceipt": "NLJ7RT61SV"})[1]
    assert parse_query_instruction({"reason": "customer says paid", "operator": "otieno"})[0] == Instruction(
        Action.QUERY, "otieno", "customer says paid")
    assert "outcome" in parse_query_instruction({"reason": "r", "operator": "o", "outcome": "Settled"})[1]


ROW = {"state": "Review", "checkout_request_id": "ws_CO_1", "candidate_checkout_request_id": None}


def refused(instruction: Instruction, row: dict, owner: str | None = None) -> str:
    why = refusal(instruction, row, owner)
    assert why is not None
    return why


def test_what_surely_fails_at_the_ledger_is_refused_before_publishing():
    settle = Instruction(Action.SETTLE, "o", "r", "NLJ7RT61SV")
    query = Instruction(Action.QUERY, "o", "r")
    assert refusal(settle, ROW, None) is None
    assert "Settled" in refused(settle, {**ROW, "state": "Settled"})
    assert "p-2" in refused(settle, ROW, "p-2")
    assert refusal(query, {**ROW, "state": "Pending"}, None) is None
    assert refusal(query, {**ROW, "checkout_request_id": None, "candidate_checkout_request_id": "ws_CO_2"},
                   None) is None
    assert "CheckoutRequestID" in refused(query, {**ROW, "checkout_request_id": None})
    assert "Failed" in refused(query, {**ROW, "state": "Failed"})


def test_the_actor_names_the_operator_and_the_way_in():
    assert actor_of("wanjiku", "cli") == "wanjiku via cli"


@pytest.mark.parametrize("written", ["0712345678", "712345678", "254712345678", "+254712345678", "+254 712 345 678",
                                     "00254712345678", "2540712345678", "+254 (0)712-345-678", "2547 12 345 678",
                                     "0712-345-678", "254.712.345.678"])
def test_every_form_the_ingress_accepts_for_a_number_is_masked_inside_free_text(written):
    # A raw callback or a merchant's metadata may write the payer's number in any form the ingress
    # would take as one; each of those shows masked, never whole.
    masked = mask_phones_in(f'{{"PhoneNumber": "{written}", "Note": "call {written} back"}}')
    assert masked.count("*********678") == 2 and "345" not in masked


def test_phone_numbers_in_free_text_are_masked_and_timestamps_are_not():
    body = ('{"Item":[{"Name":"PhoneNumber","Value":254712345678},{"Name":"TransactionDate","Value":20261127102115},'
            '"0712345678 +254712345678 712345678"]}')
    masked = mask_phones_in(body)
    assert "12345678" not in masked and masked.count("*********678") == 4 and "20261127102115" in masked


@given(st.uuids())
def test_a_quoted_payment_id_stays_whole_while_a_number_beside_it_is_masked(payment_id):
    # One UUID in about 180 has groups that read as a number ("…-363e38876126"); the audit trail
    # quotes payment ids, and a masked one could no longer be looked up.
    text = f"receipt DC52B4BC59 already proves payment {payment_id}; payer 0712345678"
    assert mask_phones_in(text) == f"receipt DC52B4BC59 already proves payment {payment_id}; payer *********678"


def test_the_uuid_that_read_as_a_number_is_kept():
    assert mask_phones_in("3b7955b1-1639-4053-832d-363e38876126") == "3b7955b1-1639-4053-832d-363e38876126"


def test_an_audit_entry_masks_a_number_in_its_actor_as_in_its_detail():
    # The actor is the text of the command's event: a forged one may carry a payer's number there.
    row = {"seq": 1, "at": datetime(2026, 11, 30, tzinfo=timezone.utc), "fact": "OperatorResolution",
           "verdict": "applied", "from_state": "Review", "to_state": "Cancelled", "detail": "called 0712345678",
           "actor": "0712 345 678 via cli", "event_id": None}
    entry = audit_entry(row)
    assert (entry["actor"], entry["detail"]) == ("*********678 via cli", "called *********678")


def test_a_receipt_that_reads_like_a_number_is_shown_as_it_is():
    # R712345678 is of M-Pesa's form; masked, the operator could not match it to the SMS or settle with it.
    row = {"phone": "254712345678", "payment_id": "p-1", "channel_id": "shop", "state": "Review", "amount": 100,
           "order_reference": "call 0712345678", "account_reference": "INV1", "checkout_request_id": "ws_CO_1",
           "mpesa_receipt": None, "late_receipt": "R712345678", "candidate_receipt": "1712345678",
           "requested_at": datetime(2026, 11, 30, tzinfo=timezone.utc), "final_at": None, "review_reason": None}
    shown = payment_summary(row)
    assert (shown["lateMpesaReceipt"], shown["candidateReceipt"]) == ("R712345678", "1712345678")
    assert (shown["phone"], shown["orderReference"]) == ("*********678", "call *********678")
