"""The durable push claim, written before Daraja is called and finished after it answered."""
from __future__ import annotations

from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool


@dataclass(frozen=True)
class PushOutcome:
    status: str  # accepted, refused, unknown, invalid
    merchant_request_id: str | None = None
    checkout_request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0


async def claim(pool: AsyncConnectionPool, payment_id: str, channel_id: str, credential_version: int
                ) -> PushOutcome | None:
    """None: the push is ours to make. Otherwise what an earlier attempt recorded; a claim that never
    finished (its worker died mid-call) comes back as 'unknown': it may have reached Daraja."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO stk_push_claims (payment_id, channel_id, status, credential_version)"
            " VALUES (%s, %s, 'claimed', %s) ON CONFLICT (payment_id) DO NOTHING",
            (payment_id, channel_id, credential_version))
        if cur.rowcount == 1:
            return None
        cur = await conn.execute(
            "UPDATE stk_push_claims SET status = 'unknown', finished_at = now(),"
            " error_message = 'the worker stopped while the push was in flight'"
            " WHERE payment_id = %s AND status = 'claimed'"
            " RETURNING status, merchant_request_id, checkout_request_id, error_code, error_message, attempts",
            (payment_id,))
        row = await cur.fetchone()
        if row is None:
            cur = await conn.execute(
                "SELECT status, merchant_request_id, checkout_request_id, error_code, error_message, attempts"
                " FROM stk_push_claims WHERE payment_id = %s", (payment_id,))
            row = await cur.fetchone()
        return PushOutcome(*row)


async def finish(pool: AsyncConnectionPool, payment_id: str, outcome: PushOutcome) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE stk_push_claims SET status = %s, merchant_request_id = %s, checkout_request_id = %s,"
            " error_code = %s, error_message = %s, attempts = %s, finished_at = now() WHERE payment_id = %s",
            (outcome.status, outcome.merchant_request_id, outcome.checkout_request_id, outcome.error_code,
             outcome.error_message, outcome.attempts, payment_id))


async def credential_version(pool: AsyncConnectionPool, payment_id: str) -> int | None:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT credential_version FROM stk_push_claims WHERE payment_id = %s", (payment_id,))
        row = await cur.fetchone()
        return row[0] if row else None
