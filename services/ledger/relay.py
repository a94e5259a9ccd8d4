"""The outbox relay: publishes committed outbox rows to Kafka, then deletes them.

Fast path: the ledger hands over each committed transaction's rows, which are published at once,
in commit order, with no read back from the table (the rows of transactions that committed while
the relay was busy go out together, up to a lot). Catching up: at start and after a failed
publish, the relay first publishes everything in the table, in id order, and only then takes the
fast path again, so a payment's status events never overtake each other. Backstop: a periodic scan
publishes rows older than `stale_after_s` (left by a ledger that stopped), with SKIP LOCKED so
several ledgers can scan at once. At least once: a crash between the broker's ack and the delete,
or a scan overtaking another ledger's fast path, republishes rows, which consumers deduplicate by
event_id.

How many a crash republishes is bounded: rows go out `batch` (100) at a time, and each lot is deleted
as soon as Kafka acknowledged it, before the next is produced, so a ledger killed at any moment leaves
at most one lot that went out and is still in the table. Before, a transaction's rows (up to one per
event of a 500-event batch) or a catch-up scan of 500 went out as one lot: a `kill -9` republished
hundreds of status events. The delete commits without waiting for the disk (synchronous_commit off):
a ledger killed is unaffected (the server has it), but PostgreSQL itself crashing or stopped
"immediate" loses the deletes of its last moments (up to three wal_writer_delay, 0.6 s by default),
whose rows go out again.
"""
from __future__ import annotations

import asyncio
import collections
import logging

import psycopg
from prometheus_client import Gauge
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.common.kafka import EventProducer, PublishError
from services.common.topics import ALL_TOPICS

log = logging.getLogger(__name__)
LEFT_BEHIND = Gauge("ledger_outbox_left_behind",
                    "Outbox rows the last backstop scan found unpublished (one batch at most)")
TOPICS = {t.name: t for t in ALL_TOPICS}

OutboxRow = tuple[int, str, bytes, bytes]  # id, topic, key, payload


class OutboxRelay:
    def __init__(self, pool: AsyncConnectionPool, producer: EventProducer, batch: int = 100,
                 idle_poll_s: float = 1.0, stale_after_s: float = 5.0):
        self.pool = pool
        self.producer = producer
        self.batch = batch
        self.idle_poll_s = idle_poll_s
        self.stale_after_s = stale_after_s
        self.handed: collections.deque[list[OutboxRow]] = collections.deque()
        self.wake = asyncio.Event()

    def hand_over(self, rows: list[OutboxRow]) -> None:
        """Called once the transaction that wrote these rows committed."""
        if rows:
            self.handed.append(rows)
            self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_scan, catching_up = loop.time(), True
        while not stop.is_set():
            self.wake.clear()  # before looking: rows handed over while we publish wake the next round
            try:
                if catching_up:
                    self.handed.clear()  # their rows are in the table: the scan takes them, in order
                    catching_up = await self.publish_stale(older_than_s=0) == self.batch
                    continue
                if self.handed:
                    await self.publish(self._next_rows())
                    continue
                if loop.time() >= next_scan:
                    if await self.publish_stale() < self.batch:
                        next_scan = loop.time() + self.idle_poll_s
                    continue
            except (psycopg.OperationalError, PublishError) as exc:
                log.warning("outbox relay: %s; catching up from the table", exc)  # the rows stay there
                catching_up = True
                await asyncio.sleep(1)
                continue
            await self._sleep_until_woken(stop, next_scan - loop.time())

    def _next_rows(self) -> list[OutboxRow]:
        """The oldest handed-over transaction's rows, joined by those of the transactions committed
        after it meanwhile, up to `batch` rows: one produce request, one acknowledgement and one
        delete for several small transactions, in commit order, where each waited for the one before
        it to be acknowledged and deleted."""
        rows = list(self.handed.popleft())
        while self.handed and len(rows) + len(self.handed[0]) <= self.batch:
            rows += self.handed.popleft()
        return rows

    async def _sleep_until_woken(self, stop: asyncio.Event, timeout: float) -> None:
        waiters = [asyncio.create_task(self.wake.wait()), asyncio.create_task(stop.wait())]
        await asyncio.wait(waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()

    async def publish(self, rows: list[OutboxRow]) -> None:
        """Publishes one transaction's rows in order, `batch` at a time, each lot deleted once acked:
        what a crash republishes is at most the lot in flight."""
        for start in range(0, len(rows), self.batch):
            lot = rows[start:start + self.batch]
            await self._produce(lot)
            async with self.pool.connection() as conn, conn.transaction():
                await _delete(conn, lot)

    async def publish_stale(self, older_than_s: float | None = None) -> int:
        """Publishes up to one batch of rows older than `older_than_s` (default: the backstop's age)."""
        age = self.stale_after_s if older_than_s is None else older_than_s
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT id, topic, key, payload FROM outbox"
                                     " WHERE created_at <= now() - make_interval(secs => %s)"
                                     " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED", (age, self.batch))
            rows = await cur.fetchall()
            if rows:
                log.info("outbox relay: publishing %d rows from the table", len(rows))
                await self._produce(rows)
                await _delete(conn, rows)
        LEFT_BEHIND.set(len(rows))
        return len(rows)

    async def _produce(self, rows: list[OutboxRow]) -> None:
        await self.producer.publish_many([(TOPICS[t], bytes(k), bytes(p)) for _, t, k, p in rows])


async def _delete(conn: AsyncConnection, rows: list[OutboxRow]) -> None:
    """The delete need not wait for the disk: if it is lost, the rows are published again."""
    async with conn.pipeline():
        await conn.execute("SET LOCAL synchronous_commit TO off")
        await conn.execute("DELETE FROM outbox WHERE id = ANY(%s)", ([r[0] for r in rows],))
