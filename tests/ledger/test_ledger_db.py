"""The ledger against the real PostgreSQL: exactly-once effect, early facts, audit chain, outbox."""
from __future__ import annotations

import asyncio
import os
import uuid
from typing import cast

import pytest
from psycopg_pool import AsyncConnectionPool

from services.common.kafka import ConsumedEvent, EventProducer, PublishError, new_event_fields
from services.common.pseudonyms import Pseudonyms
from services.common.topics import CALLBACK_RAW, PAYMENT_REQUESTED, PAYMENT_STATUS, STK_PUSH_RESULT
from services.ledger import application, store
from services.ledger.ports import OutboxRow
from services.ledger.postgres import PostgresUnitOfWork
from services.ledger.reconciler import Reconciler, due_payments
from services.ledger.relay import OutboxRelay
from services.ledger.service import Ledger
from tests.conftest import PSEUDONYM_KEY_FILE, database_url_of, eventually
from tests.ledger.callbacks import failure, success
from tests.platform.kafka_helpers import end_offsets, read_all


def receipt(unique: str) -> str:
    """A receipt of M-Pesa's form (ten upper-case letters and digits) with a letter in its middle. Ten
    hex digits hold a run of nine digits about once in 35 draws, which the ledger cuts in audit
    details as it cuts any run a payer's number may hide in (application._masked): a test looking for
    the receipt there then failed (CI, 370092075C)."""
    return f"{unique[:4]}M{unique[5:10]}".upper()


def event(topic, schema, value) -> ConsumedEvent:
    return ConsumedEvent(topic.name, 0, 0, value["channel_id"].encode(), schema, value)


def requested(channel, payment_id, **overrides):
    return event(PAYMENT_REQUESTED, "payment_requested", {
        **new_event_fields(channel, payment_id), "amount": 100, "phone": "254712345678",
        "account_reference": "INV1", "description": None, "order_reference": "o-1", "idempotency_key": None,
        "metadata": {"k": "v"}, "source": "TOPIC", **overrides})


def accepted(channel, payment_id, checkout_id):
    return event(STK_PUSH_RESULT, "stk_push_result", {
        **new_event_fields(channel, payment_id), "outcome": "ACCEPTED", "merchant_request_id": "m-1",
        "checkout_request_id": checkout_id, "error_code": None, "error_message": None, "attempts": 1})


def callback(channel, payment_id, body):
    return event(CALLBACK_RAW, "callback_raw", {
        **new_event_fields(channel, payment_id), "received_at": new_event_fields(channel)["occurred_at"],
        "source_address": "196.201.212.69", "path": "/x", "path_params": {}, "content_type": "application/json",
        "body": body, "rejection_reason": None})


def count_transactions(ledger: Ledger) -> list:
    """Makes the ledger note each transaction it opens for a batch; returns the list it appends to."""
    opened, apply = [], ledger._apply_in_one_transaction

    async def counted(batch):
        opened.append(len(batch))
        return await apply(batch)

    setattr(ledger, "_apply_in_one_transaction", counted)  # noqa: B010 (mypy: assigning a method)
    return opened


async def state_of(pool, payment_id):
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT state, mpesa_receipt FROM payments WHERE payment_id = %s",
                                        (payment_id,))).fetchone()
        return row


def reconciler_of(ledger: Ledger, pool, payment_ids) -> Reconciler:
    """The ledger's reconciler, seeing only these payments among those due: with the clock moved on,
    every open payment in the database is due, and those of other tests are theirs to reconcile."""
    async def ours(conn, now, limit):
        return [p for p in await due_payments(conn, now, 1_000_000) if p in payment_ids][:limit]

    return Reconciler(pool, ledger.service, ledger.service.clock, due=ours)


async def lock_waits(pool) -> int:
    """Transactions waiting for an advisory lock (the ledger's payment locks)."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        return (await cur.fetchone())[0]


async def test_request_push_callback_settles_and_redelivery_changes_nothing(ledger, pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    facts = [requested(channel, pid), accepted(channel, pid, f"ws_CO_{unique}"),
             callback(channel, pid, success(f"ws_CO_{unique}", receipt=receipt(unique)))]
    assert await ledger.handle_batch(facts) == []
    assert await state_of(pool, pid) == ("Settled", receipt(unique))

    assert await ledger.handle_batch(facts) == []  # the whole batch redelivered
    async with pool.connection() as conn:
        history = await (await conn.execute("SELECT state FROM payment_history WHERE payment_id = %s ORDER BY id",
                                            (pid,))).fetchall()
        outbox = await (await conn.execute("SELECT count(*) FROM outbox WHERE key = %s",
                                           (channel.encode(),))).fetchone()
    assert [h[0] for h in history] == ["Requested", "Pending", "Settled"]
    assert outbox[0] == 3


async def test_a_callback_before_its_payment_waits_and_then_settles(ledger, pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    early = callback(channel, pid, success(f"ws_CO_{unique}", receipt=receipt(unique)))
    assert await ledger.handle_batch([early]) == []
    assert await state_of(pool, pid) is None
    await ledger.handle_batch([requested(channel, pid)])
    assert await state_of(pool, pid) == ("Requested", None)  # a success waits for its push result too
    await ledger.handle_batch([accepted(channel, pid, f"ws_CO_{unique}")])
    assert await state_of(pool, pid) == ("Settled", receipt(unique))
    async with pool.connection() as conn:
        left = await (await conn.execute("SELECT count(*) FROM parked_facts WHERE payment_id = %s", (pid,))).fetchone()
    assert left[0] == 0


async def test_a_fact_taken_out_of_parking_waits_for_its_receipts_lock(ledger, pool, unique):
    """The callback waits parked for its push result; the batch applying the push result applies the
    callback too, and takes its receipt's lock first: a batch of another payment naming that receipt
    may be applied beside it (a ledger's batches overlap), and would otherwise read it free too."""
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    await ledger.handle_batch([requested(channel, pid)])
    await ledger.handle_batch([callback(channel, pid, success(checkout, receipt=receipt(unique)))])
    assert await state_of(pool, pid) == ("Requested", None)  # parked
    async with pool.connection() as conn, conn.transaction():
        await store.open_batch(conn, [], [str(uuid.uuid4())], [receipt(unique)])  # another batch names it
        waiting_before = await lock_waits(pool)
        other = asyncio.create_task(ledger.handle_batch([accepted(channel, pid, checkout)]))

        async def blocked():
            return await lock_waits(pool) > waiting_before

        await eventually(blocked, timeout=30)
        assert not other.done()
    assert await other == []
    assert await state_of(pool, pid) == ("Settled", receipt(unique))


async def test_early_facts_in_the_same_batch_as_their_payment_are_applied(ledger, pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    checkout = f"ws_CO_{unique}"
    await ledger.handle_batch([callback(channel, pid, success(checkout, receipt=receipt(unique))),
                               accepted(channel, pid, checkout), requested(channel, pid)])
    assert await state_of(pool, pid) == ("Settled", receipt(unique))
    async with pool.connection() as conn:
        left = await (await conn.execute("SELECT count(*) FROM parked_facts WHERE payment_id = %s", (pid,))).fetchone()
    assert left[0] == 0


async def test_a_fact_for_a_payment_being_created_by_another_transaction_waits_for_it(ledger, pool, codec, unique):
    """Two ledgers (or a rebalance) may hold the request's and the push result's partitions: the
    push result must not be parked behind the back of the transaction creating its payment."""
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    async with pool.connection() as conn, conn.transaction():
        uow = PostgresUnitOfWork(conn, ledger.settings.channel_cache_ttl_s)
        await ledger.service.apply_within(uow, [ledger.ledger_input(requested(channel, pid))])
        waiting_before = await lock_waits(pool)
        other = asyncio.create_task(ledger.handle_batch([accepted(channel, pid, f"ws_CO_{unique}")]))

        async def blocked():
            return await lock_waits(pool) > waiting_before

        await eventually(blocked, timeout=30)
        assert not other.done()  # waits for the payment's lock, whether the row exists yet or not
    assert await other == []
    assert await state_of(pool, pid) == ("Pending", None)
    async with pool.connection() as conn:
        left = await (await conn.execute("SELECT count(*) FROM parked_facts WHERE payment_id = %s", (pid,))).fetchone()
    assert left[0] == 0


async def test_unparseable_callback_is_rejected_and_leaves_the_payment_untouched(ledger, pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, f"ws_CO_{unique}")])
    bad = callback(channel, pid, b"<html>not json</html>")
    rejections = await ledger.handle_batch([bad])
    assert [(r.event.value["event_id"], type(r.error).__name__) for r in rejections] == [
        (bad.value["event_id"], "CallbackParseError")]
    assert (await state_of(pool, pid))[0] == "Pending"


async def test_a_reused_receipt_goes_to_review(ledger, pool, unique):
    channel, first, second = f"ch-{unique}", str(uuid.uuid4()), str(uuid.uuid4())
    await ledger.handle_batch([requested(channel, first), requested(channel, second),
                               accepted(channel, first, "ws_CO_a" + unique),
                               accepted(channel, second, "ws_CO_b" + unique),
                               callback(channel, first, success("ws_CO_a" + unique, receipt=receipt(unique)))])
    await ledger.handle_batch([callback(channel, second, success("ws_CO_b" + unique, receipt=receipt(unique)))])
    assert await state_of(pool, first) == ("Settled", receipt(unique))
    assert await state_of(pool, second) == ("Review", None)


async def test_a_request_that_never_gets_a_push_result_goes_to_review_at_the_deadline(ledger, pool, ledger_pool, clock,
                                                                                     unique):
    pid = str(uuid.uuid4())
    await ledger.handle_batch([requested(f"ch-{unique}", pid)])
    async with pool.connection() as conn:
        deadline = (await (await conn.execute("SELECT next_query_at - requested_at FROM payments WHERE payment_id = %s",
                                              (pid,))).fetchone())[0]
    assert deadline == ledger.settings.review_after  # counted from the request
    reconciler = reconciler_of(ledger, ledger_pool, [pid])
    clock.advance(ledger.settings.review_after.total_seconds() - 10)
    assert await reconciler.tick() == 0 and (await state_of(pool, pid))[0] == "Requested"  # not yet due
    clock.advance(11)
    assert await reconciler.tick() == 1
    assert (await state_of(pool, pid))[0] == "Review"


async def test_a_fact_whose_payment_never_comes_is_surfaced_by_the_parked_fact_gauges(ledger, pool, ledger_pool, clock,
                                                                                      unique):
    from services.ledger.reconciler import OLDEST_WAITING, WAITING
    pid = str(uuid.uuid4())
    await ledger.handle_batch([callback(f"ch-{unique}", pid, success(f"ws_CO_{unique}", receipt=receipt(unique)))])
    clock.advance(3600)  # as if it had waited an hour
    try:
        await reconciler_of(ledger, ledger_pool, [pid]).tick()
        assert WAITING._value.get() >= 1
        assert OLDEST_WAITING._value.get() >= 3600
    finally:
        async with pool.connection() as conn:  # not left to mislead the gauges of other runs
            await conn.execute("DELETE FROM parked_facts WHERE payment_id = %s", (pid,))


async def test_an_invalid_request_on_the_topic_ends_failed_never_pushed(ledger, pool, unique):
    pid = str(uuid.uuid4())
    await ledger.handle_batch([requested(f"ch-{unique}", pid, amount=-5, phone="12345")])
    assert (await state_of(pool, pid))[0] == "Failed"


async def test_the_audit_verify_command_reports_an_intact_chain(ledger, pool, infra, unique):
    import subprocess
    import sys

    from tests.conftest import ROOT
    await ledger.handle_batch([requested(f"ch-{unique}", str(uuid.uuid4()))])
    async with pool.connection() as conn:
        last = (await (await conn.execute("SELECT max(seq) FROM audit_log")).fetchone())[0]
    result = subprocess.run([sys.executable, "-m", "services.cli", "audit", "verify", "--from",
                             str(max(last - 100, 1))],
                            cwd=ROOT,
                            capture_output=True, text=True, env={
                                "DATABASE_URL": database_url_of(infra, "auditor"), "PATH": "/usr/bin",
                                "PGPASSFILE": os.environ.get("PGPASSFILE", "")},
                            timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("audit trail intact"), result.stdout + result.stderr


async def test_status_events_are_published_after_commit_through_the_outbox(ledger, ledger_pool, producer, codec,
                                                                         kafka_bootstrap, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, f"ws_CO_{unique}")])
    mark = end_offsets(kafka_bootstrap, PAYMENT_STATUS.name)
    relay = OutboxRelay(ledger_pool, producer, stale_after_s=0)  # the backstop: everything is old enough
    while await relay.publish_stale():
        pass
    messages = read_all(kafka_bootstrap, PAYMENT_STATUS.name, lambda m: m.key() == channel.encode(), expected=2,
                        since=mark)
    statuses = [codec.decode(m.value())[1] for m in messages]
    assert [(s["status"], s["previous_status"]) for s in statuses] == [("Requested", None), ("Pending", "Requested")]
    assert statuses[0]["phone_masked"] == "*********678" and statuses[1]["checkout_request_id"] is None
    assert statuses[1]["checkout_ref"] == Pseudonyms.from_file(PSEUDONYM_KEY_FILE).checkout(f"ws_CO_{unique}")


async def test_editing_an_audit_row_makes_verification_fail(ledger, pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    await ledger.handle_batch([requested(channel, pid)])
    async with pool.connection() as conn:
        seq = (await (await conn.execute("SELECT seq FROM audit_log WHERE payment_id = %s", (pid,))).fetchone())[0]
        count, problem = await store.verify_audit(conn, from_seq=max(seq - 50, 1))
        assert count > 0 and problem is None
        with pytest.raises(Exception, match="append-only"):
            await conn.execute("UPDATE audit_log SET detail = 'x' WHERE payment_id = %s", (pid,))
    async with pool.connection() as conn:
        seq, detail = await (await conn.execute("SELECT seq, detail FROM audit_log WHERE payment_id = %s",
                                                (pid,))).fetchone()
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change")
        await conn.execute("UPDATE audit_log SET detail = 'forged' WHERE seq = %s", (seq,))
        try:
            _, problem = await store.verify_audit(conn, from_seq=max(seq - 50, 1))
            assert problem == f"row {seq}: content does not match its hash (edited)"
        finally:
            await conn.execute("UPDATE audit_log SET detail = %s WHERE seq = %s", (detail, seq))
            await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_change")
        assert (await store.verify_audit(conn, from_seq=max(seq - 50, 1)))[1] is None


async def test_rows_handed_over_while_the_relay_publishes_go_out_next_not_after_the_idle_poll():
    relay = OutboxRelay(pool=cast(AsyncConnectionPool, None), producer=cast(EventProducer, None),
                        idle_poll_s=30)  # both replaced below
    published = []

    async def publish(rows):
        published.append(rows)
        if len(published) == 1:
            relay.hand_over([(2, "t", b"k", b"v")])  # a transaction committed while this round published

    scans = []

    async def publish_stale(older_than_s=None):
        scans.append(older_than_s)
        return 0

    setattr(relay, "publish", publish)  # noqa: B010 (mypy: assigning a method)
    setattr(relay, "publish_stale", publish_stale)  # noqa: B010
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))

    async def caught_up():
        return 0 in scans  # the scan of everything in the table, at start

    await eventually(caught_up, timeout=2)
    relay.hand_over([(1, "t", b"k", b"v")])

    async def both_published():
        return len(published) == 2

    await eventually(both_published, timeout=2)  # not after the 30 s idle poll
    stop.set()
    await running
    assert [rows[0][0] for rows in published] == [1, 2]  # in commit order


async def test_committed_status_events_are_handed_to_the_relay_and_published_without_a_scan(
        pool, ledger_pool, codec, producer, kafka_bootstrap, unique):
    relay = OutboxRelay(ledger_pool, producer, idle_poll_s=30, stale_after_s=30)  # the backstop stays out of it
    ledger = Ledger(ledger_pool, codec, on_commit=relay.hand_over)
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    mark = end_offsets(kafka_bootstrap, PAYMENT_STATUS.name)
    scans, scan = [], relay.publish_stale

    async def counted_scan(older_than_s=None):
        scans.append(await scan(older_than_s))
        return scans[-1]

    setattr(relay, "publish_stale", counted_scan)  # noqa: B010 (mypy: assigning a method)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))

    async def caught_up():  # what the table held at start is out; from now on only the fast path is quick
        return scans and scans[-1] < relay.batch

    await eventually(caught_up, timeout=30)
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, f"ws_CO_{unique}")])
    messages = await asyncio.to_thread(read_all, kafka_bootstrap, PAYMENT_STATUS.name,
                                       lambda m: m.key() == channel.encode(), expected=2, since=mark)

    async def outbox_emptied():
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM outbox WHERE key = %s", (channel.encode(),))
            return (await cur.fetchone())[0] == 0

    await eventually(outbox_emptied, timeout=5)
    stop.set()
    await running
    assert [codec.decode(m.value())[1]["status"] for m in messages] == ["Requested", "Pending"]


async def test_one_event_the_database_refuses_is_rejected_alone_and_the_rest_of_its_batch_applies(ledger, pool, unique):
    channel, pid, other = f"ch-{unique}", str(uuid.uuid4()), str(uuid.uuid4())
    bad = requested(channel, other)
    bad.value["event_id"] = "not-a-uuid"  # a producer's bug: the column is a uuid
    rejections = await ledger.handle_batch([requested(channel, pid), bad, accepted(channel, pid, f"ws_CO_{unique}")])
    assert [(r.event.value["payment_id"], type(r.error).__name__) for r in rejections] == [
        (other, "InvalidTextRepresentation")]
    assert await state_of(pool, pid) == ("Pending", None)
    assert await state_of(pool, other) is None


async def test_a_refused_event_is_found_by_halving_the_batch_not_by_applying_it_event_by_event(ledger, pool, unique):
    channel = f"ch-{unique}"
    events = [requested(channel, str(uuid.uuid4())) for _ in range(64)]
    events[37].value["event_id"] = "not-a-uuid"
    transactions = count_transactions(ledger)
    rejections = await ledger.handle_batch(events)
    assert [r.event for r in rejections] == [events[37]]
    assert len(transactions) <= 1 + 2 * 6  # the whole batch, then two halves per level down to one event
    async with pool.connection() as conn:
        created = await (await conn.execute("SELECT count(*) FROM payments WHERE channel_id = %s",
                                            (channel,))).fetchone()
    assert created[0] == 63


class FailingOnce:
    """A producer whose first publish is not acknowledged; records what it publishes after that."""

    def __init__(self):
        self.calls, self.published = 0, []

    async def publish_many(self, messages):
        self.calls += 1
        if self.calls == 1:
            raise PublishError("broker down")
        self.published += messages


async def test_after_a_failed_publish_the_relay_catches_up_from_the_table_in_order_before_the_fast_path(ledger_pool,
                                                                                                      unique):
    pool = ledger_pool  # the relay's and the ledger's own statements, as the ledger's role
    key = f"ch-{unique}".encode()
    rows = [(PAYMENT_STATUS.name, key, f"{unique}-{n}".encode()) for n in range(3)]
    producer = FailingOnce()
    relay = OutboxRelay(pool, cast(EventProducer, producer), idle_poll_s=30, stale_after_s=30)  # a stand-in
    async with pool.connection() as conn, conn.transaction():
        first_two = await store.enqueue(conn, rows[:2])
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))  # catching up from the table: fails once, then publishes

    async def ours():
        return [value for _, k, value in producer.published if k == key]

    async def first_two_out():
        return await ours() == [rows[0][2], rows[1][2]]

    await eventually(first_two_out, timeout=10)
    async with pool.connection() as conn, conn.transaction():
        third = await store.enqueue(conn, rows[2:])
    relay.hand_over(third)

    async def all_out():
        return await ours() == [r[2] for r in rows]

    await eventually(all_out, timeout=5)  # the fast path: the backstop would wait 30 s
    stop.set()
    await running
    async with pool.connection() as conn:
        left = await (await conn.execute("SELECT count(*) FROM outbox WHERE key = %s", (key,))).fetchone()
    assert left[0] == 0 and first_two[0][0] < first_two[1][0] < third[0][0]


async def test_a_payment_the_reconciler_cannot_reconcile_is_set_aside_and_the_others_go_on(
        ledger, pool, ledger_pool, clock, unique, monkeypatch):
    """One payment whose reconciliation raises (a bug, a row an older version wrote) used to roll back
    every payment of the tick, first in line forever, and the error stopped the ledger: every() lets
    only a database outage pass."""
    from services.ledger.reconciler import SET_ASIDE
    bad, good = str(uuid.uuid4()), str(uuid.uuid4())
    await ledger.handle_batch([requested(f"ch-{unique}", bad)])
    await ledger.handle_batch([requested(f"ch-{unique}", good)])  # requested later: the bad one is first in line
    clock.advance(ledger.settings.review_after.total_seconds() + 60)  # both past their deadline
    reconciler = reconciler_of(ledger, ledger_pool, [bad, good])
    reconcile = application.Batch.reconcile

    async def failing_for_bad(batch, record):
        if record.payment_id == bad:
            raise RuntimeError("cannot reconcile this one")
        return await reconcile(batch, record)

    monkeypatch.setattr(application.Batch, "reconcile", failing_for_bad)
    set_aside_before = SET_ASIDE._value.get()
    while (await state_of(pool, good))[0] != "Review" and await reconciler.tick():
        pass
    assert (await state_of(pool, good))[0] == "Review"
    assert (await state_of(pool, bad))[0] == "Requested"
    async with pool.connection() as conn:
        later, = await (await conn.execute("SELECT next_query_at > %s FROM payments WHERE payment_id = %s",
                                           (clock.now(), bad))).fetchone()
    assert later and SET_ASIDE._value.get() > set_aside_before


async def test_a_success_after_a_cancel_keeps_its_receipt_in_the_row_and_in_the_published_status_event(
        ledger_pool, pool, codec, producer, kafka_bootstrap, clock, unique):
    """Issue #12: the receipt proving money moved after a cancel was dropped from the row and the
    status event. Through the real ledger, outbox and relay to the status topic."""
    relay = OutboxRelay(ledger_pool, producer)
    handed: list[list[OutboxRow]] = []
    ledger = Ledger(ledger_pool, codec, clock=clock, on_commit=handed.append)
    channel, pid, checkout = f"ch-{unique}", str(uuid.uuid4()), f"ws_CO_{unique}"
    mark = end_offsets(kafka_bootstrap, PAYMENT_STATUS.name)
    await ledger.handle_batch([requested(channel, pid), accepted(channel, pid, checkout),
                               callback(channel, pid, failure(checkout, 1032))])
    await ledger.handle_batch([callback(channel, pid, success(checkout, receipt=receipt(unique)))])
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT state, late_receipt, mpesa_receipt FROM payments WHERE payment_id = %s",
                                        (pid,))).fetchone()
    assert row == ("Review", receipt(unique), None)
    for rows in handed:  # the relay's fast path: what each commit handed over
        await relay.publish(rows)
    messages = await asyncio.to_thread(read_all, kafka_bootstrap, PAYMENT_STATUS.name,
                                       lambda m: m.key() == channel.encode(), expected=4, since=mark)
    statuses = [codec.decode(m.value())[1] for m in messages]
    assert [(s["status"], s["late_mpesa_receipt"]) for s in statuses] == [
        ("Requested", None), ("Pending", None), ("Cancelled", None), ("Review", receipt(unique))]


def test_transactions_handed_over_while_the_relay_was_busy_go_out_together_in_commit_order():
    relay = OutboxRelay(pool=cast(AsyncConnectionPool, None), producer=cast(EventProducer, None), batch=5)
    transactions = [[(10 * n + i, PAYMENT_STATUS.name, b"k", b"v") for i in range(2)] for n in range(4)]
    transactions.append([(100 + i, PAYMENT_STATUS.name, b"k", b"v") for i in range(7)])  # more than a lot
    for rows in transactions:
        relay.hand_over(rows)
    lots = []
    while relay.handed:
        lots.append([row[0] for row in relay._next_rows()])
    # Two transactions of 2 rows fit a lot of 5, a third does not; the big one goes alone (publish
    # splits it into lots of 5).
    assert lots == [[0, 1, 10, 11], [20, 21, 30, 31], [100, 101, 102, 103, 104, 105, 106]]
