"""The ledger's consumer: applies each batch of facts in one PostgreSQL transaction.

Every event id is recorded in processed_events in the same transaction as its effect, and the
consumer loop commits Kafka offsets only after this returns, so a redelivered event is a no-op.
"""
from __future__ import annotations

import logging

import psycopg
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from services.common.kafka import ConsumedEvent, Rejection, Transient
from services.ledger import store

log = logging.getLogger(__name__)

TRANSITIONS = Counter("ledger_transitions_total", "Payment state transitions applied", ["to_state"])
DUPLICATES = Counter("ledger_duplicate_events_total", "Events already applied, ignored", ["topic"])


class Ledger:
    def __init__(self, pool: AsyncConnectionPool):
        self.pool = pool

    async def handle_batch(self, events: list[ConsumedEvent]) -> list[Rejection]:
        try:
            await self._apply_in_one_transaction(events)
            return []
        except (psycopg.IntegrityError, psycopg.DataError):
            # One bad event must not block the rest: find it by applying them one by one.
            return [r for e in events if (r := await self._apply_alone(e))]
        except psycopg.OperationalError as exc:
            raise Transient(f"database unavailable: {exc}") from exc

    async def _apply_alone(self, event: ConsumedEvent) -> Rejection | None:
        try:
            await self._apply_in_one_transaction([event])
        except (psycopg.IntegrityError, psycopg.DataError) as exc:
            return Rejection(event, exc)
        return None

    async def _apply_in_one_transaction(self, events: list[ConsumedEvent]) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            seen = await store.already_processed(conn, [e.value["event_id"] for e in events])
            fresh = _first_of_each(e for e in events if e.value["event_id"] not in seen)
            for e in events:
                if e.value["event_id"] in seen:
                    DUPLICATES.labels(e.topic).inc()
            for e in fresh:
                await self._apply(conn, e)
            await store.mark_processed(conn, [(e.value["event_id"], e.topic) for e in fresh])

    async def _apply(self, conn, event: ConsumedEvent) -> None:
        if event.schema == "payment_requested":
            v = event.value
            if await store.insert_payment(conn, v):
                await store.add_history(conn, v["payment_id"], "Requested", None, None, v["event_id"])
                TRANSITIONS.labels("Requested").inc()


def _first_of_each(events) -> list[ConsumedEvent]:
    """Drops repeats of one event id inside a batch (a producer retry can duplicate it)."""
    unique = {}
    for e in events:
        unique.setdefault(e.value["event_id"], e)
    return list(unique.values())
