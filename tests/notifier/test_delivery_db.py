"""The notifier in this process on the real broker and database, delivering to a real HTTP receiver
that verifies each signature with the standardwebhooks library: what a receiver sees."""
from __future__ import annotations

import asyncio

from services.common.ids import new_id
from services.common.topics import DEAD_LETTER, PAYMENT_REQUESTED, PAYMENT_STATUS
from tests.conftest import eventually
from tests.notifier.conftest import (
    Behaviour,
    channel_with_endpoint,
    delivery_rows,
    notifier_config,
    publish_payments,
    running_notifier,
    status_event,
)
from tests.notifier.fakes import met
from tests.platform.kafka_helpers import end_offsets, read_all, sample_request


def in_order(arrivals, states=("Pending", "Settled")) -> bool:
    """Each payment's events arrived in the order they happened: every arrival of a state before
    any arrival of the next (an attempt that timed out may have arrived twice)."""
    by_payment: dict[str, list[str]] = {}
    for a in arrivals:
        by_payment.setdefault(a.payment_id, []).append(a.state)
    return all(seen == sorted(seen, key=states.index) for seen in by_payment.values())


async def test_each_status_change_arrives_once_per_endpoint_signed_and_in_order(
        infra, pool, receiver, key_file, producer, codec):
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "all")
    # A second endpoint of the same channel, for settled payments only.
    settled_only, _ = await channel_with_endpoint(pool, key_file, receiver, "settled", event_types=["payment.settled"])
    cfg = notifier_config(infra, key_file)
    async with running_notifier(cfg, producer, codec):
        published = await publish_payments(producer, channel, 5, ("Requested", "Pending", "Settled"))
        others = await publish_payments(producer, settled_only, 5, ("Requested", "Pending", "Settled"))
        await eventually(lambda: met(len(receiver.at(channel)) >= 10 and len(receiver.at(settled_only)) >= 5),
                         timeout=60)
        await asyncio.sleep(0.5)  # nothing more may come
    arrivals = receiver.at(channel)
    assert all(a.verified for a in receiver.arrivals)
    expected = {e for ids in published.values() for e in ids[1:]}  # Requested announces nothing
    assert sorted(a.webhook_id for a in arrivals) == sorted(expected)  # each once
    assert in_order(arrivals)
    assert {(a.body["type"], a.state) for a in arrivals} == {("payment.pending", "Pending"),
                                                            ("payment.settled", "Settled")}
    assert sorted(a.webhook_id for a in receiver.at(settled_only)) == sorted(ids[2] for ids in others.values())
    rows = await delivery_rows(pool, sorted(expected))
    assert {(r["state"], r["attempts"], r["last_http_status"], r["leased_by"]) for r in rows} == {
        ("delivered", 1, 200, None)}
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM webhook_attempts WHERE delivery_id = ANY(%s)"
                                 " AND outcome = 'delivered' AND http_status = 200", ([r["id"] for r in rows],))
        assert (await cur.fetchone())[0] == 10


async def test_a_redelivered_status_event_enqueues_and_sends_nothing_new(infra, pool, receiver, key_file, producer,
                                                                         codec):
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "redelivered")
    event = status_event(channel, new_id(), "Pending")
    cfg = notifier_config(infra, key_file)
    async with running_notifier(cfg, producer, codec):
        await producer.publish(PAYMENT_STATUS, event)
        await eventually(lambda: met(len(receiver.at(channel)) == 1), timeout=60)
        await producer.publish(PAYMENT_STATUS, event)  # as the outbox relay does after a crash
        marker = status_event(channel, new_id(), "Pending")
        await producer.publish(PAYMENT_STATUS, marker)  # behind the copy in the channel's partition
        await eventually(lambda: met(len(receiver.at(channel)) == 2), timeout=60)
        await asyncio.sleep(0.5)
    assert [a.webhook_id for a in receiver.at(channel)] == [event["event_id"], marker["event_id"]]
    assert len(await delivery_rows(pool, [event["event_id"]])) == 1


async def test_a_status_event_of_a_channel_without_endpoints_is_consumed_and_nothing_is_sent(
        infra, pool, receiver, key_file, producer, codec):
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "marker")
    silent = status_event(f"silent-{new_id()[:8]}", new_id(), "Settled")
    marker = status_event(channel, new_id(), "Settled")
    cfg = notifier_config(infra, key_file)
    async with running_notifier(cfg, producer, codec):
        await producer.publish(PAYMENT_STATUS, silent)
        await producer.publish(PAYMENT_STATUS, marker)
        await eventually(lambda: met(len(receiver.at(channel)) == 1), timeout=60)
    assert await delivery_rows(pool, [silent["event_id"]]) == []
    assert [a.webhook_id for a in receiver.arrivals] == [marker["event_id"]]


async def failing_since_set(pool, endpoint_ids: list[str], expected: list[bool]) -> bool:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT endpoint_id, failing_since IS NOT NULL FROM webhook_endpoints"
                                 " WHERE endpoint_id = ANY(%s)", (endpoint_ids,))
        found = dict(await cur.fetchall())
    return [found.get(e) for e in endpoint_ids] == expected


async def test_receivers_that_fail_time_out_or_are_down_for_a_while_get_every_event_once_back(
        infra, pool, receiver, key_file, producer, codec):
    """Three channels: one endpoint answers 500, one answers after the notifier's read timeout, one
    has nobody listening. Once each has failed attempts on record they recover, and each then has every
    event, in order, signed; retries carried the same webhook-id."""
    failing, failing_ep = await channel_with_endpoint(pool, key_file, receiver, "failing")
    slow, slow_ep = await channel_with_endpoint(pool, key_file, receiver, "timeout")
    receiver.behaviours[failing] = Behaviour(status=500)
    receiver.behaviours[slow] = Behaviour(sleep_s=2.0)  # the read timeout is 1 s
    down = type(receiver)()  # not started yet: connections are refused
    down_channel, down_ep = await channel_with_endpoint(pool, key_file, down, "down")
    cfg = notifier_config(infra, key_file)
    async with running_notifier(cfg, producer, codec):
        published = {}
        for channel in (failing, slow, down_channel):
            published[channel] = await publish_payments(producer, channel, 3)

        async def each_failed_twice() -> bool:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT d.endpoint_id FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id"
                    " WHERE d.endpoint_id = ANY(%s) AND a.outcome = 'retry'"
                    " GROUP BY d.endpoint_id HAVING count(*) >= 2",
                    ([failing_ep, slow_ep, down_ep],))
                return len(await cur.fetchall()) == 3
        await eventually(each_failed_twice, timeout=60)
        assert not any(a.state == "Settled" for a in receiver.arrivals)  # no Settled overtook its Pending
        endpoints = [failing_ep, slow_ep, down_ep]
        await eventually(lambda: failing_since_set(pool, endpoints, expected=[True] * 3), timeout=60)
        receiver.behaviours[failing] = Behaviour(status=204)
        receiver.behaviours[slow] = Behaviour()
        await down.start()
        try:
            def has_all(r, channel) -> bool:
                return {a.webhook_id for a in r.at(channel)} >= {e for ids in published[channel].values() for e in ids}
            await eventually(lambda: met(has_all(receiver, failing) and has_all(receiver, slow)
                                           and has_all(down, down_channel)), timeout=90)
        finally:
            await down.stop()
    # A 2xx ended each endpoint's run of failures.
    await eventually(lambda: failing_since_set(pool, endpoints, expected=[False] * 3), timeout=60)
    for r, channel in ((receiver, failing), (receiver, slow), (down, down_channel)):
        expected = {e for ids in published[channel].values() for e in ids}
        arrivals = r.at(channel)
        assert {a.webhook_id for a in arrivals} == expected and all(a.verified for a in arrivals)
        assert in_order(arrivals), [(a.payment_id, a.state) for a in arrivals]
        assert {r["state"] for r in await delivery_rows(pool, sorted(expected))} == {"delivered"}


async def test_a_slow_endpoint_does_not_delay_another_channels_deliveries(infra, pool, receiver, key_file, producer,
                                                                         codec):
    """The slow endpoint holds every request until the test lets go, which it does only once the other
    channel's deliveries have all arrived: they cannot have waited for the slow ones."""
    slow, _ = await channel_with_endpoint(pool, key_file, receiver, "slow")
    fast, _ = await channel_with_endpoint(pool, key_file, receiver, "fast")
    gate = asyncio.Event()
    receiver.behaviours[slow] = Behaviour(gate=gate)
    cfg = notifier_config(infra, key_file, NOTIFIER_READ_TIMEOUT_S=60, NOTIFIER_ENDPOINT_CONCURRENCY=4)
    async with running_notifier(cfg, producer, codec):
        slow_events = await publish_payments(producer, slow, 20, ("Pending",))
        await eventually(lambda: met(len(receiver.at(slow)) == 4), timeout=60)  # its four slots are taken
        fast_events = await publish_payments(producer, fast, 10, ("Pending",))
        await eventually(lambda: met(len(receiver.at(fast)) == 10), timeout=60)
        assert not gate.is_set() and len(receiver.at(slow)) == 4
        gate.set()
        await eventually(lambda: met(len({a.webhook_id for a in receiver.at(slow)}) == 20), timeout=60)
    assert {a.webhook_id for a in receiver.at(fast)} == {ids[0] for ids in fast_events.values()}
    assert {a.webhook_id for a in receiver.at(slow)} == {ids[0] for ids in slow_events.values()}


async def test_an_endpoint_that_answers_nothing_holds_a_bounded_number_of_deliveries_in_memory(
        infra, pool, receiver, key_file, producer, codec):
    """The rest wait in PostgreSQL, unleased, and all go once it answers again."""
    channel, endpoint_id = await channel_with_endpoint(pool, key_file, receiver, "stuck")
    gate = asyncio.Event()
    receiver.behaviours[channel] = Behaviour(gate=gate)
    cfg = notifier_config(infra, key_file, NOTIFIER_ENDPOINT_QUEUE_MAX=3, NOTIFIER_POLL_BATCH=2,
                          NOTIFIER_ENDPOINT_CONCURRENCY=1, NOTIFIER_READ_TIMEOUT_S=60)
    async with running_notifier(cfg, producer, codec) as notifier:
        published = await publish_payments(producer, channel, 20, ("Pending",))
        expected = {ids[0] for ids in published.values()}

        async def all_enqueued() -> bool:
            return len(await delivery_rows(pool, sorted(expected))) == 20
        await eventually(all_enqueued, timeout=60)

        async def leased() -> int:
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = %s"
                                         " AND leased_by IS NOT NULL", (endpoint_id,))
                return (await cur.fetchone())[0]
        # Enqueued rows are inserted leased; the ones beyond the queue are released through the writer's
        # next batch, which on a busy machine comes a moment after the insert.
        async def few_leased() -> bool:
            return await leased() <= 3 + 2
        await eventually(few_leased, timeout=30)
        for _ in range(5):  # over several polls
            assert len(notifier.dispatcher.held_ids()) <= 3 + 2
            assert await leased() <= 3 + 2
            await asyncio.sleep(0.2)
        assert len(receiver.at(channel)) == 1
        gate.set()
        await eventually(lambda: met({a.webhook_id for a in receiver.at(channel)} == expected), timeout=60)


async def test_events_no_delivery_can_hold_are_dead_lettered_and_the_next_ones_delivered(
        infra, pool, receiver, key_file, producer, codec):
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "hostile")
    cfg = notifier_config(infra, key_file)
    bootstrap = infra["KAFKA_BOOTSTRAP_SERVERS"]
    since = end_offsets(bootstrap, DEAD_LETTER.name)
    wrong_record = codec.encode(PAYMENT_REQUESTED, sample_request(channel, new_id()))
    too_long_id = status_event(channel, new_id(), "Pending", event_id="e" * 101)
    good = status_event(channel, new_id(), "Pending")
    async with running_notifier(cfg, producer, codec):
        await producer.publish_many([(PAYMENT_STATUS, channel.encode(), wrong_record),
                                     (PAYMENT_STATUS, channel.encode(), codec.encode(PAYMENT_STATUS, too_long_id)),
                                     (PAYMENT_STATUS, channel.encode(), b"not avro at all")])
        await producer.publish(PAYMENT_STATUS, good)
        await eventually(lambda: met(len(receiver.at(channel)) == 1), timeout=60)
    assert [a.webhook_id for a in receiver.at(channel)] == [good["event_id"]]
    letters = read_all(bootstrap, DEAD_LETTER.name, lambda m: m.key() == channel.encode(), 3, since=since)
    reasons = sorted(codec.decode(m.value())[1]["error_type"] for m in letters)
    assert reasons == ["DecodeError", "NotAStatusEvent", "NotAStatusEvent"]
