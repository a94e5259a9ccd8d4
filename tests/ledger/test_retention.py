"""Processed-event ids are forgotten after the retention, except those of facts still parked."""
from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from services.ledger.retention import Retention
from tests.conftest import eventually


async def test_old_processed_event_ids_are_forgotten_and_recent_or_parked_ones_kept(pool, ledger_pool):
    old, parked, recent = (str(uuid.uuid4()) for _ in range(3))
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO processed_events (event_id, topic, processed_at) VALUES"
                           " (%s, 't', now() - interval '40 days'), (%s, 't', now() - interval '40 days'),"
                           " (%s, 't', now() - interval '1 day')", (old, parked, recent))
        await conn.execute("INSERT INTO parked_facts (event_id, payment_id, topic, payload, parked_at)"
                           " VALUES (%s, %s, 't', '\\x00', now() - interval '40 days')", (parked, str(uuid.uuid4())))
    try:
        retention = Retention(ledger_pool, timedelta(days=30), chunk=2)
        while await retention.forget_some() == 2:  # in chunks: whatever else is that old goes too
            pass
        async with pool.connection() as conn:
            left = {r[0] for r in await (await conn.execute(
                "SELECT event_id::text FROM processed_events WHERE event_id = ANY(%s::uuid[])",
                ([old, parked, recent],))).fetchall()}
        assert left == {parked, recent}
    finally:
        async with pool.connection() as conn:
            await conn.execute("DELETE FROM parked_facts WHERE event_id = %s", (parked,))
            await conn.execute("DELETE FROM processed_events WHERE event_id = ANY(%s::uuid[])", ([parked, recent],))


async def test_the_retention_loop_works_through_a_backlog_in_chunks_and_stops(pool, ledger_pool):
    old = [str(uuid.uuid4()) for _ in range(5)]
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO processed_events (event_id, topic, processed_at)"
                           " SELECT e, 't', now() - interval '40 days' FROM unnest(%s::uuid[]) AS e", (old,))
    stop = asyncio.Event()
    running = asyncio.create_task(Retention(ledger_pool, timedelta(days=30), chunk=2, pause_s=0.01).run(stop))

    async def all_forgotten() -> bool:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM processed_events WHERE event_id = ANY(%s::uuid[])", (old,))
            return (await cur.fetchone())[0] == 0

    await eventually(all_forgotten, timeout=10)
    stop.set()
    await asyncio.wait_for(running, timeout=5)
