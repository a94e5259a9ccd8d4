"""Operator instructions against the real PostgreSQL and Kafka: a resolution of a payment in Review,
refusals that change nothing, replays applied once, who acted in the audit trail (and a chain of
rows with and without an actor verifying), and the callback bodies kept for the review desk."""
from __future__ import annotations

import asyncio
import uuid

from services.common.kafka import ConsumedEvent, ensure_topics, new_event_fields
from services.common.topics import (
    ACCESS,
    OPERATOR_COMMAND,
    PAYMENT_STATUS,
    STK_QUERY_REQUESTED,
    STK_QUERY_RESULT,
)
from services.ledger import store
from tests.conftest import eventually, free_port, service_env, start_service
from tests.ledger.callbacks import failure, success
from tests.ledger.test_ledger_db import accepted, callback, receipt, requested, state_of
from tests.platform.kafka_helpers import start_group_at_end


def command(channel, payment_id, action, mpesa_receipt=None, actor="wanjiru", reason="checked with the payer"):
    return ConsumedEvent(OPERATOR_COMMAND.name, 0, 0, channel.encode(), "operator_command", {
        **new_event_fields(channel, payment_id), "action": action, "actor": actor, "reason": reason,
        "mpesa_receipt": mpesa_receipt})


def to_review(channel, pid, unique) -> list[ConsumedEvent]:
    """A payment whose success callback names another amount: Review (amount_mismatch)."""
    checkout = f"ws_CO_{unique}"
    return [requested(channel, pid), accepted(channel, pid, checkout),
            callback(channel, pid, success(checkout, amount=99, receipt=receipt(unique)))]


async def in_review(ledger, pool, channel, pid, unique) -> None:
    await ledger.handle_batch(to_review(channel, pid, unique))
    assert await state_of(pool, pid) == ("Review", None)


async def verdict_of(pool, event_id):
    """What the review desk reads back for an instruction it published."""
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT verdict, detail, to_state, actor FROM audit_log WHERE event_id = %s",
                                         (event_id,))).fetchone()


async def outbox_of(pool, codec, channel, topic):
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT payload FROM outbox WHERE key = %s AND topic = %s ORDER BY id",
                                         (channel.encode(), topic.name))).fetchall()
    return [codec.decode(bytes(r[0]))[1] for r in rows]


async def test_settle_resolves_a_review_with_who_and_why_and_a_replay_changes_nothing(ledger, pool, codec, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    await in_review(ledger, pool, channel, pid, unique)
    settle = command(channel, pid, "SETTLE", receipt(unique), reason="paid 100 at the till\nforged line")
    assert await ledger.handle_batch([settle]) == []
    assert await state_of(pool, pid) == ("Settled", receipt(unique))
    verdict, detail, to_state, actor = await verdict_of(pool, settle.value["event_id"])
    assert (verdict, to_state, actor) == ("applied", "Settled", "wanjiru")
    assert receipt(unique) in detail and "paid 100 at the till\\u000aforged line" in detail  # one line, cleaned
    status = (await outbox_of(pool, codec, channel, PAYMENT_STATUS))[-1]
    assert (status["status"], status["previous_status"], status["resolved_by"], status["mpesa_receipt"]) == (
        "Settled", "Review", "wanjiru", receipt(unique))
    assert status["reason"] == "paid 100 at the till\\u000aforged line"

    assert await ledger.handle_batch([settle]) == []  # redelivered: applied once
    async with pool.connection() as conn:
        entries = await (await conn.execute("SELECT count(*) FROM audit_log WHERE event_id = %s",
                                            (settle.value["event_id"],))).fetchone()
        history = await (await conn.execute("SELECT count(*) FROM payment_history WHERE payment_id = %s"
                                            " AND state = 'Settled'", (pid,))).fetchone()
    assert (entries[0], history[0]) == (1, 1)


async def test_cancel_of_a_review_cancels_it(ledger, pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    await in_review(ledger, pool, channel, pid, unique)
    cancel = command(channel, pid, "CANCEL", reason="the payer was refunded by the shop")
    await ledger.handle_batch([cancel])
    assert await state_of(pool, pid) == ("Cancelled", None)
    assert await verdict_of(pool, cancel.value["event_id"]) == (
        "applied", "the payer was refunded by the shop", "Cancelled", "wanjiru")


async def test_a_refused_instruction_changes_nothing_and_says_why(ledger, pool, codec, unique):
    channel, pid, other = f"ch-{unique}", str(uuid.uuid4()), str(uuid.uuid4())
    await in_review(ledger, pool, channel, pid, unique)
    # Another payment holds a receipt: it proves that one, never this one.
    checkout = f"ws_CO_{unique}x"
    taken = receipt(uuid.uuid4().hex)
    await ledger.handle_batch([requested(channel, other), accepted(channel, other, checkout),
                               callback(channel, other, success(checkout, receipt=taken))])
    before = await outbox_of(pool, codec, channel, PAYMENT_STATUS)
    refused = [command(channel, pid, "SETTLE", taken), command(channel, pid, "SETTLE", "not-a-receipt"),
               command(channel, other, "CANCEL"), command(f"ch-{unique}-other", pid, "CANCEL")]
    assert await ledger.handle_batch(refused) == []
    assert await state_of(pool, pid) == ("Review", None)
    assert await state_of(pool, other) == ("Settled", taken)
    reasons = [await verdict_of(pool, c.value["event_id"]) for c in refused]
    assert [(v, s) for v, _, s, _ in reasons] == [("rejected", "Review"), ("rejected", "Review"),
                                                  ("rejected", "Settled"), ("rejected", "Review")]
    assert f"already proves payment {other}" in reasons[0][1]
    assert "M-Pesa's form" in reasons[1][1] and "not in Review" in reasons[2][1]
    assert "belongs to" in reasons[3][1]  # another channel's instruction, refused like any event
    assert await outbox_of(pool, codec, channel, PAYMENT_STATUS) == before


async def test_a_query_asks_daraja_through_the_outbox_and_leaves_the_state(ledger, pool, codec, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    await in_review(ledger, pool, channel, pid, unique)
    query = command(channel, pid, "QUERY", reason="payer insists they paid")
    await ledger.handle_batch([query])
    asked = await outbox_of(pool, codec, channel, STK_QUERY_REQUESTED)
    assert [(q["payment_id"], q["checkout_request_id"], q["reason"], q["attempt"]) for q in asked] == [
        (pid, f"ws_CO_{unique}", "OPERATOR", 1)]
    assert await state_of(pool, pid) == ("Review", None)
    assert (await verdict_of(pool, query.value["event_id"]))[:1] == ("applied",)

    # The answer is kept in the trail with what it said, for the operator to read.
    answer = ConsumedEvent(STK_QUERY_RESULT.name, 0, 0, channel.encode(), "stk_query_result", {
        **new_event_fields(channel, pid), "checkout_request_id": f"ws_CO_{unique}", "status": "SUCCESS",
        "result_code": "0", "result_desc": "The service request is processed successfully.", "attempt": 1})
    await ledger.handle_batch([answer])
    verdict, detail, _, actor = await verdict_of(pool, answer.value["event_id"])
    assert (verdict, actor) == ("duplicate", None)
    assert "answered SUCCESS (result code 0: The service request is processed successfully.)" in detail


async def test_a_chain_of_entries_with_and_without_an_actor_verifies_and_an_edited_actor_breaks_it(
        ledger, pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    await in_review(ledger, pool, channel, pid, unique)  # entries without an actor
    cancel = command(channel, pid, "CANCEL")
    await ledger.handle_batch([cancel])
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT seq, actor FROM audit_log WHERE payment_id = %s ORDER BY seq",
                                         (pid,))).fetchall()
        assert [a for _, a in rows] == [None, None, None, "wanjiru"]
        first, last = rows[0][0], rows[-1][0]
        assert (await store.verify_audit(conn, from_seq=first))[1] is None
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change")
        try:
            await conn.execute("UPDATE audit_log SET actor = 'someone-else' WHERE seq = %s", (last,))
            assert (await store.verify_audit(conn, from_seq=first))[1] == (
                f"row {last}: content does not match its hash (edited)")
            await conn.execute("UPDATE audit_log SET actor = 'wanjiru' WHERE seq = %s", (first,))
            assert (await store.verify_audit(conn, from_seq=first))[1] == (
                f"row {first}: content does not match its hash (edited)")  # an actor added to an old row
        finally:
            await conn.execute("UPDATE audit_log SET actor = NULL WHERE seq = %s", (first,))
            await conn.execute("UPDATE audit_log SET actor = 'wanjiru' WHERE seq = %s", (last,))
            await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_change")
        assert (await store.verify_audit(conn, from_seq=first))[1] is None


async def test_every_decided_callback_keeps_its_body_and_verdict_but_not_while_parked(ledger, pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    checkout = f"ws_CO_{unique}"
    body = success(checkout, receipt=receipt(unique))
    early = callback(channel, pid, body)
    await ledger.handle_batch([early])  # parked: its payment is not known yet

    async def kept():
        async with pool.connection() as conn:
            return await (await conn.execute("SELECT event_id::text, verdict, body FROM callback_bodies"
                                             " WHERE payment_id = %s ORDER BY received_at, event_id",
                                             (pid,))).fetchall()

    assert await kept() == []
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, checkout)])
    assert await kept() == [(early.value["event_id"], "applied", body.decode())]

    again = callback(channel, pid, body)  # the same callback posted twice: a duplicate, kept too
    with_bom = callback(channel, pid, b"\xef\xbb\xbf" + body)  # as received, byte order mark and all
    await ledger.handle_batch([again, with_bom])
    rows = {event_id: (verdict, text) for event_id, verdict, text in await kept()}
    assert rows[again.value["event_id"]] == ("duplicate", body.decode())
    assert rows[with_bom.value["event_id"]] == ("duplicate", "\ufeff" + body.decode())

    # Redelivered after its processed-event id was forgotten: decided again, and its row stays.
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM processed_events WHERE event_id = %s", (again.value["event_id"],))
    assert await ledger.handle_batch([again]) == []
    assert len(await kept()) == 3


async def test_a_running_ledger_applies_an_operator_command_from_its_topic(infra, producer, pool, unique):
    channel, pid, group = f"ch-{unique}", str(uuid.uuid4()), f"ledger-operator-{unique}"
    bootstrap = infra["KAFKA_BOOTSTRAP_SERVERS"]
    topics = ACCESS["ledger"].reads
    ensure_topics(bootstrap, topics, None)
    start_group_at_end(bootstrap, group, [t.name for t in topics])
    service = start_service("services.ledger", service_env(infra, LEDGER_GROUP_ID=group,
                                                          LEDGER_METRICS_PORT=free_port()))
    try:
        for e in to_review(channel, pid, unique):
            await producer.publish(next(t for t in topics if t.name == e.topic), e.value)

        async def state_is(wanted):
            return await state_of(pool, pid) == wanted

        await eventually(lambda: state_is(("Review", None)), timeout=90)
        settle = command(channel, pid, "SETTLE", receipt(unique))
        await producer.publish(OPERATOR_COMMAND, settle.value)
        await eventually(lambda: state_is(("Settled", receipt(unique))), timeout=60)
        assert (await verdict_of(pool, settle.value["event_id"]))[::3] == ("applied", "wanjiru")
    finally:
        service.terminate()
        service.wait(30)


async def test_one_receipt_settles_one_payment_even_when_two_instructions_name_it_in_one_batch(ledger, pool, unique):
    channel, first, second = f"ch-{unique}", str(uuid.uuid4()), str(uuid.uuid4())
    await in_review(ledger, pool, channel, first, unique)
    other = uuid.uuid4().hex[:10]
    await in_review(ledger, pool, channel, second, other)
    shared = receipt(uuid.uuid4().hex)
    twice = [command(channel, first, "SETTLE", shared), command(channel, second, "SETTLE", shared)]
    assert await ledger.handle_batch(twice) == []
    assert (await state_of(pool, first), await state_of(pool, second)) == (("Settled", shared), ("Review", None))
    verdict, detail, _, _ = await verdict_of(pool, twice[1].value["event_id"])
    assert verdict == "rejected" and f"already proves payment {first}" in detail


async def test_an_actor_of_any_length_and_characters_is_kept_cleaned_and_bounded(ledger, pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    await in_review(ledger, pool, channel, pid, unique)
    cancel = command(channel, pid, "CANCEL", actor="\u202eevil\x1b[31m" + "x" * 5000, reason="r\x00" * 2000)
    assert await ledger.handle_batch([cancel]) == []
    verdict, detail, _, actor = await verdict_of(pool, cancel.value["event_id"])
    assert verdict == "applied" and len(actor) <= 200 and len(detail) <= 501
    assert actor.isprintable() and detail.isprintable()


async def test_a_receipt_another_ledger_batch_settles_meanwhile_gets_a_verdict_not_a_dead_letter(ledger, pool, unique):
    # Two payments of two channels are settled with one receipt by two batches at once (two ledger
    # consumers, a partition each). Neither saw the other's receipt when it read the owners; the
    # unique index refuses the later commit. That instruction is decided again, now seeing who
    # holds the receipt, and rejected with why: the desk finds a verdict, not a dead letter.
    channel, first, second = f"ch-{unique}", str(uuid.uuid4()), str(uuid.uuid4())
    await in_review(ledger, pool, channel, first, unique)
    await in_review(ledger, pool, f"{channel}-b", second, uuid.uuid4().hex[:10])
    shared = receipt(uuid.uuid4().hex)
    async with pool.connection() as other_batch:
        await other_batch.execute("BEGIN")
        await other_batch.execute("UPDATE payments SET mpesa_receipt = %s, state = 'Settled' WHERE payment_id = %s",
                                  (shared, first))
        settle = command(f"{channel}-b", second, "SETTLE", shared)
        applying = asyncio.ensure_future(ledger.handle_batch([settle]))

        async def waits_for_the_other_batch():
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")).fetchone()
                return row[0] > 0  # the ledger's write waits for the other batch's row

        await eventually(waits_for_the_other_batch)
        await other_batch.execute("COMMIT")
    assert await applying == []
    assert (await state_of(pool, first), await state_of(pool, second)) == (("Settled", shared), ("Review", None))
    verdict, detail, _, _ = await verdict_of(pool, settle.value["event_id"])
    assert verdict == "rejected" and f"already proves payment {first}" in detail


async def test_a_receipt_postgresql_cannot_hold_is_rejected_with_why_not_dead_lettered(ledger, pool, unique):
    # A command produced straight to the topic (not through the desk, which checks the form) may
    # carry a NUL byte, which no text parameter can: the receipt's owners are not looked up for it.
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    await in_review(ledger, pool, channel, pid, unique)
    settle = command(channel, pid, "SETTLE", "ABC\x00DEFGHI")
    assert await ledger.handle_batch([settle]) == []
    assert await state_of(pool, pid) == ("Review", None)
    verdict, detail, _, _ = await verdict_of(pool, settle.value["event_id"])
    assert verdict == "rejected" and "M-Pesa's form" in detail and "\x00" not in detail


async def test_a_receipt_another_batch_is_proving_meanwhile_settles_nothing_else(ledger, pool, unique):
    # Payment A's late success callback (receipt R, money moved after it was Cancelled) is being
    # applied by one ledger's batch while another settles payment B of another channel with R. R
    # goes in A's late_receipt, which no unique index guards: the settlement waits for that batch,
    # then sees R proves A, and is rejected, rather than both payments holding R.
    channel, first, second = f"ch-{unique}", str(uuid.uuid4()), str(uuid.uuid4())
    checkout, shared = f"ws_CO_{unique}", receipt(uuid.uuid4().hex)
    await ledger.handle_batch([requested(channel, first), accepted(channel, first, checkout),
                               callback(channel, first, failure(checkout, 1032))])
    await in_review(ledger, pool, f"{channel}-b", second, uuid.uuid4().hex[:10])
    late_success = ledger.ledger_input(callback(channel, first, success(checkout, receipt=shared)))
    settle = command(f"{channel}-b", second, "SETTLE", shared)
    async with ledger.service.unit_of_work() as other_batch:
        await ledger.service.apply_within(other_batch, [late_success])
        applying = asyncio.ensure_future(ledger.handle_batch([settle]))

        async def waits_or_done():
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")).fetchone()
                return row[0] > 0 or applying.done()

        await eventually(waits_or_done)
    assert await applying == []
    assert await state_of(pool, first) == ("Review", None) and await state_of(pool, second) == ("Review", None)
    verdict, detail, _, _ = await verdict_of(pool, settle.value["event_id"])
    assert verdict == "rejected" and f"already proves payment {first}" in detail
