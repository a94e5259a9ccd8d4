"""The idempotency records in PostgreSQL (migrations/0004_ingress.sql): claim, mark published, read.

Claims and "published" marks are batched (services/ingress/batching.py): each request costs at most
one shared round trip per write, however many requests run at once; only the claim is waited for.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from psycopg import AsyncConnection, Error as DatabaseError
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.ingress.batching import Batcher

log = logging.getLogger(__name__)

MARK_LINGER_S = 0.05
# A claim waits 3 ms for others before its statement goes: at a few hundred requests/s each statement
# otherwise carries one or two claims, and every statement is a round trip (two wake-ups of this
# process and one of a PostgreSQL backend) that costs more CPU than the rows themselves
# (docs/cpu-per-payment.md). 3 ms is small beside the Kafka acknowledgement the answer waits for too.
CLAIM_LINGER_S = 0.003


@dataclass(frozen=True)
class Claim:
    """What a request asks to record for its key; `payment_id` and `event_id` are freshly minted."""
    channel_id: str
    idempotency_key: str
    body_sha256: bytes
    payment_id: str
    event_id: str
    occurred_at: datetime
    api_key_id: str
    amount: int
    account_reference: str
    order_reference: str | None


@dataclass(frozen=True)
class Record:
    """The row that holds a key, after a claim: ours (`claimed` is True) or an earlier one."""
    payment_id: str
    body_sha256: bytes
    event_id: str
    occurred_at: datetime
    published: bool
    claimed: bool


# The batch travels as one JSON array: one parameter for the driver to adapt instead of ten arrays,
# which costs the ingress about a third less CPU per claim (measured with psycopg 3.3).
_CLAIM = """
INSERT INTO ingress_requests (channel_id, idempotency_key, body_sha256, payment_id, event_id, occurred_at,
                              api_key_id, amount, account_reference, order_reference)
SELECT c, k, decode(h, 'hex'), p, e, t, a, m, r, o
FROM jsonb_to_recordset(%s::jsonb) AS claim(c text, k text, h text, p text, e uuid, t timestamptz, a text, m bigint,
                                            r text, o text)
ON CONFLICT (channel_id, idempotency_key) DO NOTHING
RETURNING payment_id
"""
_EXISTING = """
SELECT r.channel_id, r.idempotency_key, r.payment_id, r.body_sha256, r.event_id::text AS event_id, r.occurred_at,
       r.published_at IS NOT NULL AS published
FROM ingress_requests r
JOIN unnest(%s::text[], %s::text[]) AS k(channel_id, idempotency_key) USING (channel_id, idempotency_key)
"""
_MARK_PUBLISHED = """
UPDATE ingress_requests SET published_at = now() WHERE payment_id = ANY(%s::text[]) AND published_at IS NULL
"""
_REQUEST = """
SELECT payment_id, channel_id, amount, account_reference, order_reference, occurred_at,
       published_at IS NOT NULL AS published
FROM ingress_requests WHERE payment_id = %s
"""


class IdempotencyStore:
    """Claims are durable before anything is published: a lost claim could let one key make two
    payments. "Published" marks are written after Kafka's acknowledgement without holding up the
    answer, and may go through `marks_pool`, whose sessions can run with synchronous_commit off: a
    mark lost in a crash only makes a replay publish the same event again, which consumers drop.
    Until its mark is written, this process remembers the payment as published itself.
    """

    def __init__(self, pool: AsyncConnectionPool, marks_pool: AsyncConnectionPool | None = None, *,
                 batch_max: int = 500):
        self._pool = pool
        self._marks_pool = marks_pool or pool
        # One batch in flight at a time: under load the next batch grows while this one runs, so the
        # round trips per second stay few (each costs the ingress CPU, whatever its size). Marks
        # hold no answer up, so they also wait MARK_LINGER_S to gather more: at 300 requests/s, 50 ms
        # rather than 5 took the ingress from 925-967 to 839-906 µs of CPU per request. A mark later
        # by that much only widens the window in which another process's replay of the key publishes
        # the same event again (consumers drop it by its id); this process knows it meanwhile.
        self._claims: Batcher[Claim, Record] = Batcher("idempotency-claims", self._claim_batch, batch_max=batch_max,
                                                       linger_s=CLAIM_LINGER_S)
        self._marks: Batcher[str, None] = Batcher("idempotency-marks", self._mark_batch, batch_max=batch_max,
                                                  linger_s=MARK_LINGER_S)
        self._claims_connection = HeldConnection(pool)
        self._marks_connection = HeldConnection(self._marks_pool)
        self._published_unmarked: set[str] = set()

    async def claim(self, claim: Claim) -> Record:
        """Records the claim unless the key is already held; returns the row that holds the key."""
        return await self._claims.submit(claim)

    def mark_published(self, payment_id: str) -> None:
        """Records, soon, that Kafka acknowledged the payment's event (no future per request: this
        runs for every accepted payment)."""
        self._published_unmarked.add(payment_id)
        self._marks.enqueue_and_forget(payment_id)

    async def request(self, payment_id: str) -> dict | None:
        """The recorded request of a payment Kafka acknowledged (for reads before the ledger has it)."""
        unmarked = payment_id in self._published_unmarked  # before the read: see _theirs
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_REQUEST, (payment_id,))
            row = await cur.fetchone()
        if row is None or not (row["published"] or unmarked):
            return None
        return row

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        await self._claims.close()
        await self._marks.close(drain_timeout_s)
        await self._claims_connection.give_back()
        await self._marks_connection.give_back()

    async def _claim_batch(self, claims: Sequence[Claim]) -> list[Record]:
        batch = json.dumps([{"c": c.channel_id, "k": c.idempotency_key, "h": c.body_sha256.hex(), "p": c.payment_id,
                             "e": c.event_id, "t": c.occurred_at.isoformat(), "a": c.api_key_id, "m": c.amount,
                             "r": c.account_reference, "o": c.order_reference} for c in claims])
        async with self._claims_connection as conn:
            cur = await conn.execute(_CLAIM, (batch,))
            # A claim won when its own payment id came back: comparing keys would let two claims of
            # one key in the same batch both believe they won.
            won = {row[0] for row in await cur.fetchall()}
            lost = [c for c in claims if c.payment_id not in won]
            existing, unmarked = {}, set()
            if lost:
                unmarked = set(self._published_unmarked)  # before the read: see _theirs
                rows = conn.cursor(row_factory=dict_row)
                await rows.execute(_EXISTING, ([c.channel_id for c in lost], [c.idempotency_key for c in lost]))
                existing = {(r["channel_id"], r["idempotency_key"]): r for r in await rows.fetchall()}
        return [_ours(c) if c.payment_id in won else _theirs(existing[(c.channel_id, c.idempotency_key)], unmarked)
                for c in claims]

    async def _mark_batch(self, payment_ids: Sequence[str]) -> list[None]:
        try:
            async with self._marks_connection as conn:
                await conn.execute(_MARK_PUBLISHED, (list(payment_ids),))
        except (DatabaseError, PoolTimeout) as exc:
            # Harmless but worth knowing: a replay of one of these keys publishes its event again.
            log.warning("could not record the publish of %d payments: %s", len(payment_ids), exc)
        finally:
            self._published_unmarked.difference_update(payment_ids)
        return [None] * len(payment_ids)


class HeldConnection:
    """A pool connection kept by one batch worker from batch to batch: checking a connection out of
    psycopg's pool and back costs about as much CPU as the query itself (~110 µs here). After a
    failure it goes back to the pool, which checks it or replaces it, and the next batch takes another.
    """

    def __init__(self, pool: AsyncConnectionPool):
        self._pool = pool
        self._connection: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncConnection:
        if self._connection is None:
            self._connection = await self._pool.getconn()
        return self._connection

    async def __aexit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None or self._connection is None or self._connection.closed:
            await self.give_back()

    async def give_back(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await self._pool.putconn(connection)


def _ours(c: Claim) -> Record:
    return Record(c.payment_id, c.body_sha256, c.event_id, c.occurred_at, published=False, claimed=True)


def _theirs(row: dict, unmarked: set[str]) -> Record:
    """unmarked: the payments this process published whose mark was not yet written, as they were
    before the row was read. Taken after the read, a mark committed meanwhile would be in neither
    the row nor the set, and the replay would publish the event again."""
    published = row["published"] or row["payment_id"] in unmarked
    return Record(row["payment_id"], bytes(row["body_sha256"]), row["event_id"], row["occurred_at"],
                  published=published, claimed=False)
