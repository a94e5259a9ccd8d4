"""The durable push claim (PostgreSQL adapter of the Claims port): written before Daraja is called,
finished with Daraja's answer, owned by one worker process whose heartbeat says it still lives."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool


class ClaimStatus(enum.StrEnum):
    CLAIMED = "claimed"    # a worker is pushing (or about to): nobody else may
    ACCEPTED = "accepted"  # Daraja accepted: the CheckoutRequestID is recorded
    REFUSED = "refused"    # Daraja refused, or retries ran out on answers it did not act on
    UNKNOWN = "unknown"    # the push may have reached Daraja: reconciled by callback and STK query
    INVALID = "invalid"    # never pushed: the request or the channel cannot be pushed
    RELEASED = "released"  # given back before anything was sent: the next owner pushes it


@dataclass(frozen=True)
class PushOutcome:
    status: ClaimStatus
    merchant_request_id: str | None = None
    checkout_request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0


@dataclass(frozen=True)
class HeldBy:
    """A claim another worker process holds and has not finished; `owner` None for claims written
    before owners were recorded (migration 0013)."""
    owner: str | None


_FIELDS = "status, merchant_request_id, checkout_request_id, error_code, error_message, attempts, owner"


def _seen(row: tuple[Any, ...]) -> PushOutcome | HeldBy | None:
    status = ClaimStatus(row[0])
    if status in (ClaimStatus.CLAIMED, ClaimStatus.RELEASED):
        return HeldBy(row[6])
    return PushOutcome(status, *row[1:6])


class PostgresClaims:
    """`owner` names this worker process; `beat` keeps its heartbeat row alive."""

    def __init__(self, pool: AsyncConnectionPool, owner: str):
        self.pool = pool
        self.owner = owner

    async def claim(self, payment_id: str, channel_id: str, credential_version: int) -> PushOutcome | HeldBy | None:
        async with self.pool.connection() as conn:
            # Ours: a new claim, a released one (nothing was sent), or one this very process wrote
            # in an attempt that failed before pushing (the Pusher knows it sent nothing: a push it
            # sent stays in its hand until recorded, and it never claims twice meanwhile).
            cur = await conn.execute(
                "INSERT INTO stk_push_claims (payment_id, channel_id, status, credential_version, owner)"
                " VALUES (%s, %s, 'claimed', %s, %s) ON CONFLICT (payment_id) DO UPDATE"
                " SET status = 'claimed', owner = EXCLUDED.owner, credential_version = EXCLUDED.credential_version,"
                " claimed_at = now(), finished_at = NULL"
                " WHERE stk_push_claims.status = 'released'"
                " OR (stk_push_claims.status = 'claimed' AND stk_push_claims.owner = EXCLUDED.owner)",
                (payment_id, channel_id, credential_version, self.owner))
            if cur.rowcount == 1:
                return None
            cur = await conn.execute(f"SELECT {_FIELDS} FROM stk_push_claims WHERE payment_id = %s", (payment_id,))
            row = await cur.fetchone()
        return None if row is None else _seen(row)

    async def finish(self, payment_id: str, outcome: PushOutcome) -> None:
        # 'unknown' too: a worker that judged this process dead (its heartbeat was not seen to move)
        # wrote it; the answer Daraja gave is better than that guess, and the ledger takes it.
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE stk_push_claims SET status = %s, merchant_request_id = %s, checkout_request_id = %s,"
                " error_code = %s, error_message = %s, attempts = %s, finished_at = now()"
                " WHERE payment_id = %s AND owner = %s AND status IN ('claimed', 'unknown')",
                (outcome.status.value, outcome.merchant_request_id, outcome.checkout_request_id, outcome.error_code,
                 outcome.error_message, outcome.attempts, payment_id, self.owner))

    async def release(self, payment_id: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE stk_push_claims SET status = 'released', finished_at = now()"
                               " WHERE payment_id = %s AND owner = %s AND status = 'claimed'",
                               (payment_id, self.owner))

    async def give_up_on(self, payment_id: str, owner: str | None) -> PushOutcome | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE stk_push_claims SET status = 'unknown', finished_at = now(),"
                " error_message = 'the worker stopped while the push was in flight'"
                " WHERE payment_id = %s AND status = 'claimed' AND owner IS NOT DISTINCT FROM %s"
                f" RETURNING {_FIELDS}", (payment_id, owner))
            row = await cur.fetchone()
            if row is None:  # finished or released meanwhile
                cur = await conn.execute(f"SELECT {_FIELDS} FROM stk_push_claims WHERE payment_id = %s",
                                         (payment_id,))
                row = await cur.fetchone()
        seen = None if row is None else _seen(row)
        return seen if isinstance(seen, PushOutcome) else None

    async def beat(self) -> None:
        try:
            await self._beat()
        except psycopg.OperationalError:
            # A PostgreSQL restart leaves the pool's idle connections broken, each failing once when
            # next used. Beats taking them one at a time, 2 s apart, could stay silent longer than
            # other workers wait before judging this one gone: clear them all, then beat again.
            await self.pool.check()
            await self._beat()

    async def _beat(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO stk_worker_instances (instance_id) VALUES (%s) ON CONFLICT (instance_id)"
                " DO UPDATE SET beats = stk_worker_instances.beats + 1, beat_at = now()", (self.owner,))

    async def heartbeat_of(self, owner: str) -> int | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT beats FROM stk_worker_instances WHERE instance_id = %s", (owner,))
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def credential_version(self, payment_id: str) -> int | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT credential_version FROM stk_push_claims WHERE payment_id = %s",
                                     (payment_id,))
            row = await cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])
