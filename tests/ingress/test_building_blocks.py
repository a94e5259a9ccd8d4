"""The hot path's building blocks on their own: the claim table, natural batching and the TTL cache."""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest
from psycopg_pool import AsyncConnectionPool

from services.common.ids import new_id
from services.ingress.batching import Batcher
from services.ingress.cache import TtlCache
from services.ingress.idempotency import Claim, IdempotencyStore


@pytest.fixture
async def store(database_url):
    pool = AsyncConnectionPool(database_url, kwargs={"autocommit": True}, min_size=1, max_size=4, open=False)
    await pool.open(wait=True)
    store = IdempotencyStore(pool)
    yield store
    await store.close()
    await pool.close()


def claim(channel_id: str, key: str, digest: bytes = b"a" * 32) -> Claim:
    payment_id, event_id = new_id(), new_id()
    return Claim(channel_id, key, digest, payment_id, event_id, datetime.now(timezone.utc).replace(microsecond=0),
                 "key-1", 5, "REF", None)


async def test_one_claim_wins_even_among_duplicates_of_one_batch(store, unique):
    claims = [claim(f"batch-{unique}", "k") for _ in range(8)]
    records = await asyncio.gather(*(store.claim(c) for c in claims))  # queued together: one INSERT
    assert sum(r.claimed for r in records) == 1
    winner = next(c for c, r in zip(claims, records, strict=True) if r.claimed)
    assert {(r.payment_id, r.event_id, r.occurred_at) for r in records} == {
        (winner.payment_id, winner.event_id, winner.occurred_at)}
    assert not any(r.published for r in records)


async def test_a_later_claim_sees_the_first_ones_digest_and_publish_mark(store, unique):
    first = await store.claim(claim(f"later-{unique}", "k", b"a" * 32))
    other_body = await store.claim(claim(f"later-{unique}", "k", b"b" * 32))
    assert other_body.payment_id == first.payment_id and other_body.body_sha256 == b"a" * 32
    store.mark_published(first.payment_id)
    # This process knows at once; the database a moment later.
    assert (await store.claim(claim(f"later-{unique}", "k"))).published
    assert await store.request(first.payment_id) is not None
    for _ in range(100):
        if not store._published_unmarked:
            break
        await asyncio.sleep(0.02)
    assert not store._published_unmarked
    fresh = IdempotencyStore(store._pool)  # another process: only the database to go by
    assert (await fresh.claim(claim(f"later-{unique}", "k"))).published
    await fresh.close()


async def test_a_replay_read_while_the_publish_mark_commits_still_sees_the_payment_published(store, unique):
    first = await store.claim(claim(f"race-{unique}", "k"))
    store._published_unmarked.add(first.payment_id)  # published; its mark not written yet

    class MarkCommitsDuringTheRead:
        """The claims connection, with the mark committing (and leaving the set) as the row is read."""

        def __init__(self, conn):
            self.conn = conn

        def __getattr__(self, name):
            return getattr(self.conn, name)

        def cursor(self, *args, **kwargs):
            return MarkAfterFetch(self.conn.cursor(*args, **kwargs))

    class MarkAfterFetch:
        def __init__(self, cur):
            self.cur = cur

        def __getattr__(self, name):
            return getattr(self.cur, name)

        async def fetchall(self):
            rows = await self.cur.fetchall()
            await store._mark_batch([first.payment_id])
            return rows

    held = store._claims_connection

    class Held:
        async def __aenter__(self):
            return MarkCommitsDuringTheRead(await held.__aenter__())

        async def __aexit__(self, *exc):
            await held.__aexit__(*exc)

        async def give_back(self):
            await held.give_back()

    store._claims_connection = Held()
    replay = await store.claim(claim(f"race-{unique}", "k"))
    assert replay.payment_id == first.payment_id and not store._published_unmarked
    assert replay.published  # else the ingress would publish the event a second time


async def test_an_unpublished_claim_is_not_readable(store, unique):
    record = await store.claim(claim(f"unread-{unique}", "k"))
    assert await store.request(record.payment_id) is None


async def test_batches_keep_order_and_grow_while_one_runs():
    seen: list[list[int]] = []

    async def flush(items):
        seen.append(list(items))
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    batcher = Batcher("test", flush)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)  # the first batch starts with one item...
    rest = await asyncio.gather(*(batcher.submit(i) for i in range(1, 6)))  # ...the rest queue behind it
    assert await first == 0 and rest == [10, 20, 30, 40, 50]
    assert seen == [[0], [1, 2, 3, 4, 5]]
    await batcher.close()


async def test_a_failed_batch_fails_its_items_and_the_next_batch_runs():
    calls = 0

    async def flush(items):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database down")
        return list(items)

    batcher = Batcher("test", flush)
    with pytest.raises(RuntimeError, match="database down"):
        await batcher.submit(1)
    assert await batcher.submit(2) == 2
    await batcher.close()


async def test_close_drains_forgotten_items_first():
    flushed: list[int] = []

    async def flush(items):
        await asyncio.sleep(0.01)
        flushed.extend(items)
        return [None] * len(items)

    batcher = Batcher("test", flush)
    for i in range(5):
        batcher.enqueue_and_forget(i)
    await batcher.close(drain_timeout_s=2)
    assert flushed == [0, 1, 2, 3, 4]


async def test_cache_expires_coalesces_and_stays_bounded():
    now = [0.0]
    loads: list[str] = []
    cache: TtlCache[str] = TtlCache(5.0, entries_max=2, clock=lambda: now[0])

    async def load(key: str) -> str:
        loads.append(key)
        await asyncio.sleep(0.01)
        return key.upper()

    # Concurrent misses share one load.
    assert await asyncio.gather(*(cache.get("a", lambda: load("a")) for _ in range(5))) == ["A"] * 5
    assert loads == ["a"]
    now[0] = 4.9
    assert await cache.get("a", lambda: load("a")) == "A" and loads == ["a"]
    now[0] = 5.1  # expired
    assert await cache.get("a", lambda: load("a")) == "A" and loads == ["a", "a"]
    await cache.get("b", lambda: load("b"))
    await cache.get("c", lambda: load("c"))  # evicts the oldest entry, "a"
    await cache.get("a", lambda: load("a"))
    assert loads == ["a", "a", "b", "c", "a"]


async def test_cache_does_not_keep_failures():
    cache: TtlCache[str] = TtlCache(5.0)

    async def failing() -> str:
        raise ConnectionError("down")

    async def working() -> str:
        return "up"

    with pytest.raises(ConnectionError):
        await cache.get("k", failing)
    assert await cache.get("k", working) == "up"
