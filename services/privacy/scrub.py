"""STAND-IN UNTIL P2 MERGES (issue #17): the retention part provides this module; the lead takes its
version. Same signature and contract, only what erasure needs.

Replaces the payer's data on payments, in the caller's transaction: the phone by replace_phone(phone),
the account reference by a placeholder, no description, no metadata, numbers in the order reference
masked; drops their raw callback bodies and parked facts. Never a state, amount, receipt, time,
history or audit entry: the money record stays.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from psycopg import AsyncConnection

from services.common.payment import mask_phones_in
from services.ledger.store import _PAYMENT_LOCKS

ACCOUNT_REFERENCE_PLACEHOLDER = "-"


@dataclass(frozen=True)
class ScrubReport:
    payments: int
    callback_bodies: int
    parked_facts: int


async def scrub_payments(conn: AsyncConnection, payment_ids: Sequence[str], replace_phone: Callable[[str], str],
                         outcome: str) -> ScrubReport:
    ids = sorted(set(payment_ids))
    # The ledger's own locks, in its order: a batch applying a callback to one of these payments
    # either committed before (its body is dropped here) or sees the scrubbed row after.
    await conn.execute("SELECT pg_advisory_xact_lock(%s, h) FROM (SELECT DISTINCT hashtext(p) AS h"
                       " FROM unnest(%s::text[]) AS p ORDER BY h) AS locks", (_PAYMENT_LOCKS, ids))
    rows = await (await conn.execute("SELECT payment_id, phone, order_reference FROM payments"
                                     " WHERE payment_id = ANY(%s)", (ids,))).fetchall()
    for payment_id, phone, order_reference in rows:
        await conn.execute(
            "UPDATE payments SET phone = %s, account_reference = %s, description = NULL, metadata = '{}',"
            " order_reference = %s, payer_data = %s, payer_data_changed_at = now() WHERE payment_id = %s",
            (replace_phone(phone), ACCOUNT_REFERENCE_PLACEHOLDER,
             None if order_reference is None else mask_phones_in(order_reference), outcome, payment_id))
    bodies = await conn.execute("DELETE FROM callback_bodies WHERE payment_id = ANY(%s)", (ids,))
    parked = await conn.execute("DELETE FROM parked_facts WHERE payment_id = ANY(%s)", (ids,))
    return ScrubReport(len(rows), bodies.rowcount, parked.rowcount)
