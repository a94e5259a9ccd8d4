"""Reconciliation, the ledger's second entry point: a timer finds the payments due (Pending too
long, an unknown push outcome, a callback awaiting its STK query, a review deadline) and hands them
to the application service, which asks STK queries with back-off and sends a payment to Review at
its deadline rather than to a guess (docs/daraja.md §4; the deadlines: services/ledger/deadlines.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import psycopg
from prometheus_client import Counter, Gauge
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.common.db import every
from services.common.payment import OPEN_STATES, PaymentState
from services.ledger.application import QUERIES, LedgerService  # noqa: F401 (QUERIES: its metric)
from services.ledger.ports import Clock

log = logging.getLogger(__name__)

SET_ASIDE = Counter("ledger_reconciliation_failures_total",
                    "Payments whose reconciliation failed alone and was set aside for a while (alert on any)")
WAITING = Gauge("ledger_parked_facts", "Facts (push results, callbacks, query results) waiting for their payment, "
                "or callbacks waiting for their push result")
OLDEST_WAITING = Gauge("ledger_parked_fact_oldest_age_seconds",
                       "How long the oldest parked fact has waited for its payment (alert past LEDGER_REVIEW_AFTER_S)")
MEASURE_WAITING_EVERY_S = 15.0  # the count scans parked_facts; alerts on it are about minutes, not ticks
# One second: a payment is due at its deadline to the second (deadlines never schedule a query past
# it), so it reaches Review within about a tick of it.
TICK_S = 1.0

DueScan = Callable[[AsyncConnection, datetime, int], Awaitable[list[str]]]


# Spelled out, not a parameter, so that the planner uses the partial index payments_to_reconcile.
_OPEN = ", ".join(f"'{s.value}'" for s in PaymentState if s in OPEN_STATES)


async def due_payments(conn: AsyncConnection, now: datetime, limit: int) -> list[str]:
    """The open payments whose next query or review is due by `now`, the longest due first."""
    cur = await conn.execute(f"SELECT payment_id FROM payments WHERE state IN ({_OPEN})"
                             " AND next_query_at <= %s ORDER BY next_query_at LIMIT %s", (now, limit))
    return [r[0] for r in await cur.fetchall()]


class Reconciler:
    def __init__(self, pool: AsyncConnectionPool | None, service: LedgerService, clock: Clock,
                 interval_s: float = TICK_S, due: DueScan = due_payments):
        self.pool, self.service, self.clock = pool, service, clock
        self.interval_s = interval_s
        self.due = due
        self._measure_at = 0.0  # monotonic time of the next parked-fact count (a scan of that table)

    @property
    def _pool(self) -> AsyncConnectionPool:
        assert self.pool is not None, "a reconciler built without a pool cannot scan"
        return self.pool

    async def run(self, stop: asyncio.Event) -> None:
        await every(self.interval_s, stop, self.tick, "reconciliation")

    async def tick(self, limit: int = 200) -> int:
        """Reconciles the payments due, in one transaction. If that fails for another reason than the
        database being away, each is tried alone: one payment the ledger cannot reconcile (a bug, a
        row an older version wrote) must not hold up the others, which it would forever, being first
        in line, nor stop the ledger (every() lets only an outage pass)."""
        async with self._pool.connection() as conn:
            if time.monotonic() >= self._measure_at:
                await _measure_waiting_facts(conn, self.clock.now())
                self._measure_at = time.monotonic() + MEASURE_WAITING_EVERY_S
            due = await self.due(conn, self.clock.now(), limit)
        if not due:
            return 0
        try:
            await self.service.reconcile(due)
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            log.error("reconciliation failed (%s); trying each due payment alone", type(exc).__name__)
            await self._reconcile_one_by_one(due)
        return len(due)

    async def _reconcile_one_by_one(self, due: list[str]) -> None:
        for payment_id in due:
            try:
                await self.service.reconcile([payment_id])
            except psycopg.OperationalError:
                raise
            except Exception as exc:
                await self._set_aside(payment_id, exc)

    async def _set_aside(self, payment_id: str, exc: Exception) -> None:
        """Moves the payment back in the line, so the next ticks reach the others; it is tried again
        then, and counted each time (the error's text may quote foreign data: its type only)."""
        SET_ASIDE.inc()
        backoff = self.service.settings.query_backoff_max
        log.error("reconciliation of a payment failed, set aside for %s: %s", backoff, type(exc).__name__,
                  extra={"payment_id": payment_id})
        async with self._pool.connection() as conn:
            await conn.execute("UPDATE payments SET next_query_at = %s WHERE payment_id = %s",
                               (self.clock.now() + backoff, payment_id))


async def _measure_waiting_facts(conn: AsyncConnection, now: datetime) -> None:
    """A fact parked for long is for a payment that may never come (its request lost upstream, or
    sent to another pipeline), or a callback whose push result never came: a callback among them
    means money may have moved that no payment here shows.
    Nothing can be applied without the payment, so it is surfaced for an operator."""
    row = await (await conn.execute(
        "SELECT count(*), coalesce(extract(epoch FROM %s - min(parked_at)), 0)::float8 FROM parked_facts",
        (now,))).fetchone()
    assert row is not None
    WAITING.set(row[0])
    OLDEST_WAITING.set(row[1])
