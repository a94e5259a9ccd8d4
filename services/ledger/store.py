"""The ledger's SQL, one function per statement group; callers own the transaction."""
from __future__ import annotations

import json
from typing import Any

from psycopg import AsyncConnection


async def already_processed(conn: AsyncConnection, event_ids: list[str]) -> set[str]:
    cur = await conn.execute("SELECT event_id::text FROM processed_events WHERE event_id = ANY(%s::uuid[])",
                             (event_ids,))
    return {row[0] for row in await cur.fetchall()}


async def mark_processed(conn: AsyncConnection, events: list[tuple[str, str]]) -> None:
    """events: (event_id, topic). The primary key makes a replay fail loudly instead of applying twice."""
    async with conn.cursor() as cur:
        await cur.executemany("INSERT INTO processed_events (event_id, topic) VALUES (%s, %s)", events)


async def insert_payment(conn: AsyncConnection, p: dict[str, Any]) -> bool:
    """Inserts a Requested payment; False when the payment id already exists."""
    cur = await conn.execute(
        "INSERT INTO payments (payment_id, channel_id, state, amount, phone, account_reference, description,"
        " order_reference, metadata, requested_at) VALUES (%s, %s, 'Requested', %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (payment_id) DO NOTHING",
        (p["payment_id"], p["channel_id"], p["amount"], p["phone"], p["account_reference"], p["description"],
         p["order_reference"], json.dumps(p["metadata"]), p["occurred_at"]))
    return cur.rowcount == 1


async def add_history(conn: AsyncConnection, payment_id: str, state: str, previous: str | None,
                      reason: str | None, event_id: str) -> None:
    await conn.execute("INSERT INTO payment_history (payment_id, state, previous, reason, event_id)"
                       " VALUES (%s, %s, %s, %s, %s)", (payment_id, state, previous, reason, event_id))
