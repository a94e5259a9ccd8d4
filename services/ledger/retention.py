"""Forgetting processed-event ids once their events can no longer be redelivered.

processed_events gets a row per consumed event, so it grows with every payment. A row is only
needed while Kafka may still deliver its event again, that is within the topics' retention; the
setting must stay above it. Should an older event come back anyway (a consumer group reset to the
beginning of a topic kept longer), the state machine still answers a repeated fact with
"duplicate", so forgetting costs a second check, never a second effect.

Ids of facts still parked are kept: redelivered, such a fact would collide with its own parked row
and be dead-lettered.
"""
from __future__ import annotations

import asyncio
from datetime import timedelta

from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from services.common.db import every

FORGOTTEN = Counter("ledger_processed_events_forgotten_total", "Processed-event ids dropped after the retention")

_FORGET = """
DELETE FROM processed_events WHERE ctid = ANY(ARRAY(
    SELECT e.ctid FROM processed_events e
    WHERE e.processed_at < now() - %s
      AND NOT EXISTS (SELECT 1 FROM parked_facts p WHERE p.event_id = e.event_id)
    LIMIT %s))
"""


class Retention:
    def __init__(self, pool: AsyncConnectionPool, keep: timedelta, *, interval_s: float = 60.0, chunk: int = 5000,
                 pause_s: float = 0.5):
        self.pool, self.keep = pool, keep
        self.interval_s, self.chunk, self.pause_s = interval_s, chunk, pause_s

    async def run(self, stop: asyncio.Event) -> None:
        async def forget_all_due() -> None:
            # A backlog (a first run, a long stop) goes in chunks, each its own short transaction,
            # with a pause between them so that applying payments keeps the database first.
            while await self.forget_some() == self.chunk and not stop.is_set():
                await asyncio.sleep(self.pause_s)
        await every(self.interval_s, stop, forget_all_due, "processed-event retention")

    async def forget_some(self) -> int:
        async with self.pool.connection() as conn, conn.transaction():
            forgotten = (await conn.execute(_FORGET, (self.keep, self.chunk))).rowcount
        FORGOTTEN.inc(forgotten)
        return forgotten
