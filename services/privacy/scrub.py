"""Replacing a payer's data on payments, the one way retention and erasure both do it.

A payment's money record stays: state, amount, receipt, times, result codes, history and the audit
trail are never touched (the audit chain holds no payer data: its free texts are masked at write).
What identifies the payer goes: the phone becomes a pseudonym (keyed for retention, so repeat payers
still join; random for erasure, so nothing links back), the CheckoutRequestIDs their keyed pseudonyms
(Daraja's end in the payer's number), the account reference a fixed placeholder, the description and
metadata nothing, numbers quoted in the review reason and the contradiction masked, and the order
reference, the merchant's own id of the order, keeps its value with any phone number inside it masked.
The raw callbacks and parked facts, which repeat the phone, are dropped, and so is the link the
ingress's idempotency record keeps.

It runs in the caller's transaction, after the same per-payment advisory locks the ledger takes: the
ledger writes a payment from what it read after its locks, so it cannot write the payer's data back.
"""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from psycopg import AsyncConnection

from services.common.payment import mask_phones_in
from services.common.pseudonyms import CHECKOUT
from services.ledger.store import PAYMENT_LOCKS

ACCOUNT_REFERENCE_PLACEHOLDER: Final = "removed"  # 1-12 characters, as payment_shape asks
OUTCOMES: Final = ("pseudonymised", "erased")

_LOCK = ("SELECT pg_advisory_xact_lock(%s, h) FROM (SELECT DISTINCT hashtext(p) AS h"
         " FROM unnest(%s::text[]) AS p ORDER BY h) AS locks")
_PAYMENTS = ("SELECT payment_id, phone, order_reference, checkout_request_id, candidate_checkout_request_id,"
             " review_reason, contradiction FROM payments WHERE payment_id = ANY(%s) ORDER BY payment_id")
_SCRUB = """
UPDATE payments AS p SET phone = s.phone, order_reference = s.order_reference,
    checkout_request_id = s.checkout, candidate_checkout_request_id = s.candidate_checkout,
    review_reason = s.review_reason, contradiction = s.contradiction,
    account_reference = CASE WHEN p.account_reference IS NULL THEN NULL ELSE %s END,
    description = NULL, metadata = '{}', payer_data = %s, payer_data_changed_at = now()
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
    AS s (payment_id, phone, order_reference, checkout, candidate_checkout, review_reason, contradiction)
WHERE p.payment_id = s.payment_id
"""
# The STK worker's record of the push keeps Daraja's CheckoutRequestID too.
_CLAIMS = """
UPDATE stk_push_claims AS c SET checkout_request_id = s.checkout
FROM unnest(%s::text[], %s::text[]) AS s (payment_id, checkout)
WHERE c.payment_id = s.payment_id AND c.checkout_request_id IS NOT NULL
"""
# The ingress's record of the request keeps its idempotency key, so a retry still finds its payment,
# but a SHA-256 of a body whose only unknown is a 12-digit number is reversed by trying them all: it
# becomes the digest of random bytes, which no retry's body matches (a refusal, never a second payment).
_INGRESS = """
UPDATE ingress_requests AS i SET account_reference = %s, order_reference = s.order_reference,
    body_sha256 = s.digest
FROM unnest(%s::text[], %s::text[], %s::bytea[]) AS s (payment_id, order_reference, digest)
WHERE i.payment_id = s.payment_id
"""


@dataclass(frozen=True)
class ScrubReport:
    """Rows changed or deleted, per table."""
    payments: int
    ingress_requests: int
    callback_bodies: int
    parked_facts: int


async def scrub_payments(conn: AsyncConnection, payment_ids: Sequence[str], replace_phone: Callable[[str], str],
                         outcome: str, replace_checkout: Callable[[str], str]) -> ScrubReport:
    """Replaces the payer's data on these payments (those that exist) and drops their raw callbacks.

    replace_phone: from the stored phone (a number, or a pseudonym already) to the pseudonym to store;
    it must give `ph_<32 hex>`. outcome: 'pseudonymised' or 'erased', recorded in payer_data.
    replace_checkout: a CheckoutRequestID to its keyed pseudonym (Pseudonyms.checkout). Daraja's ids
    end in the payer's number, so the id goes too, for the pseudonym: given Safaricom's id of a push,
    its pseudonym (computed with the key) matches the stored one, and nothing leads from the pseudonym
    back. The review desk's search takes the id as it is, so it finds such a payment by receipt.
    Runs in the caller's transaction (an error leaves it to roll back)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}")
    ids = sorted(set(payment_ids))
    if not ids:
        return ScrubReport(0, 0, 0, 0)
    # Two statements: the read below sees what the ledger committed before the locks were granted.
    await lock_payments(conn, ids)
    rows = await (await conn.execute(_PAYMENTS, (ids,))).fetchall()
    found = [r[0] for r in rows]
    phones = [replace_phone(r[1]) for r in rows]
    orders = [None if r[2] is None else mask_phones_in(r[2]) for r in rows]
    checkouts = [_pseudonymised(r[3], replace_checkout) for r in rows]
    candidates = [_pseudonymised(r[4], replace_checkout) for r in rows]
    # The ledger writes these texts masked since this release; rows from before may quote an id in clear.
    reviews = [None if r[5] is None else mask_phones_in(r[5]) for r in rows]
    contradictions = [None if r[6] is None else mask_phones_in(r[6]) for r in rows]
    payments = await conn.execute(_SCRUB, (ACCOUNT_REFERENCE_PLACEHOLDER, outcome, found, phones, orders, checkouts,
                                           candidates, reviews, contradictions))
    await conn.execute(_CLAIMS, (found, checkouts))
    digests = [hashlib.sha256(secrets.token_bytes(32)).digest() for _ in found]
    ingress = await conn.execute(_INGRESS, (ACCOUNT_REFERENCE_PLACEHOLDER, found, orders, digests))
    bodies = await conn.execute("DELETE FROM callback_bodies WHERE payment_id = ANY(%s)", (found,))
    parked = await conn.execute("DELETE FROM parked_facts WHERE payment_id = ANY(%s)", (found,))
    return ScrubReport(payments.rowcount, ingress.rowcount, bodies.rowcount, parked.rowcount)


def _pseudonymised(checkout_request_id: str | None, replace: Callable[[str], str]) -> str | None:
    if checkout_request_id is None or checkout_request_id.startswith(f"{CHECKOUT}_"):  # done already
        return checkout_request_id
    return replace(checkout_request_id)


async def lock_payments(conn: AsyncConnection, payment_ids: Sequence[str]) -> None:
    """The ledger's per-payment advisory locks (services/ledger/store.py open_batch), same keys and
    order, until the caller's transaction ends; taking one again in that transaction is free."""
    await conn.execute(_LOCK, (PAYMENT_LOCKS, sorted(set(payment_ids))))


def random_phone_pseudonym(_: str) -> str:
    """An erasure's replacement: the pseudonym's shape, with nothing that links it to the payer."""
    return f"ph_{secrets.token_hex(16)}"
