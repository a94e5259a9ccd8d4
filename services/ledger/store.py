"""The ledger's SQL, one function per statement group; callers own the transaction."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timezone
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.ledger.record import CHECKOUT_COLUMNS, COLUMNS, RECEIPT_COLUMNS, PaymentRecord, record_of

_AUDIT_LOCK = 7_262_022  # advisory lock: one appender of the hash chain at a time
PAYMENT_LOCKS = 7_262_023  # first key of the per-payment advisory locks (the two-key space is apart);
# every writer of payments takes them first (services/privacy/scrub.py too)
_RECEIPT_LOCKS = 7_262_024  # likewise, per receipt a batch may write
GENESIS = "0" * 64

# Rows are COPYed into a per-connection staging table, then merged in one statement: much cheaper
# per row than parameter arrays or executemany.
_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS payments_stage (LIKE payments INCLUDING DEFAULTS)"
          " ON COMMIT DELETE ROWS")
_CALLBACKS_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS callback_bodies_stage (LIKE callback_bodies)"
                    " ON COMMIT DELETE ROWS")
_MERGE = (f"INSERT INTO payments ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM payments_stage"
          " ON CONFLICT (payment_id) DO UPDATE SET "
          + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[2:] if c not in ("amount", "phone", "requested_at"))
          + ", updated_at = now()")


@dataclass
class BatchStart:
    fresh_events: set[str]  # ids of the events not processed before
    payments: dict[str, PaymentRecord]  # the payments that exist, locked
    parked: dict[str, list[tuple[str, str, bytes]]]  # payment_id -> early facts [(event_id, topic, payload)]
    receipts: dict[str, str]  # receipt -> the payment it already proves
    checkouts: dict[str, str]  # CheckoutRequestID -> the payment whose push it is


async def open_batch(conn: AsyncConnection, events: list[tuple[str, str]], payment_ids: list[str],
                     receipts: list[str], checkout_ids: list[str] | None = None) -> BatchStart:
    """What a batch needs before applying anything, in one pipelined round trip.

    events: (event_id, topic). They are recorded as processed here, in the batch's transaction, and
    the ones recorded before are left out: the primary key makes a replay a no-op, never a second
    application. Then the payments are locked, whether they exist yet or not: a row lock cannot
    cover a payment another transaction is inserting, and a fact parked for it then would never be
    applied. Every writer of payments takes these advisory locks first, in one order (so two
    batches cannot deadlock); each statement sees what was committed before the locks were granted.
    The receipts the batch may write are locked after its payments, in one order too: one receipt
    proves one payment, and two batches of other payments (other partitions) writing the same one
    would each read it free before the other commits; only mpesa_receipt has a unique index to
    refuse the second, late_receipt and candidate_receipt have none.
    """
    ids = sorted(set(payment_ids))
    # In one order too: two ledgers holding one event at once (a rebalance) each wait on the other's
    # uncommitted key; in different orders, two such keys would deadlock them.
    events = sorted(events)
    async with conn.pipeline():
        claimed = await conn.execute(
            "INSERT INTO processed_events (event_id, topic) SELECT * FROM unnest(%s::uuid[], %s::text[])"
            " ON CONFLICT DO NOTHING RETURNING event_id::text", ([e for e, _ in events], [t for _, t in events]))
        await conn.execute("SELECT pg_advisory_xact_lock(%s, h) FROM (SELECT DISTINCT hashtext(p) AS h"
                           " FROM unnest(%s::text[]) AS p ORDER BY h) AS locks", (PAYMENT_LOCKS, ids))
        if receipts:
            await _lock_receipts(conn, list(receipts))
        payments = conn.cursor(row_factory=dict_row)
        await payments.execute(f"SELECT {', '.join(COLUMNS)} FROM payments WHERE payment_id = ANY(%s)", (ids,))
        parked = await conn.execute("SELECT payment_id, event_id::text, topic, payload FROM parked_facts"
                                    " WHERE payment_id = ANY(%s) ORDER BY parked_at, event_id", (ids,))
        in_use = await conn.execute(_owners_query(RECEIPT_COLUMNS), (list(receipts),) * len(RECEIPT_COLUMNS))
        pushes = await conn.execute(_owners_query(CHECKOUT_COLUMNS),
                                    (list(checkout_ids or []),) * len(CHECKOUT_COLUMNS))
        await conn.execute(_STAGE)
    early: dict[str, list[tuple[str, str, bytes]]] = {}
    for payment_id, event_id, topic, payload in await parked.fetchall():
        early.setdefault(payment_id, []).append((event_id, topic, bytes(payload)))
    return BatchStart({r[0] for r in await claimed.fetchall()},
                      {r["payment_id"]: record_of(r) for r in await payments.fetchall()},
                      early, dict(await in_use.fetchall()), dict(await pushes.fetchall()))


def _owners_query(columns: tuple[str, ...]) -> str:
    """(value, payment_id) of the payments holding any of the values in any of these columns (each
    column has its own index, so a UNION of index scans)."""
    return " UNION ".join(f"SELECT {c}, payment_id FROM payments WHERE {c} = ANY(%s)" for c in columns)


async def _lock_receipts(conn: AsyncConnection, receipts: list[str]) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(%s, h) FROM (SELECT DISTINCT hashtext(r) AS h"
                       " FROM unnest(%s::text[]) AS r ORDER BY h) AS locks", (_RECEIPT_LOCKS, receipts))


async def owners(conn: AsyncConnection, receipts: list[str], checkout_ids: list[str]
                 ) -> tuple[dict[str, str], dict[str, str]]:
    """Which payments hold these receipts and CheckoutRequestIDs, for facts that were not in the
    batch's first read (facts un-parked from an earlier batch). Their receipts are locked first, as
    open_batch locks the batch's own: a batch of other payments applied beside this one may name
    the same receipt. Taken after the batch's first locks, they may be taken in another order than
    a second batch's; PostgreSQL then aborts one of the two (a deadlock error), which is retried."""
    async with conn.pipeline():
        if receipts:
            await _lock_receipts(conn, receipts)
        in_use = await conn.execute(_owners_query(RECEIPT_COLUMNS), (receipts,) * len(RECEIPT_COLUMNS))
        pushes = await conn.execute(_owners_query(CHECKOUT_COLUMNS), (checkout_ids,) * len(CHECKOUT_COLUMNS))
    return dict(await in_use.fetchall()), dict(await pushes.fetchall())


async def write_payments(conn: AsyncConnection, rows: list[PaymentRecord], unparked: list[str]) -> None:
    """Upserts the batch's changed payments (staged by open_batch's table) and deletes the parked
    facts it applied."""
    if rows:
        await _copy(conn, "payments_stage", ", ".join(COLUMNS),
                    [_row(r) for r in rows])
    async with conn.pipeline():
        if rows:
            await conn.execute(_MERGE)
        if unparked:
            await conn.execute("DELETE FROM parked_facts WHERE event_id = ANY(%s::uuid[])", (unparked,))


def _row(r: PaymentRecord) -> tuple[Any, ...]:
    values = r.__dict__  # read by column name: the COPY's order
    return tuple(Jsonb(values[c]) if c == "metadata" else values[c] for c in COLUMNS)


async def add_history(conn: AsyncConnection, rows: list[tuple[str, str, str | None, str | None, str | None]]) -> None:
    """rows: (payment_id, state, previous, reason, event_id)."""
    await _copy(conn, "payment_history", "payment_id, state, previous, reason, event_id", rows)


async def park(conn: AsyncConnection, rows: list[tuple[str, str, str, bytes]]) -> None:
    """rows: (event_id, payment_id, topic, payload); an event is parked once (it is processed once)."""
    await _copy(conn, "parked_facts", "event_id, payment_id, topic, payload", rows)


async def keep_callbacks(conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
    """rows: (event_id, payment_id, received_at, verdict, body). A callback decided again (parked
    rows are not kept, but a redelivery after its processed-event id was forgotten is decided anew)
    keeps its first row: staged by COPY, then merged ignoring the ids already kept."""
    if not rows:
        return
    await conn.execute(_CALLBACKS_STAGE)
    await _copy(conn, "callback_bodies_stage", "event_id, payment_id, received_at, verdict, body", rows)
    await conn.execute("INSERT INTO callback_bodies SELECT * FROM callback_bodies_stage ON CONFLICT DO NOTHING")


async def _copy(conn: AsyncConnection, table: str, columns: str, rows: list[tuple[Any, ...]]) -> None:
    """COPY costs a fraction of executemany per row: the ledger's hot path appends with it."""
    if rows:
        async with conn.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for row in rows:
                await copy.write_row(row)


async def enqueue(conn: AsyncConnection, rows: list[tuple[str, bytes, bytes]]) -> list[tuple[int, str, bytes, bytes]]:
    """Outbox rows (topic, key, payload), published by the relay once this transaction committed;
    returns them with their ids, in order."""
    if not rows:
        return []
    cur = await conn.execute("INSERT INTO outbox (topic, key, payload) SELECT * FROM unnest(%s::text[], %b::bytea[],"
                             " %b::bytea[]) RETURNING id", ([r[0] for r in rows], [r[1] for r in rows],
                                                            [r[2] for r in rows]))
    return [(row[0], *message) for row, message in zip(await cur.fetchall(), rows, strict=True)]


# --- Audit trail -----------------------------------------------------------------------------

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode  # built once: hot path


def audit_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + _CANONICAL(entry)).encode()).hexdigest()


async def append_audit(conn: AsyncConnection, entries: list[dict[str, Any]]) -> None:
    """entries: dicts of payment_id, event_id, fact, verdict, from_state, to_state, detail, at (when)
    and, for an operator's instruction, actor. The actor is hashed only when there is one, so the
    rows written before the column existed keep their hashes."""
    if not entries:
        return
    async with conn.pipeline():  # the head is read after the lock is granted: it is the latest
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_AUDIT_LOCK,))
        cur = await conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
    last = await cur.fetchone()
    seq, prev = (last[0], last[1]) if last else (0, GENESIS)
    rows = []
    for entry in entries:
        seq += 1
        at = entry["at"].astimezone(timezone.utc)  # the form verify_audit recomputes the hash from
        row = {**entry, "seq": seq, "at": at.isoformat()}
        if row.get("actor") is None:
            row.pop("actor", None)
        digest = audit_hash(prev, row)
        rows.append((seq, entry["payment_id"], entry["event_id"], entry["fact"], entry["verdict"],
                     entry["from_state"], entry["to_state"], entry["detail"], at, row.get("actor"), prev, digest))
        prev = digest
    await _copy(conn, "audit_log", "seq, payment_id, event_id, fact, verdict, from_state, to_state, detail, at,"
                " actor, prev_hash, hash", rows)


async def verify_audit(conn: AsyncConnection, from_seq: int = 1) -> tuple[int, str | None]:
    """Recomputes the chain from row `from_seq` (1: all of it), trusting the row before it;
    returns (rows checked, the first problem or None)."""
    prev = GENESIS
    if from_seq > 1:
        before = await (await conn.execute("SELECT hash FROM audit_log WHERE seq = %s", (from_seq - 1,))).fetchone()
        if before is None:
            return 0, f"row {from_seq - 1} does not exist"
        prev = before[0]
    # A server-side cursor read in slices: the trail grows without bound, the verifier's memory must not.
    async with conn.cursor("verify_audit", row_factory=dict_row) as cur:
        cur.itersize = 5000
        await cur.execute("SELECT seq, payment_id, event_id::text, fact, verdict, from_state, to_state, detail, at,"
                          " actor, prev_hash, hash FROM audit_log WHERE seq >= %s ORDER BY seq", (from_seq,))
        expected_seq, count = from_seq, 0
        async for row in cur:
            count += 1
            if row["seq"] != expected_seq:
                return count, f"row {expected_seq} is missing (found {row['seq']})"
            if row["prev_hash"] != prev:
                return count, f"row {row['seq']}: prev_hash does not match row {row['seq'] - 1}"
            if audit_hash(prev, _audit_entry(row)) != row["hash"]:
                return count, f"row {row['seq']}: content does not match its hash (edited)"
            prev, expected_seq = row["hash"], expected_seq + 1
    return count, None


def _audit_entry(row: dict[str, Any]) -> dict[str, Any]:
    entry = {k: row[k] for k in ("payment_id", "event_id", "fact", "verdict", "from_state", "to_state", "detail")}
    entry.update(seq=row["seq"], at=row["at"].astimezone(timezone.utc).isoformat())
    if row["actor"] is not None:  # hashed only when set: rows from before audit_log.actor verify unchanged
        entry["actor"] = row["actor"]
    return entry
