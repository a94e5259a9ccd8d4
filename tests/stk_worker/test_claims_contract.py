"""One suite for both claims adapters: the in-memory fake the fast tests use must keep the rules
PostgreSQL's claims keep, or the fast tests prove nothing."""
from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from services.stk_worker.claims import ClaimStatus, HeldBy, PostgresClaims, PushOutcome
from services.stk_worker.ports import Claims
from tests.stk_worker.fakes import FakeClaims

ACCEPTED = PushOutcome(ClaimStatus.ACCEPTED, "mr-1", "ws_CO_1", attempts=1)


# The PostgreSQL case is marked by hand: the marker hook cannot see a fixture fetched at run time.
@pytest.fixture(params=["memory", pytest.param("postgresql", marks=pytest.mark.integration)])
def claims_of(request) -> Callable[[str], Claims]:
    """Claims of a named worker process; all of them on one store."""
    suffix = uuid.uuid4().hex[:8]
    if request.param == "memory":
        shared = FakeClaims()
        return lambda owner: shared.for_owner(f"{owner}-{suffix}")
    pool = request.getfixturevalue("pool")
    return lambda owner: PostgresClaims(pool, f"{owner}-{suffix}")


def a_payment() -> str:
    return str(uuid.uuid4())


async def test_the_first_claim_is_ours_and_another_worker_finds_it_held(claims_of):
    a, b, payment = claims_of("a"), claims_of("b"), a_payment()
    assert await a.claim(payment, "shop", 3) is None
    assert await b.claim(payment, "shop", 3) == HeldBy(a.owner)
    assert await a.credential_version(payment) == 3


async def test_a_worker_takes_its_own_unfinished_claim_again(claims_of):
    a, payment = claims_of("a"), a_payment()
    await a.claim(payment, "shop", 1)
    assert await a.claim(payment, "shop", 1) is None


async def test_a_finished_claim_gives_its_outcome_to_everyone_even_its_owner(claims_of):
    a, b, payment = claims_of("a"), claims_of("b"), a_payment()
    await a.claim(payment, "shop", 1)
    await a.finish(payment, ACCEPTED)
    assert await a.claim(payment, "shop", 1) == ACCEPTED
    assert await b.claim(payment, "shop", 1) == ACCEPTED


async def test_a_released_claim_is_the_next_worker_s(claims_of):
    a, b, payment = claims_of("a"), claims_of("b"), a_payment()
    await a.claim(payment, "shop", 1)
    await a.release(payment)
    assert await b.claim(payment, "shop", 1) is None
    assert await a.claim(payment, "shop", 1) == HeldBy(b.owner)


async def test_giving_up_on_a_gone_owner_makes_the_claim_unknown_once(claims_of):
    a, b, c, payment = claims_of("a"), claims_of("b"), claims_of("c"), a_payment()
    await a.claim(payment, "shop", 1)
    assert await b.give_up_on(payment, c.owner) is None  # not c's claim: nothing changes
    assert await b.claim(payment, "shop", 1) == HeldBy(a.owner)
    unknown = await b.give_up_on(payment, a.owner)
    assert unknown is not None and unknown.status is ClaimStatus.UNKNOWN and unknown.checkout_request_id is None
    assert await c.claim(payment, "shop", 1) == unknown


async def test_an_owner_judged_gone_still_records_daraja_s_answer(claims_of):
    a, b, payment = claims_of("a"), claims_of("b"), a_payment()
    await a.claim(payment, "shop", 1)
    await b.give_up_on(payment, a.owner)
    await a.finish(payment, ACCEPTED)
    assert await b.claim(payment, "shop", 1) == ACCEPTED


async def test_only_the_owner_finishes_or_releases_a_claim(claims_of):
    a, b, payment = claims_of("a"), claims_of("b"), a_payment()
    await a.claim(payment, "shop", 1)
    await b.finish(payment, ACCEPTED)
    await b.release(payment)
    assert await b.claim(payment, "shop", 1) == HeldBy(a.owner)


async def test_heartbeats_count_up_from_the_first_beat(claims_of):
    a, b = claims_of("a"), claims_of("b")
    assert await b.heartbeat_of(a.owner) is None
    await a.beat()
    first = await b.heartbeat_of(a.owner)
    await a.beat()
    assert first is not None and await b.heartbeat_of(a.owner) == first + 1
