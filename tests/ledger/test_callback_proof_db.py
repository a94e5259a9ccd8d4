"""What a success callback must prove, against the real PostgreSQL: waiting for the push result,
confirmation by STK query, contradictions on final payments, expired callback URLs."""
from __future__ import annotations

import uuid

import pytest

from services.common.kafka import new_event_fields
from services.common.topics import PAYMENT_STATUS, STK_PUSH_RESULT, STK_QUERY_REQUESTED, STK_QUERY_RESULT
from services.ledger.application import ALERTS, REFUSED
from services.ledger.service import Ledger
from tests.ledger.callbacks import OMIT, failure, success
from tests.ledger.test_ledger_db import accepted, callback, event, receipt, reconciler_of, requested


def push_unknown(channel, payment_id):
    return event(STK_PUSH_RESULT, "stk_push_result", {
        **new_event_fields(channel, payment_id), "outcome": "OUTCOME_UNKNOWN", "merchant_request_id": None,
        "checkout_request_id": None, "error_code": None, "error_message": "read timeout", "attempts": 1})


def query_result(channel, payment_id, checkout_id, status, code):
    return event(STK_QUERY_RESULT, "stk_query_result", {
        **new_event_fields(channel, payment_id), "checkout_request_id": checkout_id, "status": status,
        "result_code": code, "result_desc": "from Daraja", "attempt": 1})


async def payment(pool, payment_id) -> dict:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT state, mpesa_receipt, checkout_request_id, candidate_receipt, candidate_checkout_request_id,"
            " phone_check, late_receipt, contradiction, review_reason, final_at IS NOT NULL AS final"
            " FROM payments WHERE payment_id = %s", (payment_id,))
        row = await cur.fetchone()
        return dict(zip([c.name for c in cur.description], row, strict=True)) if row else {}


async def parked_count(pool, payment_id) -> int:
    async with pool.connection() as conn:
        return (await (await conn.execute("SELECT count(*) FROM parked_facts WHERE payment_id = %s",
                                          (payment_id,))).fetchone())[0]


async def audit_verdicts(pool, payment_id) -> list[tuple[str, str, str]]:
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT fact, verdict, detail FROM audit_log WHERE payment_id = %s"
                                         " ORDER BY seq", (payment_id,))).fetchall()
    return rows


async def outbox_for(pool, codec, channel, topic) -> list[dict]:
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT payload FROM outbox WHERE key = %s AND topic = %s ORDER BY id",
                                         (channel.encode(), topic.name))).fetchall()
    return [codec.decode(bytes(r[0]))[1] for r in rows]


async def confirming_channel(pool, channel):
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO channels (channel_id, display_name, shortcode_type, business_shortcode,"
                           " environment, confirm_success_by_query) VALUES (%s, 'Duka', 'paybill', '174379',"
                           " 'sandbox', true)", (channel,))


def count(metric, label) -> float:
    return metric.labels(label)._value.get()


@pytest.fixture
def ledger(pool, codec, clock):
    return Ledger(pool, codec, clock=clock)


async def test_a_success_waits_parked_until_the_push_result_names_its_checkout_id(ledger, pool, unique):
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    await ledger.handle_batch([requested(channel, pid)])
    assert await ledger.handle_batch([callback(channel, pid, success(checkout, receipt=receipt(unique)))]) == []
    assert (await payment(pool, pid))["state"] == "Requested" and await parked_count(pool, pid) == 1
    await ledger.handle_batch([accepted(channel, pid, checkout)])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["mpesa_receipt"], shown["phone_check"]) == ("Settled", receipt(unique), "match")
    assert await parked_count(pool, pid) == 0
    assert [(f, v) for f, v, _ in await audit_verdicts(pool, pid)] == [
        ("Requested", "applied"), ("CallbackReceived", "parked"), ("PushAccepted", "applied"),
        ("CallbackReceived", "applied")]


async def test_a_parked_success_for_another_push_goes_to_review_when_the_push_result_comes(ledger, pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    await ledger.handle_batch([requested(channel, pid),
                               callback(channel, pid, success(f"ws_CO_forged{unique}", receipt=receipt(unique)))])
    await ledger.handle_batch([accepted(channel, pid, f"ws_CO_{unique}")])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["mpesa_receipt"]) == ("Review", None)
    assert "is not the accepted push's" in shown["review_reason"]


async def test_a_parked_success_whose_receipt_an_earlier_batch_settled_is_caught_when_unparked(ledger, pool, unique):
    channel, first, second = f"ch-{unique}", str(uuid.uuid4()), str(uuid.uuid4())
    await ledger.handle_batch([requested(channel, first), accepted(channel, first, f"ws_CO_a{unique}"),
                               callback(channel, first, success(f"ws_CO_a{unique}", receipt=receipt(unique)))])
    await ledger.handle_batch([requested(channel, second),
                               callback(channel, second, success(f"ws_CO_b{unique}", receipt=receipt(unique)))])
    await ledger.handle_batch([accepted(channel, second, f"ws_CO_b{unique}")])  # un-parks: owners read again
    shown = await payment(pool, second)
    assert (shown["state"], shown["mpesa_receipt"]) == ("Review", None) and first in shown["review_reason"]


async def test_a_forged_success_without_amount_or_phone_goes_to_review_and_is_counted(ledger, pool, unique):
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    before = count(ALERTS, "amount_mismatch")
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, checkout),
                               callback(channel, pid,
                                        success(checkout, amount=OMIT, phone=OMIT, receipt="ABCDEFGHIJ"))])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["mpesa_receipt"]) == ("Review", None) and "no amount" in shown["review_reason"]
    assert count(ALERTS, "amount_mismatch") == before + 1
    assert ("CallbackReceived", "applied") in [(f, v) for f, v, _ in await audit_verdicts(pool, pid)]


async def test_after_an_unknown_push_outcome_a_success_is_confirmed_by_a_query_for_its_checkout_id(
        ledger, pool, codec, unique):
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    await ledger.handle_batch([requested(channel, pid), push_unknown(channel, pid),
                               callback(channel, pid, success(checkout, receipt=receipt(unique)))])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["candidate_receipt"], shown["candidate_checkout_request_id"]) == (
        "Requested", receipt(unique), checkout)
    asked = await outbox_for(pool, codec, channel, STK_QUERY_REQUESTED)
    assert [(q["checkout_request_id"], q["reason"]) for q in asked] == [(checkout, "CONFIRM_CALLBACK")]
    await ledger.handle_batch([query_result(channel, pid, checkout, "SUCCESS", "0")])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["mpesa_receipt"], shown["checkout_request_id"], shown["candidate_receipt"]) == (
        "Settled", receipt(unique), checkout, None)


async def test_a_channel_confirming_by_query_keeps_the_success_pending_and_a_contradicting_query_reviews_it(
        ledger, pool, codec, unique):
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    await confirming_channel(pool, channel)
    before = count(ALERTS, "query_contradicts")
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, checkout),
                               callback(channel, pid, success(checkout, receipt=receipt(unique)))])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["mpesa_receipt"], shown["candidate_receipt"]) == ("Pending", None, receipt(unique))
    assert [q["reason"] for q in await outbox_for(pool, codec, channel, STK_QUERY_REQUESTED)] == ["CONFIRM_CALLBACK"]
    await ledger.handle_batch([query_result(channel, pid, checkout, "PROCESSING", "4999")])
    assert (await payment(pool, pid))["state"] == "Pending"
    await ledger.handle_batch([query_result(channel, pid, checkout, "FAILED", "1032")])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["candidate_receipt"]) == ("Review", receipt(unique))  # kept as evidence
    assert count(ALERTS, "query_contradicts") == before + 1


async def test_a_channel_confirming_by_query_settles_with_the_callbacks_receipt_once_confirmed(ledger, pool, unique):
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    await confirming_channel(pool, channel)
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, checkout),
                               callback(channel, pid, success(checkout, receipt=receipt(unique)))])
    await ledger.handle_batch([query_result(channel, pid, checkout, "SUCCESS", "0")])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["mpesa_receipt"], shown["candidate_receipt"]) == ("Settled", receipt(unique), None)


async def test_a_contradiction_after_settled_is_recorded_and_alerted_and_the_payment_stays_settled(
        ledger, pool, unique):
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, checkout),
                               callback(channel, pid, success(checkout, receipt=receipt(unique)))])
    before = count(ALERTS, "contradiction_after_settled")
    await ledger.handle_batch([callback(channel, pid, failure(checkout, 1032))])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["mpesa_receipt"]) == ("Settled", receipt(unique))
    assert "1032" in shown["contradiction"] and count(ALERTS, "contradiction_after_settled") == before + 1


async def test_a_proven_success_after_cancel_keeps_its_receipt_and_says_it_in_the_status_event(
        ledger, pool, codec, unique):
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, checkout),
                               callback(channel, pid, failure(checkout, 1032))])
    await ledger.handle_batch([callback(channel, pid, success(checkout, receipt=receipt(unique)))])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["late_receipt"], shown["mpesa_receipt"]) == ("Review", receipt(unique), None)
    last = (await outbox_for(pool, codec, channel, PAYMENT_STATUS))[-1]
    assert last["status"] == "Review" and receipt(unique) in last["reason"]


async def test_a_callback_for_a_payment_final_longer_than_the_ttl_is_refused_and_changes_nothing(
        ledger, pool, clock, unique):
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, checkout),
                               callback(channel, pid, success(checkout, receipt=receipt(unique)))])
    clock.advance(25 * 3600)
    refused, alerts = count(REFUSED, "expired"), count(ALERTS, "contradiction_after_settled")
    await ledger.handle_batch([callback(channel, pid, failure(checkout, 1032))])
    shown = await payment(pool, pid)
    assert (shown["state"], shown["contradiction"]) == ("Settled", None)
    assert count(REFUSED, "expired") == refused + 1 and count(ALERTS, "contradiction_after_settled") == alerts
    fact, verdict, detail = (await audit_verdicts(pool, pid))[-1]
    assert (fact, verdict) == ("CallbackReceived", "rejected") and "expired" in detail


async def test_the_reconciler_asks_again_about_the_callbacks_checkout_id_while_the_query_says_processing(
        ledger, pool, codec, clock, unique):
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    await ledger.handle_batch([requested(channel, pid), push_unknown(channel, pid),
                               callback(channel, pid, success(checkout, phone=OMIT, receipt=receipt(unique))),
                               query_result(channel, pid, checkout, "PROCESSING", "4999")])
    clock.advance(16)  # past the first back-off (15 s), long before the review deadline
    assert await reconciler_of(ledger, pool, [pid]).tick() == 1
    asked = await outbox_for(pool, codec, channel, STK_QUERY_REQUESTED)
    assert [(q["checkout_request_id"], q["reason"], q["attempt"]) for q in asked] == [
        (checkout, "CONFIRM_CALLBACK", 1), (checkout, "CONFIRM_CALLBACK", 2)]
    shown = await payment(pool, pid)
    assert (shown["state"], shown["phone_check"], shown["checkout_request_id"]) == ("Requested", "unverifiable", None)
