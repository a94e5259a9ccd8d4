"""The outbox relay after a crash: a restarted relay publishes again at most the lot that was in flight
(acknowledged by Kafka, not yet deleted) when the old one died, not hundreds of rows already out."""
from __future__ import annotations

import asyncio
import collections
import signal
import uuid
from typing import cast

from services.common.kafka import EventProducer
from services.common.topics import PAYMENT_STATUS
from services.ledger.relay import OutboxRelay, OutboxRow
from services.ledger.service import Ledger
from tests.conftest import eventually
from tests.ledger.test_ledger_crashes import _at_least, ledger, publish_payments
from tests.ledger.test_ledger_db import requested
from tests.platform.kafka_helpers import end_offsets, read_all

IN_FLIGHT_MAX = 100  # what the relay's docstring promises a crash republishes at most


class DiesAfterItsFirstAck:
    """A producer whose process 'dies' right after Kafka acknowledged its first lot: nothing after runs."""

    def __init__(self, producer: EventProducer):
        self.producer, self.acked = producer, asyncio.Event()

    async def publish_many(self, messages):
        await self.producer.publish_many(messages)
        self.acked.set()
        await asyncio.Event().wait()  # never returns: the delete that would follow never happens


async def test_a_relay_that_dies_after_an_ack_republishes_at_most_one_lot(ledger_pool, pool, codec, producer,
                                                                          kafka_bootstrap, unique):
    channel = f"relay-{unique}"
    handed: list[OutboxRow] = []
    ledger_ = Ledger(ledger_pool, codec, on_commit=handed.extend)
    await ledger_.handle_batch([requested(channel, str(uuid.uuid4())) for _ in range(300)])  # one transaction
    assert len(handed) == 300
    mark = end_offsets(kafka_bootstrap, PAYMENT_STATUS.name)

    dying = DiesAfterItsFirstAck(producer)
    first = asyncio.create_task(OutboxRelay(ledger_pool, cast(EventProducer, dying)).publish(handed))  # fast path
    await asyncio.wait_for(dying.acked.wait(), 30)
    first.cancel()  # the process is gone: its acknowledged rows are still in the table

    restarted = OutboxRelay(ledger_pool, producer)
    while await _ours_in_outbox(pool, channel):  # what a restarted relay does first: the table, in order
        await restarted.publish_stale(older_than_s=0)

    messages = await asyncio.to_thread(read_all, kafka_bootstrap, PAYMENT_STATUS.name,
                                       lambda m: m.key() == channel.encode(), expected=300 + IN_FLIGHT_MAX,
                                       since=mark, timeout_polls=10)
    times = collections.Counter(codec.decode(m.value())[1]["event_id"] for m in messages)
    assert len(times) == 300  # every status event went out
    republished = sum(n - 1 for n in times.values())
    assert 0 < republished <= IN_FLIGHT_MAX, republished


async def test_a_ledger_killed_mid_stream_republishes_at_most_one_lot_of_status_events(
        infra, producer, pool, codec, kafka_bootstrap, unique):
    """The same with a real ledger process and a real SIGKILL while its relay is busy."""
    channel, group = f"crash-{unique}", f"ledger-relay-{unique}"
    mark = end_offsets(kafka_bootstrap, PAYMENT_STATUS.name)
    first = ledger(infra, group)
    try:
        ids = await publish_payments(producer, channel, unique)
        await eventually(lambda: _at_least(pool, channel, 300), timeout=60, interval=0.01)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    second = ledger(infra, group, new_group=False)
    try:
        await eventually(lambda: _at_least(pool, channel, len(ids)), timeout=120)
        await eventually(lambda: _outbox_empty_of(pool, channel), timeout=60)
    finally:
        second.terminate()
        second.wait(30)
    transitions = await _transitions(pool, channel)  # one status event each
    messages = await asyncio.to_thread(read_all, kafka_bootstrap, PAYMENT_STATUS.name,
                                       lambda m: m.key() == channel.encode(), expected=transitions + IN_FLIGHT_MAX + 1,
                                       since=mark, timeout_polls=60)
    times = collections.Counter(codec.decode(m.value())[1]["event_id"] for m in messages)
    republished = sum(n - 1 for n in times.values())
    print(f"status events: {len(times)} distinct of {transitions}, {republished} republished after the kill")
    assert len(times) == transitions
    assert republished <= IN_FLIGHT_MAX, republished


async def _ours_in_outbox(pool, channel: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM outbox WHERE key = %s", (channel.encode(),))
        return (await cur.fetchone())[0]


async def _transitions(pool, channel: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM payment_history h JOIN payments p USING (payment_id)"
                                 " WHERE p.channel_id = %s", (channel,))
        return (await cur.fetchone())[0]


async def _outbox_empty_of(pool, channel: str) -> bool:
    return await _ours_in_outbox(pool, channel) == 0
