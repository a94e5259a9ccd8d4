"""The STK worker killed with SIGKILL while pushes are in flight, then restarted: no payment is ever
pushed twice (the simulator's record proves it), and every push that reached Daraja still settles."""
from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from tests.conftest import eventually
from tests.e2e.stack import Stack
from tests.e2e.test_pipeline import pay, state

PAYMENTS = 40


@pytest.fixture(scope="module")
async def slow_daraja_stack(infra, tmp_path_factory):
    # Daraja answers each push after 1.5 s, so a kill lands while pushes are in flight.
    s = Stack(infra, tmp_path_factory.mktemp("crash"), uuid.uuid4().hex[:10], sandbox_args=["--latency-ms", "1500"])
    s.start()
    yield s
    s.stop()


async def test_a_worker_killed_mid_flight_never_pushes_twice(slow_daraja_stack, pool):
    stack = slow_daraja_stack
    channel = (f"crash-{stack.unique}", await stack.onboard(pool, f"crash-{stack.unique}"))
    paid = await asyncio.gather(*(pay(stack, channel, f"254712{i:06d}") for i in range(PAYMENTS)))
    await eventually(lambda: _pushes_received(stack, 1), timeout=30, interval=0.05)
    stack.kill("worker")
    stack.start_one("worker", "services.stk_worker")

    async def all_known():
        states = [await state(stack, channel, pid) for pid, _ in paid]
        return states if all(s.get("state") in ("Settled", "Requested") for s in states) and \
            sum(s["state"] == "Settled" for s in states) == await _accepted_total(stack, paid) else None
    await eventually(all_known, timeout=90, interval=0.5)

    async def redelivered():  # the restarted worker took over the killed one's messages
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM stk_push_claims WHERE channel_id = %s"
                                     " AND status = 'claimed'", (channel[0],))
            return (await cur.fetchone())[0] == 0
    await eventually(redelivered, timeout=60, interval=0.5)

    async with pool.connection() as conn:
        claims = dict(await (await conn.execute("SELECT status, count(*) FROM stk_push_claims WHERE channel_id = %s"
                                                " GROUP BY 1", (channel[0],))).fetchall())
    assert claims.get("unknown", 0) >= 1, claims  # the kill really caught pushes in flight
    counts = [await _accepted(stack, ref) for _, ref in paid]
    assert max(counts) == 1  # never a second prompt
    assert sum(counts) >= 1
    for (pid, ref), count in zip(paid, counts, strict=True):
        shown = await state(stack, channel, pid)
        # Pushed once: settled by its callback. Never pushed (claimed when the worker died, before
        # the request left): its outcome is unknown, so it waits for reconciliation, never re-pushed.
        assert shown["state"] == ("Settled" if count == 1 else "Requested"), (ref, shown)


async def _pushes_received(stack, n: int) -> bool:
    async with httpx.AsyncClient(headers=stack.sandbox_admin_headers) as http:
        stats = (await http.get(f"{stack.sandbox_url}/sandbox/pushes", params={"status": "accepted"})).json()
    return stats["count"] >= n


async def _accepted(stack, reference: str) -> int:
    async with httpx.AsyncClient(headers=stack.sandbox_admin_headers) as http:
        answer = await http.get(f"{stack.sandbox_url}/sandbox/pushes",
                                params={"AccountReference": reference, "status": "accepted"})
    return answer.json()["count"]


async def _accepted_total(stack, paid) -> int:
    return sum([await _accepted(stack, ref) for _, ref in paid])
