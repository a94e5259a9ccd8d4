"""One bad event never stops the ledger: whatever it raises, it is isolated and dead-lettered and the
events around it apply, in order; an event naming another channel than its payment's changes nothing."""
from __future__ import annotations

import uuid

import psycopg
import pytest

from services.common.kafka import Transient, new_event_fields
from services.common.topics import STK_QUERY_RESULT
from services.ledger import state_machine as sm, store
from tests.ledger.callbacks import failure, success
from tests.ledger.test_ledger_db import accepted, callback, count_transactions, event, receipt, requested, state_of

DEEP = b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_x", "ResultCode": 0, "x": ' + \
    b"[" * 30_000 + b"]" * 30_000 + b"}}}"


def query_result(channel, payment_id, checkout_id, status="SUCCESS", code="0"):
    return event(STK_QUERY_RESULT, "stk_query_result", {
        **new_event_fields(channel, payment_id), "checkout_request_id": checkout_id, "status": status,
        "result_code": code, "result_desc": "The service request is processed successfully.", "attempt": 1})


async def audit_of(pool, payment_id):
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT fact, verdict, detail FROM audit_log WHERE payment_id = %s ORDER BY seq",
                                 (payment_id,))
        return await cur.fetchall()


async def test_poison_events_among_good_ones_are_dead_lettered_alone_and_the_others_apply(ledger, pool, unique):
    one, other = f"ch-{unique}", f"ch2-{unique}"
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    shapeless = accepted(one, a, f"ws_CO_a{unique}")
    del shapeless.value["checkout_request_id"]  # a producer's bug: input_of raises KeyError, not NotAFact
    nested = callback(one, a, DEEP)  # json.loads raised RecursionError
    nan = callback(one, a, success(f"ws_CO_a{unique}").replace(b"100.0", b"NaN"))
    batch = [requested(one, a), shapeless, nested, nan, accepted(one, a, f"ws_CO_a{unique}"),
             callback(one, a, success(f"ws_CO_a{unique}", receipt=receipt(unique))),
             requested(other, b), accepted(other, b, f"ws_CO_b{unique}"),
             callback(other, b, success(f"ws_CO_b{unique}", receipt=receipt(unique)[::-1]))]

    rejections = await ledger.handle_batch(batch)

    assert [(r.event, type(r.error).__name__) for r in rejections] == [
        (shapeless, "KeyError"), (nested, "CallbackParseError"), (nan, "CallbackParseError")]
    assert "nested deeper" in str(rejections[1].error) and "NaN" in str(rejections[2].error)
    assert await state_of(pool, a) == ("Settled", receipt(unique))
    assert await state_of(pool, b) == ("Settled", receipt(unique)[::-1])


async def test_an_exception_raised_while_deciding_one_event_isolates_it_in_a_few_transactions(
        ledger, pool, unique, monkeypatch):
    channel, checkout = f"ch-{unique}", f"ws_CO_{unique}"
    poison_body = success(checkout, receipt="POISON0000")
    decide = sm.decide

    def decide_failing_on_the_poison(payment, fact, owners=None):
        if isinstance(fact, sm.CallbackReceived) and fact.callback.receipt == "POISON0000":
            raise ArithmeticError("a bug the event's content triggers")
        return decide(payment, fact, owners)

    monkeypatch.setattr(sm, "decide", decide_failing_on_the_poison)
    target = str(uuid.uuid4())
    others = [requested(channel, str(uuid.uuid4())) for _ in range(28)]
    poison = callback(channel, target, poison_body)
    # The target's facts straddle the poison: they must apply in their order, the poison not at all.
    events = others[:14] + [requested(channel, target), accepted(channel, target, checkout), poison,
                            callback(channel, target, failure(checkout, 1032))] + others[14:]
    transactions = count_transactions(ledger)

    rejections = await ledger.handle_batch(events)

    assert [(r.event, type(r.error).__name__) for r in rejections] == [(poison, "ArithmeticError")]
    assert len(transactions) <= 1 + 2 * 5  # 32 events: the batch, then two halves per level down to one
    assert await state_of(pool, target) == ("Cancelled", None)
    async with pool.connection() as conn:
        created = await (await conn.execute("SELECT count(*) FROM payments WHERE channel_id = %s",
                                            (channel,))).fetchone()
    assert created[0] == 29
    assert [verdict for _, verdict, _ in await audit_of(pool, target)] == ["applied", "applied", "applied"]


async def test_a_database_error_no_event_caused_is_retried_not_dead_lettered(ledger, pool, unique, monkeypatch):
    """A missing GRANT (or a schema not migrated) fails every event alike: dead-lettering them all would
    empty the topics into the dead-letter topic; the consumer retries instead and readiness says so."""
    async def refused(conn, rows):
        raise psycopg.errors.InsufficientPrivilege("permission denied for table audit_log")

    monkeypatch.setattr(store, "append_audit", refused)
    pid = str(uuid.uuid4())
    with pytest.raises(Transient, match="InsufficientPrivilege"):
        await ledger.handle_batch([requested(f"ch-{unique}", pid), requested(f"ch-{unique}", str(uuid.uuid4()))])
    monkeypatch.undo()
    assert await state_of(pool, pid) is None
    assert await ledger.handle_batch([requested(f"ch-{unique}", pid)]) == []  # retried once it is fixed
    assert (await state_of(pool, pid))[0] == "Requested"


async def test_facts_naming_another_channel_than_their_payments_change_nothing_and_are_audited(ledger, pool, unique):
    mine, theirs, pid, checkout = f"ch-{unique}", f"other-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    await ledger.handle_batch([requested(mine, pid)])
    assert await ledger.handle_batch([accepted(theirs, pid, "ws_CO_forged")]) == []
    assert await state_of(pool, pid) == ("Requested", None)
    await ledger.handle_batch([accepted(mine, pid, checkout)])
    forged = [callback(theirs, pid, success(checkout, receipt=receipt(unique))),
              query_result(theirs, pid, checkout), requested(theirs, pid)]
    assert await ledger.handle_batch(forged) == []
    assert await state_of(pool, pid) == ("Pending", None)
    rejected = [(fact, detail) for fact, verdict, detail in await audit_of(pool, pid) if verdict == "rejected"]
    assert [fact for fact, _ in rejected] == ["PushAccepted", "CallbackReceived", "QueryAnswered", "Requested"]
    assert all(detail == f"event for channel {theirs}, but the payment belongs to {mine}" for _, detail in rejected)
    await ledger.handle_batch([callback(mine, pid, success(checkout, receipt=receipt(unique)))])
    assert await state_of(pool, pid) == ("Settled", receipt(unique))  # its own channel's callback still settles


async def test_an_early_fact_from_another_channel_is_rejected_when_its_payment_arrives(ledger, pool, unique):
    mine, theirs, pid, checkout = f"ch-{unique}", f"other-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    assert await ledger.handle_batch([callback(theirs, pid, success(checkout, receipt=receipt(unique)))]) == []
    await ledger.handle_batch([requested(mine, pid)])
    assert await state_of(pool, pid) == ("Requested", None)
    assert [(fact, verdict) for fact, verdict, _ in await audit_of(pool, pid)] == [
        ("CallbackReceived", "parked"), ("Requested", "applied"), ("CallbackReceived", "rejected")]


async def test_a_parked_fact_that_cannot_be_read_any_more_stays_parked_and_its_payment_is_created(
        ledger, pool, unique):
    pid, parked = str(uuid.uuid4()), str(uuid.uuid4())
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO parked_facts (event_id, payment_id, topic, payload) VALUES (%s, %s, %s, %s)",
                           (parked, pid, "mpesa.callback.raw.v1", b"written by a version that is gone"))
    try:
        assert await ledger.handle_batch([requested(f"ch-{unique}", pid)]) == []
        assert (await state_of(pool, pid))[0] == "Requested"
        async with pool.connection() as conn:
            left = await (await conn.execute("SELECT count(*) FROM parked_facts WHERE event_id = %s",
                                             (parked,))).fetchone()
        assert left[0] == 1  # still there, counted by the parked-fact gauges
    finally:
        async with pool.connection() as conn:
            await conn.execute("DELETE FROM parked_facts WHERE event_id = %s", (parked,))
