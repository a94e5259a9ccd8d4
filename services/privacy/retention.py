"""The retention of payers' data: a payment's payer data is pseudonymised once its channel's retention
period (or PAYER_DATA_RETENTION_DAYS) has passed since the payment became final.

A payment never final is left alone: money may still move, and the review desk may need to reach the
payer. The pseudonym is keyed (services/common/pseudonyms.py), so repeat payers still join and the
receipt, amount and times still answer a search. A backlog goes in chunks, each its own short
transaction, like the ledger's retention of processed-event ids.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.common.db import every
from services.common.pseudonyms import Pseudonyms
from services.privacy.scrub import lock_payments, scrub_payments

log = logging.getLogger(__name__)

PSEUDONYMISED = Counter("privacy_payments_pseudonymised_total",
                        "Payments whose payer data the retention replaced by a keyed pseudonym")
OLDEST_DUE = Gauge("privacy_retention_oldest_due_seconds",
                   "How long the oldest payment due for pseudonymisation has been due (0: none left)")
RUNS = Counter("privacy_retention_runs_total", "Retention runs by result: done, or failed (retried next run)",
               ["result"])

_CHANNELS = "SELECT channel_id, payer_data_retention_days FROM channels ORDER BY channel_id"
# The oldest first, by the partial index payments_payer_data_due; SKIP LOCKED is not needed, the
# advisory locks order writers, and only one retention job runs (a second would find the rows done).
_DUE = """
SELECT payment_id FROM payments
WHERE channel_id = %s AND payer_data = 'kept' AND final_at IS NOT NULL AND final_at < now() - make_interval(days => %s)
  AND state IN ('Settled', 'Cancelled', 'Failed')
ORDER BY final_at LIMIT %s
"""
_STILL_DUE = """
SELECT payment_id FROM payments
WHERE payment_id = ANY(%s) AND payer_data = 'kept' AND final_at < now() - make_interval(days => %s)
  AND state IN ('Settled', 'Cancelled', 'Failed')
"""
_OLDEST = """
SELECT extract(epoch FROM now() - make_interval(days => %s) - min(final_at)) FROM payments
WHERE channel_id = %s AND payer_data = 'kept' AND final_at IS NOT NULL AND final_at < now() - make_interval(days => %s)
  AND state IN ('Settled', 'Cancelled', 'Failed')
"""


@dataclass(frozen=True)
class RunReport:
    payments: int = 0
    ingress_requests: int = 0
    callback_bodies: int = 0
    parked_facts: int = 0
    oldest_due_s: float = 0.0


class Retention:
    def __init__(self, pool: AsyncConnectionPool, pseudonyms: Pseudonyms, default_days: int, *,
                 interval_s: float = 3600.0, chunk: int = 500, pause_s: float = 0.2):
        self.pool, self.pseudonyms, self.default_days = pool, pseudonyms, default_days
        self.interval_s, self.chunk, self.pause_s = interval_s, chunk, pause_s

    async def run(self, stop: asyncio.Event) -> None:
        await every(self.interval_s, stop, lambda: self.run_once(stop), "payer-data retention")

    async def run_once(self, stop: asyncio.Event | None = None) -> RunReport:
        """Pseudonymises every payment due, channel by channel, a chunk per transaction; one log line."""
        started = time.monotonic()
        totals = RunReport()
        try:
            async with self.pool.connection() as conn:
                channels = await (await conn.execute(_CHANNELS)).fetchall()
            for channel_id, days in channels:
                days = days or self.default_days
                while not (stop and stop.is_set()):
                    done = await self._pseudonymise_some(channel_id, days)
                    totals = _add(totals, done)
                    if done.payments < self.chunk:
                        break
                    await asyncio.sleep(self.pause_s)  # the ledger keeps the database first
            oldest = await self._oldest_due_s(channels)
        except Exception:
            RUNS.labels("failed").inc()
            raise
        OLDEST_DUE.set(oldest)
        RUNS.labels("done").inc()
        log.info("payer-data retention: %d payments pseudonymised (%d ingress records, %d callback bodies, "
                 "%d parked facts) in %.1f s; oldest still due: %.0f s", totals.payments, totals.ingress_requests,
                 totals.callback_bodies, totals.parked_facts, time.monotonic() - started, oldest)
        return RunReport(totals.payments, totals.ingress_requests, totals.callback_bodies, totals.parked_facts,
                         oldest)

    async def _pseudonymise_some(self, channel_id: str, days: int) -> RunReport:
        async with self.pool.connection() as conn, conn.transaction():
            candidates = [r[0] for r in await (await conn.execute(_DUE, (channel_id, days, self.chunk))).fetchall()]
            # Read again under the ledger's locks: a late fact may have reopened one meanwhile (a
            # Failed payment a late success sent to Review), and money may move on it again.
            await lock_payments(conn, candidates)
            due = [r[0] for r in await (await conn.execute(_STILL_DUE, (candidates, days))).fetchall()]
            report = await scrub_payments(conn, due, self.pseudonyms.phone, "pseudonymised", self.pseudonyms.checkout)
        PSEUDONYMISED.inc(report.payments)
        return RunReport(report.payments, report.ingress_requests, report.callback_bodies, report.parked_facts)

    async def _oldest_due_s(self, channels: list[tuple[str, int | None]]) -> float:
        async with self.pool.connection() as conn:
            ages = [await _one(conn, _OLDEST, (days or self.default_days, channel_id, days or self.default_days))
                    for channel_id, days in channels]
        return max([float(a) for a in ages if a is not None], default=0.0)


async def _one(conn: AsyncConnection, query: str, params: tuple[object, ...]) -> Any:
    row = await (await conn.execute(query, params)).fetchone()
    return row[0] if row else None


def _add(a: RunReport, b: RunReport) -> RunReport:
    return RunReport(a.payments + b.payments, a.ingress_requests + b.ingress_requests,
                     a.callback_bodies + b.callback_bodies, a.parked_facts + b.parked_facts)
