"""The outbox relay: publishes committed outbox rows to Kafka, then deletes them.

At least once: a crash between the broker's ack and the delete republishes rows, which consumers
deduplicate by event_id. Rows are locked with SKIP LOCKED so several ledgers can relay at once.
"""
from __future__ import annotations

import asyncio
import logging

import psycopg
from prometheus_client import Gauge

from services.common.kafka import EventProducer, PublishError
from services.common.topics import ALL_TOPICS

log = logging.getLogger(__name__)
BACKLOG = Gauge("ledger_outbox_backlog", "Outbox rows not yet published")
TOPICS = {t.name: t for t in ALL_TOPICS}


class OutboxRelay:
    def __init__(self, pool, producer: EventProducer, batch: int = 500, idle_poll_s: float = 1.0):
        self.pool = pool
        self.producer = producer
        self.batch = batch
        self.idle_poll_s = idle_poll_s
        self.wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.wake.clear()  # before reading: a commit made while we publish wakes the next round
            try:
                published = await self.publish_once()
            except (psycopg.OperationalError, PublishError) as exc:
                log.warning("outbox relay: %s; retrying", exc)
                published = 0
                await asyncio.sleep(1)
            if published < self.batch:
                await self._sleep_until_woken(stop)

    async def _sleep_until_woken(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.create_task(self.wake.wait()), asyncio.create_task(stop.wait())]
        await asyncio.wait(waiters, timeout=self.idle_poll_s, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()

    async def publish_once(self) -> int:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT id, topic, key, payload FROM outbox ORDER BY id LIMIT %s"
                                     " FOR UPDATE SKIP LOCKED", (self.batch,))
            rows = await cur.fetchall()
            if rows:
                # produce() runs in order inside gather, so per-key order is kept.
                await asyncio.gather(*(self.producer.publish_raw(TOPICS[t], bytes(k), bytes(p)) for _, t, k, p in rows))
                await conn.execute("DELETE FROM outbox WHERE id = ANY(%s)", ([r[0] for r in rows],))
            # Counting is a scan of the table: only worth it when this round did not take everything.
            backlog = 0
            if len(rows) == self.batch:
                backlog = (await (await conn.execute("SELECT count(*) FROM outbox")).fetchone())[0]
        BACKLOG.set(backlog)
        return len(rows)
