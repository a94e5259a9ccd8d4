"""PostgreSQL's claims make the claims and finishes of many payments in one statement: each call
still gets its own answer, and one bad row fails only its own call."""
from __future__ import annotations

import asyncio
import contextlib
import uuid

import psycopg
import pytest

from services.stk_worker.claims import ClaimStatus, HeldBy, PostgresClaims, PushOutcome

pytestmark = pytest.mark.integration

ACCEPTED = PushOutcome(ClaimStatus.ACCEPTED, "mr-1", "ws_CO_1", attempts=1)


class CountingPool:
    """The pool, counting the connections taken: one per statement made together."""

    def __init__(self, pool):
        self.pool, self.taken = pool, 0

    @contextlib.asynccontextmanager
    async def connection(self):
        self.taken += 1
        async with self.pool.connection() as conn:
            yield conn


def claims_of(pool, owner: str) -> PostgresClaims:
    return PostgresClaims(pool, f"{owner}-{uuid.uuid4().hex[:8]}")


def payments(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


async def test_claims_made_together_each_get_their_own_answer_from_one_connection(pool):
    a = claims_of(pool, "a")
    held, finished, new_1, new_2 = payments(4)
    await a.claim(held, "shop", 1)
    await a.claim(finished, "shop", 1)
    await a.finish(finished, ACCEPTED)
    counting = CountingPool(pool)
    b = PostgresClaims(counting, "b-" + uuid.uuid4().hex[:8])  # type: ignore[arg-type]

    answers = await asyncio.gather(*(b.claim(p, "shop", 2) for p in (new_1, held, finished, new_2)))

    assert answers == [None, HeldBy(a.owner), ACCEPTED, None]
    assert counting.taken == 1
    assert await b.credential_version(new_2) == 2 and await b.credential_version(held) == 1


async def test_finishes_made_together_record_each_answer(pool):
    counting = CountingPool(pool)
    a = PostgresClaims(counting, "a-" + uuid.uuid4().hex[:8])  # type: ignore[arg-type]
    first, second = payments(2)
    await asyncio.gather(a.claim(first, "shop", 1), a.claim(second, "shop", 1))
    refused = PushOutcome(ClaimStatus.REFUSED, error_code="1032", error_message="cancelled", attempts=2)
    taken = counting.taken

    await asyncio.gather(a.finish(first, ACCEPTED), a.finish(second, refused))

    assert counting.taken == taken + 1
    b = claims_of(pool, "b")
    assert await b.claim(first, "shop", 1) == ACCEPTED
    assert await b.claim(second, "shop", 1) == refused


async def test_an_answer_postgresql_cannot_store_fails_only_its_own_finish(pool):
    a, b = claims_of(pool, "a"), claims_of(pool, "b")
    good, bad = payments(2)
    await a.claim(good, "shop", 1)
    await a.claim(bad, "shop", 1)
    unstorable = PushOutcome(ClaimStatus.REFUSED, error_code="X", error_message="a\x00b", attempts=1)

    results = await asyncio.gather(a.finish(good, ACCEPTED), a.finish(bad, unstorable), return_exceptions=True)

    assert results[0] is None and isinstance(results[1], psycopg.DataError)
    assert await b.claim(good, "shop", 1) == ACCEPTED
    assert await b.claim(bad, "shop", 1) == HeldBy(a.owner)


async def test_the_same_payment_claimed_twice_at_once_is_ours_both_times(pool):
    a, b = claims_of(pool, "a"), claims_of(pool, "b")
    payment = payments(1)[0]

    assert list(await asyncio.gather(a.claim(payment, "shop", 1), a.claim(payment, "shop", 1))) == [None, None]
    assert await b.claim(payment, "shop", 1) == HeldBy(a.owner)
