"""Reconciliation: payments Pending too long (or whose push outcome is unknown) get STK queries
with back-off; after the deadline they go to Review rather than to a guess (docs/daraja.md §4)."""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

import psycopg
from prometheus_client import Counter, Gauge
from psycopg.rows import dict_row

from services.common.avro import Codec
from services.common.db import every
from services.common.ids import new_id
from services.common.kafka import ConsumedEvent
from services.ledger import state_machine as sm
from services.ledger.service import FactBatch, LedgerSettings, next_query_delay, query_request

log = logging.getLogger(__name__)

QUERIES = Counter("ledger_reconciliation_queries_total", "STK queries requested by reconciliation")
SET_ASIDE = Counter("ledger_reconciliation_failures_total",
                    "Payments whose reconciliation failed alone and was set aside for a while (alert on any)")
WAITING = Gauge("ledger_parked_facts", "Facts (push results, callbacks, query results) waiting for their payment, "
                "or callbacks waiting for their push result")
OLDEST_WAITING = Gauge("ledger_parked_fact_oldest_age_seconds",
                       "How long the oldest parked fact has waited for its payment (alert past LEDGER_REVIEW_AFTER_S)")
MEASURE_WAITING_EVERY_S = 15.0  # the count scans parked_facts; alerts on it are about minutes, not ticks


def _still_due(row: dict) -> bool:
    return (row["state"] in ("Requested", "Pending") and row["next_query_at"] is not None
            and row["next_query_at"] <= datetime.now(timezone.utc))


class Reconciler:
    def __init__(self, pool, codec: Codec, settings: LedgerSettings, on_commit=lambda rows: None,
                 interval_s: float = 1.0):
        self.pool, self.codec, self.settings = pool, codec, settings
        self.on_commit = on_commit
        self.interval_s = interval_s
        self._measure_at = 0.0  # monotonic time of the next parked-fact count (a scan of that table)

    async def run(self, stop: asyncio.Event) -> None:
        await every(self.interval_s, stop, self.tick, "reconciliation")

    async def tick(self, limit: int = 200) -> int:
        """Reconciles the payments due, in one transaction. If that fails for another reason than the
        database being away, each is tried alone: one payment the ledger cannot reconcile (a bug, a
        row an older version wrote) must not hold up the others, which it would forever, being first
        in line, nor stop the ledger (every() lets only an outage pass)."""
        try:
            return await self._reconcile_due(limit)
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            log.error("reconciliation failed (%s); trying each due payment alone", type(exc).__name__)
            return await self._reconcile_one_by_one(limit)

    async def _reconcile_one_by_one(self, limit: int) -> int:
        async with self.pool.connection() as conn:
            due = await _due(conn, limit)
        for payment_id in due:
            try:
                await self._reconcile_due(limit, only=payment_id)
            except psycopg.OperationalError:
                raise
            except Exception as exc:
                await self._set_aside(payment_id, exc)
        return len(due)

    async def _set_aside(self, payment_id: str, exc: Exception) -> None:
        """Moves the payment back in the line, so the next ticks reach the others; it is tried again
        then, and counted each time (the error's text may quote foreign data: its type only)."""
        SET_ASIDE.inc()
        log.error("reconciliation of a payment failed, set aside for %s: %s", self.settings.query_backoff_max,
                  type(exc).__name__, extra={"payment_id": payment_id})
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE payments SET next_query_at = now() + %s WHERE payment_id = %s",
                               (self.settings.query_backoff_max, payment_id))

    async def _reconcile_due(self, limit: int, only: str | None = None) -> int:
        async with self.pool.connection() as conn, conn.transaction():
            if only is None and time.monotonic() >= self._measure_at:
                await _measure_waiting_facts(conn)
                self._measure_at = time.monotonic() + MEASURE_WAITING_EVERY_S
            due = [only] if only is not None else await _due(conn, limit)
            batch = FactBatch(conn, self.codec, self.settings)
            await batch.prefetch(due)  # locks them: another ledger may have reconciled one meanwhile
            queries = []
            for payment_id in due:
                if _still_due(row := batch.payments[payment_id]):
                    queries += await self._reconcile(batch, row)
            batch.outbox += queries
            await batch.flush()
        batch.committed(self.on_commit)
        return len(due)

    async def _reconcile(self, batch: FactBatch, row: dict) -> list:
        now = datetime.now(timezone.utc)
        age = now - (row["pending_since"] or row["requested_at"])
        if age >= self.settings.review_after:
            event = ConsumedEvent("reconciliation", -1, -1, None, "reconciliation", {"event_id": new_id()})
            await batch.apply(event, row["payment_id"], sm.ReconciliationExpired(int(age.total_seconds())))
            return []
        # A callback awaiting confirmation names the CheckoutRequestID to ask about when the push's is unknown.
        checkout = row["checkout_request_id"] or row["candidate_checkout_request_id"]
        if not checkout:  # nothing to query: only a callback can tell; wait to the deadline
            batch.set(row["payment_id"], {"next_query_at": now + self.settings.review_after - age})
            return []
        attempt = row["query_attempts"] + 1
        batch.set(row["payment_id"], {"query_attempts": attempt,
                                      "next_query_at": now + next_query_delay(attempt, self.settings)})
        QUERIES.inc()
        reason = ("CONFIRM_CALLBACK" if row["candidate_checkout_request_id"] else
                  "PUSH_OUTCOME_UNKNOWN" if row["push_unknown"] else "PENDING_TOO_LONG")
        return [query_request(self.codec, row, checkout, attempt, reason)]


async def _due(conn, limit: int) -> list[str]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT payment_id FROM payments WHERE state IN ('Requested', 'Pending')"
                      " AND next_query_at <= now() ORDER BY next_query_at LIMIT %s", (limit,))
    return [r["payment_id"] for r in await cur.fetchall()]


async def _measure_waiting_facts(conn) -> None:
    """A fact parked for long is for a payment that may never come (its request lost upstream, or
    sent to another pipeline), or a callback whose push result never came: a callback among them
    means money may have moved that no payment here shows.
    Nothing can be applied without the payment, so it is surfaced for an operator."""
    count, oldest_s = await (await conn.execute(
        "SELECT count(*), coalesce(extract(epoch FROM now() - min(parked_at)), 0)::float8 FROM parked_facts")).fetchone()
    WAITING.set(count)
    OLDEST_WAITING.set(oldest_s)
