"""The ledger's SQL, one function per statement group; callers own the transaction."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

_AUDIT_LOCK = 7_262_022  # advisory lock: one appender of the hash chain at a time
GENESIS = "0" * 64

PAYMENT_COLUMNS = ("payment_id, channel_id, state, amount, phone, order_reference, metadata, checkout_request_id,"
                   " merchant_request_id, mpesa_receipt, transaction_time, result_code, result_desc, push_unknown,"
                   " query_attempts, pending_since, requested_at")


async def already_processed(conn: AsyncConnection, event_ids: list[str]) -> set[str]:
    cur = await conn.execute("SELECT event_id::text FROM processed_events WHERE event_id = ANY(%s::uuid[])",
                             (event_ids,))
    return {row[0] for row in await cur.fetchall()}


async def mark_processed(conn: AsyncConnection, events: list[tuple[str, str]]) -> None:
    """events: (event_id, topic). The primary key makes a replay fail loudly instead of applying twice."""
    async with conn.cursor() as cur:
        await cur.executemany("INSERT INTO processed_events (event_id, topic) VALUES (%s, %s)", events)


async def lock_payments(conn: AsyncConnection, payment_ids: list[str]) -> dict[str, dict]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE payment_id = ANY(%s) ORDER BY payment_id"
                      " FOR UPDATE", (payment_ids,))
    return {row["payment_id"]: row for row in await cur.fetchall()}


async def insert_payment(conn: AsyncConnection, v: dict[str, Any], state: str, changes: dict) -> dict:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "INSERT INTO payments (payment_id, channel_id, state, amount, phone, account_reference, description,"
        " order_reference, metadata, requested_at, result_code, result_desc)"
        f" VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {PAYMENT_COLUMNS}",
        (v["payment_id"], v["channel_id"], state, v["amount"], v["phone"], v["account_reference"], v["description"],
         v["order_reference"], json.dumps(v["metadata"]), v["occurred_at"], changes.get("result_code"),
         changes.get("result_desc")))
    return await cur.fetchone()


UPDATABLE = {"state", "checkout_request_id", "merchant_request_id", "mpesa_receipt", "transaction_time",
             "result_code", "result_desc", "push_unknown", "pending_since", "next_query_at", "query_attempts",
             "review_reason"}


async def update_payment(conn: AsyncConnection, payment_id: str, changes: dict[str, Any]) -> dict:
    unknown = set(changes) - UPDATABLE
    assert not unknown, f"not updatable: {unknown}"
    assignments = ", ".join(f"{column} = %({column})s" for column in changes)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"UPDATE payments SET {assignments}, updated_at = now() WHERE payment_id = %(payment_id)s"
                      f" RETURNING {PAYMENT_COLUMNS}", {**changes, "payment_id": payment_id})
    return await cur.fetchone()


async def payment_with_receipt(conn: AsyncConnection, receipt: str, other_than: str) -> str | None:
    cur = await conn.execute("SELECT payment_id FROM payments WHERE mpesa_receipt = %s AND payment_id <> %s",
                             (receipt, other_than))
    row = await cur.fetchone()
    return row[0] if row else None


async def add_history(conn: AsyncConnection, payment_id: str, state: str, previous: str | None,
                      reason: str | None, event_id: str) -> None:
    await conn.execute("INSERT INTO payment_history (payment_id, state, previous, reason, event_id)"
                       " VALUES (%s, %s, %s, %s, %s)", (payment_id, state, previous, reason, event_id))


async def park(conn: AsyncConnection, event_id: str, payment_id: str, topic: str, payload: bytes) -> None:
    await conn.execute("INSERT INTO parked_facts (event_id, payment_id, topic, payload) VALUES (%s, %s, %s, %s)"
                       " ON CONFLICT DO NOTHING", (event_id, payment_id, topic, payload))


async def take_parked(conn: AsyncConnection, payment_id: str) -> list[tuple[str, bytes]]:
    cur = await conn.execute("DELETE FROM parked_facts WHERE payment_id = %s RETURNING topic, payload, parked_at",
                             (payment_id,))
    return [(topic, bytes(payload)) for topic, payload, _ in sorted(await cur.fetchall(), key=lambda r: r[2])]


async def enqueue(conn: AsyncConnection, rows: list[tuple[str, bytes, bytes]]) -> None:
    """Outbox rows (topic, key, payload), published by the relay after this transaction commits."""
    if rows:
        async with conn.cursor() as cur:
            await cur.executemany("INSERT INTO outbox (topic, key, payload) VALUES (%s, %s, %s)", rows)


# --- Audit trail -----------------------------------------------------------------------------

def audit_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


async def append_audit(conn: AsyncConnection, entries: list[dict[str, Any]]) -> None:
    """entries: dicts of payment_id, event_id, fact, verdict, from_state, to_state, detail."""
    if not entries:
        return
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_AUDIT_LOCK,))
    cur = await conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
    last = await cur.fetchone()
    seq, prev = (last[0], last[1]) if last else (0, GENESIS)
    at = datetime.now(timezone.utc)
    rows = []
    for entry in entries:
        seq += 1
        row = {**entry, "seq": seq, "at": at.isoformat()}
        digest = audit_hash(prev, row)
        rows.append((seq, entry["payment_id"], entry["event_id"], entry["fact"], entry["verdict"],
                     entry["from_state"], entry["to_state"], entry["detail"], at, prev, digest))
        prev = digest
    async with conn.cursor() as cur:
        await cur.executemany("INSERT INTO audit_log (seq, payment_id, event_id, fact, verdict, from_state, to_state,"
                              " detail, at, prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)


async def verify_audit(conn: AsyncConnection) -> tuple[int, str | None]:
    """Recomputes the chain; returns (rows checked, the first problem or None)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT seq, payment_id, event_id::text, fact, verdict, from_state, to_state, detail, at,"
                      " prev_hash, hash FROM audit_log ORDER BY seq")
    prev, expected_seq, count = GENESIS, 1, 0
    async for row in cur:
        count += 1
        if row["seq"] != expected_seq:
            return count, f"row {expected_seq} is missing (found {row['seq']})"
        if row["prev_hash"] != prev:
            return count, f"row {row['seq']}: prev_hash does not match row {row['seq'] - 1}"
        entry = {k: row[k] for k in ("payment_id", "event_id", "fact", "verdict", "from_state", "to_state", "detail")}
        entry.update(seq=row["seq"], at=row["at"].astimezone(timezone.utc).isoformat())
        if audit_hash(prev, entry) != row["hash"]:
            return count, f"row {row['seq']}: content does not match its hash (edited)"
        prev, expected_seq = row["hash"], expected_seq + 1
    return count, None
