"""Notifier processes side by side, each fed batches by the test: a payment's later delivery never goes
while another process holds its earlier one (it waits in PostgreSQL for the poller), a long attempt
keeps its lease, and a batch holding one event twice makes one delivery."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from services.channels.webhook_repository import requeue_one
from services.common.ids import new_id
from services.common.topics import PAYMENT_STATUS
from services.notifier.deliveries import NewDelivery, deliveries_of, status_change_of
from services.notifier.store import Finished, NotifierStore
from tests.conftest import eventually
from tests.notifier.conftest import (
    Behaviour,
    channel_with_endpoint,
    consumed,
    delivery_rows,
    notifier_config,
    notifier_process,
    status_event,
)
from tests.notifier.fakes import met


async def test_a_later_delivery_waits_while_another_process_holds_the_earlier_one(infra, pool, receiver, key_file):
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "twoproc")
    gate = asyncio.Event()
    receiver.behaviours[channel] = Behaviour(gate=gate)
    payment_id, at = new_id(), datetime.now(timezone.utc)
    pending = status_event(channel, payment_id, "Pending", at)
    settled = status_event(channel, payment_id, "Settled", at + timedelta(seconds=1))
    cfg = notifier_config(infra, key_file, NOTIFIER_READ_TIMEOUT_S=60)
    async with notifier_process(cfg, "a") as a, notifier_process(cfg, "b") as b:
        assert await a.enqueuer.handle_batch([consumed(pending, 1)]) == []
        await eventually(lambda: met(len(receiver.at(channel)) == 1), timeout=60)  # in flight from process a
        # Process b consumes the Settled (a rebalance gave it the partition): it must not send it.
        assert await b.enqueuer.handle_batch([consumed(settled, 2)]) == []

        async def released() -> bool:
            rows = await delivery_rows(pool, [settled["event_id"]])
            return bool(rows) and rows[0]["leased_by"] is None
        await eventually(released, timeout=60)
        await asyncio.sleep(0.5)  # several polls: none may claim it while its Pending is in flight
        assert [a.webhook_id for a in receiver.at(channel)] == [pending["event_id"]]
        gate.set()
        await eventually(lambda: met(len(receiver.at(channel)) == 2), timeout=60)
    assert [a.state for a in receiver.at(channel)] == ["Pending", "Settled"]
    rows = await delivery_rows(pool, [pending["event_id"], settled["event_id"]])
    assert [r["state"] for r in rows] == ["delivered", "delivered"]


async def test_an_event_twice_in_one_batch_is_one_delivery(infra, pool, receiver, key_file):
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "twice")
    event = status_event(channel, new_id(), "Pending")
    async with notifier_process(notifier_config(infra, key_file), "a") as a:
        assert await a.enqueuer.handle_batch([consumed(event, 1), consumed(event, 2)]) == []
        await eventually(lambda: met(len(receiver.at(channel)) == 1), timeout=60)
        await asyncio.sleep(0.3)
    assert len(receiver.at(channel)) == 1 and len(await delivery_rows(pool, [event["event_id"]])) == 1


async def test_a_batch_handled_again_after_its_commit_answer_was_lost_sends_at_once(infra, pool, receiver,
                                                                                   key_file):
    """Its rows are in PostgreSQL, leased to this process, but not in its memory: handling the batch
    again takes them back instead of leaving them until the lease (five minutes here) runs out."""
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "lostcommit")
    event = status_event(channel, new_id(), "Pending")
    async with notifier_process(notifier_config(infra, key_file, NOTIFIER_LEASE_S=300), "a") as a:
        change = status_change_of(PAYMENT_STATUS.schema, event)
        assert change is not None
        [endpoint] = (await a.enqueuer.endpoints.of([channel]))[channel]
        await a.store.enqueue(deliveries_of(change, [endpoint]), 300)  # committed; its answer "lost"
        assert await a.enqueuer.handle_batch([consumed(event, 1)]) == []  # the batch again
        await eventually(lambda: met(len(receiver.at(channel)) == 1), timeout=30)
    assert [r["state"] for r in await delivery_rows(pool, [event["event_id"]])] == ["delivered"]


async def test_a_long_attempt_keeps_its_lease_and_no_other_process_sends_it_meanwhile(infra, pool, receiver,
                                                                                     key_file):
    """Leases of one second, an attempt held for several: the heartbeat renews it, so the other
    process's poller, claiming every 0.1 s, never takes the delivery over."""
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "longattempt")
    gate = asyncio.Event()
    receiver.behaviours[channel] = Behaviour(gate=gate)
    event = status_event(channel, new_id(), "Pending")
    cfg = notifier_config(infra, key_file, NOTIFIER_LEASE_S=1, NOTIFIER_READ_TIMEOUT_S=60)
    async with notifier_process(cfg, "a") as a, notifier_process(cfg, "b"):
        await a.enqueuer.handle_batch([consumed(event, 1)])
        await eventually(lambda: met(len(receiver.at(channel)) == 1), timeout=60)
        for _ in range(8):  # four leases long
            await asyncio.sleep(0.5)
            [row] = await delivery_rows(pool, [event["event_id"]])
            assert row["leased_by"] == a.instance_id
        assert len(receiver.at(channel)) == 1
        gate.set()

        async def delivered() -> bool:
            return (await delivery_rows(pool, [event["event_id"]]))[0]["state"] == "delivered"
        await eventually(delivered, timeout=60)
    assert len(receiver.at(channel)) == 1


async def test_a_later_delivery_waits_for_an_earlier_one_committed_while_its_batch_was_inserting(
        infra, pool, receiver, key_file):
    """A rebalance: process a is still inserting the Pending's delivery (its transaction open) when
    process b, given the partition, handles the batch again with the Settled after it. b's insert of
    the Pending waits for a's commit and then skips it; the Settled's earlier deliveries must be read
    after that wait, or b sends the Settled while a is sending the Pending."""
    channel, endpoint_id = await channel_with_endpoint(pool, key_file, receiver, "snapshot")
    payment_id, at = new_id(), datetime.now(timezone.utc)
    pending = status_event(channel, payment_id, "Pending", at)
    settled = status_event(channel, payment_id, "Settled", at + timedelta(seconds=1))
    change = status_change_of(PAYMENT_STATUS.schema, pending)
    assert change is not None
    async with notifier_process(notifier_config(infra, key_file, NOTIFIER_LEASE_S=60), "b") as b:
        [endpoint] = (await b.enqueuer.endpoints.of([channel]))[channel]
        [row] = deliveries_of(change, [endpoint])
        async with pool.connection() as conn:
            async with conn.transaction():  # process a's enqueue, not committed yet
                await conn.execute(
                    "INSERT INTO webhook_deliveries (webhook_id, event_id, endpoint_id, channel_id, payment_id,"
                    " event_type, occurred_at, body, leased_by, leased_until)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'a-ghost', now() + interval '60 seconds')",
                    (row.webhook_id, row.event_id, row.endpoint_id, row.channel_id, row.payment_id,
                     row.event_type, row.occurred_at, row.body))
                handled = asyncio.ensure_future(b.enqueuer.handle_batch([consumed(pending, 1),
                                                                         consumed(settled, 2)]))
                await asyncio.sleep(1.0)  # b's statement is waiting on the Pending's row
                assert not handled.done()
            assert await handled == []
        await asyncio.sleep(0.5)  # several polls: the Settled waits while a holds the Pending
        assert receiver.at(channel) == []
        rows = await delivery_rows(pool, [pending["event_id"], settled["event_id"]])
        assert [(r["state"], r["leased_by"]) for r in rows] == [("pending", "a-ghost"), ("pending", None)]


async def test_a_delivery_waiting_behind_one_to_retry_is_not_due_before_it(infra, pool, receiver, key_file):
    """A payment's Settled, released behind its Pending that must wait ten minutes for a retry, is due
    no sooner than the Pending: otherwise every such Settled of a receiver down for days is due, blocked
    and walked through by every poll, which all endpoints' retries wait for."""
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "behind")
    receiver.behaviours[channel] = Behaviour(status=503)
    payment_id, at = new_id(), datetime.now(timezone.utc)
    pending = status_event(channel, payment_id, "Pending", at)
    settled = status_event(channel, payment_id, "Settled", at + timedelta(seconds=1))
    cfg = notifier_config(infra, key_file, NOTIFIER_FIRST_BACKOFF_S=600, NOTIFIER_MAX_BACKOFF_S=600)
    async with notifier_process(cfg, "a") as a:
        assert await a.enqueuer.handle_batch([consumed(pending, 1), consumed(settled, 2)]) == []

        async def both_back_in_postgresql() -> list:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT next_attempt_at, now() FROM webhook_deliveries WHERE event_id = ANY(%s)"
                    " AND state = 'pending' AND leased_by IS NULL AND (attempts > 0 OR event_id = %s)"
                    " ORDER BY occurred_at", ([pending["event_id"], settled["event_id"]], settled["event_id"]))
                rows = await cur.fetchall()
            return rows if len(rows) == 2 else []
        [(pending_due, now), (settled_due, _)] = await eventually(both_back_in_postgresql, timeout=60)
    assert pending_due > now + timedelta(minutes=4)  # the retry: half the nominal wait at least
    assert settled_due >= pending_due
    assert [a.state for a in receiver.at(channel)] == ["Pending"]


async def test_an_event_consumed_just_after_its_endpoint_was_deleted_makes_no_delivery(infra, pool, receiver,
                                                                                      key_file):
    """The notifier's cache of a channel's endpoints is a few seconds old: an endpoint deleted within
    them must get no delivery (it would be sent, or stay pending for ever, since deleting cancelled
    the pending ones already)."""
    channel, endpoint_id = await channel_with_endpoint(pool, key_file, receiver, "deleted")
    cfg = notifier_config(infra, key_file, NOTIFIER_ENDPOINT_CACHE_TTL_S=300)
    async with notifier_process(cfg, "a") as a:
        assert [e.endpoint_id for e in (await a.enqueuer.endpoints.of([channel]))[channel]] == [endpoint_id]
        async with pool.connection() as conn:  # as the management deletes it
            await conn.execute("UPDATE webhook_endpoints SET status = 'deleted', disabled_reason = NULL"
                               " WHERE endpoint_id = %s", (endpoint_id,))
        event = status_event(channel, new_id(), "Pending")
        assert await a.enqueuer.handle_batch([consumed(event, 1)]) == []
        await asyncio.sleep(0.5)
    assert await delivery_rows(pool, [event["event_id"]]) == []
    assert receiver.at(channel) == []


async def test_the_deliveries_behind_one_retried_again_follow_its_next_attempt(infra, pool, receiver, key_file):
    """Not only at the first retry: each time the earliest one is written back to retry later, those
    behind it are due no sooner than it."""
    channel, endpoint_id = await channel_with_endpoint(pool, key_file, receiver, "followers")
    store = NotifierStore(pool, "followers-test")
    payment_id, at = new_id(), datetime.now(timezone.utc)
    rows = [NewDelivery(e, e, endpoint_id, channel, payment_id, t, at + timedelta(seconds=i), "{}")
            for i, (e, t) in enumerate([(new_id(), "payment.pending"), (new_id(), "payment.settled")])]
    [head, follower] = [e.delivery for e in await store.enqueue(rows, 60)]
    await store.write([], [follower.id], [], 3600)  # behind the head, back in PostgreSQL
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    await store.write([Finished(head.id, "pending", 2, later, datetime.now(timezone.utc), 503, "HTTP 503", None)],
                      [], [], 3600)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id, next_attempt_at FROM webhook_deliveries WHERE id = ANY(%s)",
                                 ([head.id, follower.id],))
        due = dict(await cur.fetchall())
        await conn.execute("UPDATE webhook_deliveries SET state = 'cancelled', finished_at = now() WHERE id = ANY(%s)",
                           ([head.id, follower.id],))
    assert due[head.id] == later and due[follower.id] >= later


async def test_redelivering_the_earliest_delivery_brings_the_ones_behind_it_forward_too(infra, pool, receiver,
                                                                                       key_file):
    """Those behind a delivery to retry are due no sooner than its retry; an operator's redelivery of
    that one delivery makes it due now, and those behind it must not keep waiting for the old time."""
    channel, endpoint_id = await channel_with_endpoint(pool, key_file, receiver, "requeue")
    store = NotifierStore(pool, "requeue-test")
    payment_id, at = new_id(), datetime.now(timezone.utc)
    rows = [NewDelivery(e, e, endpoint_id, channel, payment_id, t, at + timedelta(seconds=i), "{}")
            for i, (e, t) in enumerate([(new_id(), "payment.pending"), (new_id(), "payment.settled")])]
    [head, follower] = [e.delivery for e in await store.enqueue(rows, 60)]
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    await store.write([Finished(head.id, "pending", 1, later, datetime.now(timezone.utc), 503, "HTTP 503", None)],
                      [follower.id], [], 3600)
    async with pool.connection() as conn:
        assert await requeue_one(conn, head.id) == 1
        cur = await conn.execute("SELECT id, next_attempt_at <= now() FROM webhook_deliveries WHERE id = ANY(%s)",
                                 ([head.id, follower.id],))
        due = dict(await cur.fetchall())
        await conn.execute("UPDATE webhook_deliveries SET state = 'cancelled', finished_at = now() WHERE id = ANY(%s)",
                           ([head.id, follower.id],))
    assert due == {head.id: True, follower.id: True}
