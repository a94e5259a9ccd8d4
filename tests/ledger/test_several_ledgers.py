"""Two ledgers (docs/scaling.md §2) on one database: each scans the same due payments every second,
and each payment due is still reconciled once, one STK query at its time and one Review at its
deadline; one event handed to both at once is applied once."""
from __future__ import annotations

import asyncio
import uuid

from services.ledger.service import Ledger
from tests.ledger.test_ledger_db import accepted, reconciler_of, requested


async def _pending_payments(ledger: Ledger, channel: str, count: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    await ledger.handle_batch([requested(channel, pid) for pid in ids])
    await ledger.handle_batch([accepted(channel, pid, f"ws_CO_{uuid.uuid4().hex}") for pid in ids])
    return ids


async def _rows(pool, sql: str, ids: list[str]) -> list:
    async with pool.connection() as conn:
        return await (await conn.execute(sql, (ids,))).fetchall()


async def test_two_ledgers_ticking_together_reconcile_each_due_payment_once(ledger_pool, pool, codec, clock, unique):
    one, other = Ledger(ledger_pool, codec, clock=clock), Ledger(ledger_pool, codec, clock=clock)
    ids = await _pending_payments(one, f"ch-{unique}", 20)
    reconcilers = [reconciler_of(ledger, ledger_pool, ids) for ledger in (one, other)]

    clock.advance(one.settings.first_query_after.total_seconds() + 1)  # each due for its first STK query
    await asyncio.gather(*(r.tick() for r in reconcilers))
    assert await _rows(pool, "SELECT DISTINCT query_attempts FROM payments WHERE payment_id = ANY(%s)", ids) == [(1,)]

    clock.advance(one.settings.review_after.total_seconds())  # past every deadline
    await asyncio.gather(*(r.tick() for r in reconcilers))
    reviews = await _rows(pool, "SELECT payment_id, count(*) FROM payment_history WHERE payment_id = ANY(%s)"
                          " AND state = 'Review' GROUP BY 1", ids)
    assert sorted(reviews) == sorted((pid, 1) for pid in ids)


async def test_one_event_handed_to_two_ledgers_at_once_is_applied_once(ledger_pool, pool, codec, clock, unique):
    one, other = Ledger(ledger_pool, codec, clock=clock), Ledger(ledger_pool, codec, clock=clock)
    channel, ids = f"ch-{unique}", [str(uuid.uuid4()) for _ in range(20)]
    batch = [requested(channel, pid) for pid in ids]  # a rebalance handed the same batch to both
    await asyncio.gather(one.handle_batch(batch), other.handle_batch(list(reversed(batch))))
    history = await _rows(pool, "SELECT payment_id, count(*) FROM payment_history WHERE payment_id = ANY(%s)"
                          " GROUP BY 1", ids)
    audited = await _rows(pool, "SELECT payment_id, count(*) FROM audit_log WHERE payment_id = ANY(%s) GROUP BY 1", ids)
    assert sorted(history) == sorted(audited) == sorted((pid, 1) for pid in ids)
