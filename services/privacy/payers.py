"""A payer's own requests (README.md, "Payers' data: access and erasure"): what we hold about one
payer (subject access, `export`) and the erasure of it (`erase`), across every channel or one.

A payer is found by their number in any form the ingress accepts: payments still holding it, and
payments the retention already pseudonymised (their phone is Pseudonyms.phone(number)). Erasure
replaces the number by a random pseudonym that nothing can lead back to (so a second erasure finds
nothing), drops the raw callbacks and parked facts, and masks the number in the webhook bodies sent
about those payments. The money record stays: state, amount, receipt, times, history and the audit
trail (which hold no payer data by construction); the CheckoutRequestID becomes its keyed pseudonym.

Both requests are recorded in payer_requests naming the payer by Pseudonyms.phone, never the number.
Kafka topics that carry raw payers' data are not rewritten: each answer says until when this
payer's messages may remain on each (the payer's latest payment plus the topic's retention.ms).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.common.payment import mask_phones_in, normalise_phone, validate_channel_id
from services.common.pseudonyms import Pseudonyms
from services.common.topic_config import UPSTREAM, configs_for
from services.common.topics import CALLBACK_RAW, CALLBACK_REJECTED, DEAD_LETTER, PAYMENT_REQUESTED
from services.operations.model import OPERATOR, OPERATOR_MAX, Errors, reason_problem
from services.privacy.scrub import random_phone_pseudonym, scrub_payments

ERASED = "erased"
# Payments whose outcome is not settled yet keep the payer's data: the ledger compares a callback's
# number and CheckoutRequestID with them, and the review desk may still query Daraja under the id.
OPEN_STATES = frozenset({"Requested", "Pending", "Review"})
CHUNK = 500  # payments per erasure transaction: the ledger's locks on them are held that long
# Topics that carry payers' numbers in clear (schemas/README.md), what each holds about a payer.
RAW_PII_TOPICS = [
    (PAYMENT_REQUESTED.name, "the payment requests, with the payer's number"),
    (UPSTREAM, "the upstream producers' payment requests, with the payer's number"),
    (CALLBACK_RAW.name, "Daraja's callbacks as received, with the payer's number"),
    (CALLBACK_REJECTED.name, "callbacks the ingress refused, as received"),
    (DEAD_LETTER.name, "messages no service could process, as received"),
]
KAFKA_STATEMENT = ("These Kafka topics are not rewritten: this payer's messages on them are deleted by the broker "
                   "when their retention ends (until the time given per topic at the latest). No service of ours "
                   "reads them again: every consumer's committed offsets are past them.")
_FIELDS = {"export": ("phone", "channel", "operator", "reason"),
           "erase": ("phone", "channel", "operator", "reason")}


@dataclass(frozen=True)
class PayerRequest:
    kind: str  # export | erase
    phone: str  # normalised: 254XXXXXXXXX
    channel_id: str | None
    operator: str
    reason: str | None


def parse_request(kind: str, body: Any) -> tuple[PayerRequest | None, Errors]:
    """POST /admin/payers/{export,erase}: {"phone", "channel"?, "operator", "reason" (erase: required)}.
    No error quotes the number back: it may be a payer's number typed almost right."""
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors: Errors = {}
    for name in sorted(str(n) for n in set(body) - set(_FIELDS[kind]))[:5]:
        errors[name[:64]] = "is not a field of this request"
    raw_phone, channel = body.get("phone"), body.get("channel")
    phone = normalise_phone(raw_phone) if isinstance(raw_phone, str) else None
    if phone is None:
        errors["phone"] = "is required: a Kenyan mobile number (07…, 01…, 2547…, +2547…)"
    if channel is not None and (not isinstance(channel, str) or validate_channel_id(channel) is not None):
        errors["channel"] = "is not a channel id"
    operator, reason = body.get("operator"), body.get("reason")
    if not isinstance(operator, str) or not OPERATOR.fullmatch(operator):
        errors["operator"] = (f"is required: who you are, 1-{OPERATOR_MAX} letters, digits or . _ @ + - "
                              "(starting with a letter or digit)")
    if kind == "erase" or reason is not None:
        if (problem := reason_problem(reason)) is not None:
            errors["reason"] = problem
    if errors:
        return None, errors
    assert phone is not None and isinstance(operator, str)
    return PayerRequest(kind, phone, channel, operator, reason.strip() if isinstance(reason, str) else None), {}


def number_forms(phone: str) -> list[str]:
    """The forms a payer's number is written in: 2547XXXXXXXX, 07XXXXXXXX and the 9-digit tail."""
    return [phone, "0" + phone[3:], phone[3:]]


def kafka_windows(latest: datetime | None, overrides: Mapping[str, Mapping[str, str]],
                  replication_factor: int | None = None) -> list[dict[str, Any]]:
    """Per raw-PII topic: until when this payer's messages may still be on it (None: no payment found)."""
    windows = []
    for topic, holds in RAW_PII_TOPICS:
        retention_ms = int(configs_for(topic, replication_factor, overrides).get("retention.ms", "-1"))
        if latest is None:
            until = None
        elif retention_ms < 0:
            until = "never deleted by the broker (retention.ms is -1)"
        else:
            until = (latest + timedelta(milliseconds=retention_ms)).isoformat()
        windows.append({"topic": topic, "holds": holds, "retentionMs": retention_ms, "mayHoldUntil": until})
    return windows


def mask_number(text: str, forms: Sequence[str]) -> str:
    """`text` with every number masked (mask_phones_in), and the given forms of one number wherever they are."""
    text = mask_phones_in(text)
    for form in forms:  # a number in a form mask_phones_in leaves (inside a longer run of digits)
        text = text.replace(form, "*" * len(form))
    return text


class Payers:
    def __init__(self, pool: AsyncConnectionPool, pseudonyms: Pseudonyms,
                 topic_overrides: Mapping[str, Mapping[str, str]] | None = None,
                 replication_factor: int | None = None):
        self._pool = pool
        self._pseudonyms = pseudonyms
        self._topic_overrides = topic_overrides or {}
        self._replication_factor = replication_factor

    async def export(self, request: PayerRequest, actor: str) -> dict[str, Any]:
        pseudonym = self._pseudonyms.phone(request.phone)
        async with self._pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "SELECT payment_id, channel_id, state, amount, phone, account_reference, description, order_reference,"
                " metadata, merchant_request_id, checkout_request_id, mpesa_receipt, transaction_time, result_code,"
                " result_desc, requested_at, updated_at FROM payments WHERE phone = ANY(%s)"
                " AND (%s::text IS NULL OR channel_id = %s) ORDER BY requested_at, payment_id",
                ([request.phone, pseudonym], request.channel_id, request.channel_id))
            payments = await cur.fetchall()
            ids = [p["payment_id"] for p in payments]
            await cur.execute("SELECT payment_id, received_at, verdict, body FROM callback_bodies"
                              " WHERE payment_id = ANY(%s) ORDER BY received_at, event_id", (ids,))
            callbacks = await cur.fetchall()
            await cur.execute("SELECT payment_id, endpoint_id, event_type, occurred_at, state, body"
                              " FROM webhook_deliveries WHERE payment_id = ANY(%s) ORDER BY id", (ids,))
            webhooks = await cur.fetchall()
            orphans = [] if request.channel_id else await _orphan_parked_facts(conn, number_forms(request.phone))
            parked_ids = ids + orphans
            await cur.execute("SELECT payment_id, topic, parked_at FROM parked_facts WHERE payment_id = ANY(%s)"
                              " ORDER BY parked_at, event_id", (parked_ids,))
            parked = await cur.fetchall()
            request_id = await _record(conn, request, pseudonym, actor, len(payments))
        latest = max((p["updated_at"] for p in payments), default=None)
        return {"requestId": request_id, "kind": "export", "payer": pseudonym, "channel": request.channel_id,
                "payments": [_json(p) for p in payments], "callbacks": [_json(c) for c in callbacks],
                "webhookDeliveries": [_json(w) for w in webhooks],
                # Callbacks waiting for their payment (a Daraja body with the number, held as received).
                "parkedFacts": [_json(f) for f in parked],
                "kafka": kafka_windows(latest, self._topic_overrides, self._replication_factor),
                "kafkaStatement": KAFKA_STATEMENT,
                "kept": "payments erased earlier keep their money record only and are no longer linked to this "
                        "number, so they are not listed"}

    async def erase(self, request: PayerRequest, actor: str) -> dict[str, Any]:
        pseudonym = self._pseudonyms.phone(request.phone)
        forms = number_forms(request.phone)
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT payment_id, state, updated_at FROM payments WHERE phone = ANY(%s)"
                " AND (%s::text IS NULL OR channel_id = %s) ORDER BY payment_id",
                ([request.phone, pseudonym], request.channel_id, request.channel_id))).fetchall()
            # An open payment still needs the number: the ledger checks its callback's number against
            # it (phone_check). It is erased by a request made once it is final.
            still_open = [payment_id for payment_id, state, _ in rows if state in OPEN_STATES]
            ids = [payment_id for payment_id, state, _ in rows if state not in OPEN_STATES]
            orphans = [] if request.channel_id else await _orphan_parked_facts(conn, forms)
            totals = {"payments": 0, "callbacks": 0, "parkedFacts": 0, "webhookBodies": 0}
            request_id = None
            for start in range(0, max(len(ids), 1), CHUNK):
                chunk = ids[start:start + CHUNK]
                async with conn.transaction():
                    if request_id is None:  # with the first chunk: no erasure without its record
                        request_id = await _record(conn, request, pseudonym, actor, len(rows))
                    if start == 0 and orphans:  # facts waiting for a payment that never came: no row to scrub
                        totals["parkedFacts"] += (await conn.execute(
                            "DELETE FROM parked_facts WHERE payment_id = ANY(%s)", (orphans,))).rowcount
                    if not chunk:
                        break
                    # A random pseudonym, not the keyed one: an erased payment leads back to no one, even with the key.
                    report = await scrub_payments(conn, chunk, replace_phone=random_phone_pseudonym, outcome=ERASED,
                                                  replace_checkout=self._pseudonyms.checkout)
                    totals["webhookBodies"] += await _mask_webhook_bodies(conn, chunk, forms)
                    await _follow_in_idempotency_records(conn, chunk)
                totals["payments"] += report.payments
                totals["callbacks"] += report.callback_bodies
                totals["parkedFacts"] += report.parked_facts
        latest = max((updated_at for _, _, updated_at in rows), default=None)
        return {"requestId": request_id, "kind": "erase", "payer": pseudonym, "channel": request.channel_id,
                "erased": totals, "stillOpen": len(still_open), "message": _erase_message(totals, len(still_open)),
                "kafka": kafka_windows(latest, self._topic_overrides, self._replication_factor),
                "kafkaStatement": KAFKA_STATEMENT}


def _erase_message(totals: Mapping[str, int], still_open: int) -> str:
    if not totals["payments"] and not totals["parkedFacts"] and not still_open:
        return "nothing to erase: no payment holds this number (already erased, or never paid)"
    message = (f"erased the payer's data on {totals['payments']} payment(s); their money records (state, amount, "
               "receipt, times, history, audit trail) are kept")
    if still_open:
        message += (f"; {still_open} payment(s) still open (Requested, Pending or in Review) keep the number "
                    "until final: erase again then")
    return message


async def _orphan_parked_facts(conn, forms: Sequence[str]) -> list[str]:
    """Payments whose facts (a callback with the number) wait for a request that has not come: found by
    the number inside the parked payload, since no payment row links them to the payer yet."""
    rows = await (await conn.execute(
        "SELECT DISTINCT payment_id FROM parked_facts f WHERE NOT EXISTS"
        " (SELECT FROM payments p WHERE p.payment_id = f.payment_id)"
        " AND EXISTS (SELECT FROM unnest(%s::bytea[]) AS n WHERE position(n IN f.payload) > 0)",
        ([form.encode() for form in forms],))).fetchall()
    return [row[0] for row in rows]


async def _follow_in_idempotency_records(conn, payment_ids: Sequence[str]) -> None:
    """The ingress's idempotency record of each payment keeps its account and order references: they
    take the scrubbed payment's (the retry of a request is recognised by its body's hash, not these)."""
    await conn.execute(
        "UPDATE ingress_requests i SET account_reference = p.account_reference, order_reference = p.order_reference"
        " FROM payments p WHERE p.payment_id = i.payment_id AND i.payment_id = ANY(%s)", (list(payment_ids),))


async def _mask_webhook_bodies(conn, payment_ids: Sequence[str], forms: Sequence[str]) -> int:
    rows = await (await conn.execute("SELECT id, body FROM webhook_deliveries WHERE payment_id = ANY(%s)",
                                     (list(payment_ids),))).fetchall()
    changed = [(masked, row_id) for row_id, body in rows if (masked := mask_number(body, forms)) != body]
    if changed:
        async with conn.cursor() as cur:
            await cur.executemany("UPDATE webhook_deliveries SET body = %s WHERE id = %s", changed)
    return len(changed)


async def _record(conn, request: PayerRequest, pseudonym: str, actor: str, payments: int) -> int:
    row = await (await conn.execute(
        "INSERT INTO payer_requests (kind, payer_pseudonym, channel_id, actor, reason, payments)"
        " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
        (request.kind, pseudonym, request.channel_id, actor,
         None if request.reason is None else mask_phones_in(request.reason), payments))).fetchone()
    return row[0]


def _json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {_camel(k): v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)

