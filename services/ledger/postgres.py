"""The unit-of-work port's PostgreSQL adapter: one transaction on one pooled connection, through
the statements of services/ledger/store.py."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.ledger import store
from services.ledger.policies import POLICIES, ChannelPolicies
from services.ledger.ports import Opened, OutboxRow, UnitOfWork, UnitOfWorkFactory, Writes


class PostgresUnitOfWork:
    def __init__(self, conn: AsyncConnection, policy_ttl_s: float, policies: ChannelPolicies = POLICIES):
        self.conn, self.policy_ttl_s, self.policies = conn, policy_ttl_s, policies

    async def open(self, events: list[tuple[str, str]], payment_ids: list[str], receipts: list[str],
                   checkout_ids: list[str]) -> Opened:
        start = await store.open_batch(self.conn, events, payment_ids, receipts, checkout_ids)
        return Opened(start.fresh_events, start.payments, start.parked, start.receipts, start.checkouts)

    async def owners(self, receipts: list[str], checkout_ids: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        return await store.owners(self.conn, receipts, checkout_ids)

    async def confirm_by_query(self, channel_id: str) -> bool:
        return await self.policies.confirm_by_query(self.conn, channel_id, self.policy_ttl_s)

    async def analytics_metadata_keys(self, channel_id: str) -> frozenset[str]:
        return await self.policies.analytics_metadata_keys(self.conn, channel_id, self.policy_ttl_s)

    async def write(self, writes: Writes) -> list[OutboxRow]:
        await store.write_payments(self.conn, writes.payments, writes.unparked)
        await store.add_history(self.conn, writes.history)
        await store.park(self.conn, writes.parked)
        await store.keep_callbacks(self.conn, writes.callback_bodies)
        outbox_rows = await store.enqueue(self.conn, writes.outbox)
        await store.append_audit(self.conn, writes.audit)  # last: it holds the chain's lock until commit
        return outbox_rows


def postgres_unit_of_work(pool: AsyncConnectionPool, policy_ttl_s: float,
                          policies: ChannelPolicies = POLICIES) -> UnitOfWorkFactory:
    @asynccontextmanager
    async def unit_of_work() -> AsyncIterator[UnitOfWork]:
        async with pool.connection() as conn, conn.transaction():
            yield PostgresUnitOfWork(conn, policy_ttl_s, policies)
    return unit_of_work
