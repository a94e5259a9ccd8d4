"""Accepting a payment request: claim the idempotency key, publish the event, record it published.

The 202 is given only after Kafka acknowledged the event. The event (its id, time and payment id)
is fixed when the key is claimed, so a retry after a failed publish sends the very same event, and
consumers deduplicate it by event id and payment id.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from prometheus_client import Counter
from psycopg import Error as DatabaseError
from psycopg_pool import PoolTimeout

from services.common.ids import new_id
from services.common.kafka import Publisher, PublishError
from services.common.payment import PaymentRequest
from services.common.text import untrusted
from services.common.topics import PAYMENT_REQUESTED, Topic
from services.ingress.idempotency import Claim, IdempotencyStore, Record

log = logging.getLogger(__name__)

ACCEPTED = Counter("ingress_payments_accepted_total", "Payment requests accepted (202)", ["replayed"])
ACCEPTED_NEW, ACCEPTED_REPLAYED = ACCEPTED.labels("false"), ACCEPTED.labels("true")  # bound once: hot path
CONFLICTS = Counter("ingress_idempotency_conflicts_total", "Idempotency keys reused with a different body")
UNAVAILABLE = Counter("ingress_unavailable_total", "Requests answered 503", ["dependency"])


@dataclass(frozen=True)
class Accepted:
    payment_id: str
    replayed: bool


class IdempotencyConflict(Exception):
    """The key already names a payment with a different body."""


class Unavailable(Exception):
    """Kafka or PostgreSQL did not answer; nothing was accepted, a retry with the same key is safe."""

    def __init__(self, dependency: str):
        super().__init__(dependency)
        self.dependency = dependency


@dataclass
class _Flight:
    digest: bytes
    outcome: asyncio.Future


class PaymentIntake:
    """Turns a valid, authorised request into one published PaymentRequested per idempotency key."""

    def __init__(self, store: IdempotencyStore, producer: Publisher, topic: Topic = PAYMENT_REQUESTED):
        self._store = store
        self._producer = producer
        self._topic = topic
        # Requests of this process now between claim and answer, by (channel, key): a concurrent
        # duplicate waits for the first one's outcome instead of publishing the event a second time.
        self._in_flight: dict[tuple[str, str], _Flight] = {}

    async def close(self) -> None:
        await self._store.close()

    async def submit(self, request: PaymentRequest, idempotency_key: str, api_key_id: str) -> Accepted:
        scope = (request.channel_id, idempotency_key)
        digest = request.digest()
        flight = self._in_flight.get(scope)
        if flight is not None:
            if flight.digest != digest:
                CONFLICTS.inc()
                raise IdempotencyConflict()
            first = await asyncio.shield(flight.outcome)
            ACCEPTED_REPLAYED.inc()
            return Accepted(first.payment_id, replayed=True)
        flight = self._in_flight[scope] = _Flight(digest, asyncio.get_running_loop().create_future())
        try:
            accepted = await self._submit(request, idempotency_key, api_key_id, digest)
        except BaseException as exc:
            flight.outcome.set_exception(exc)
            flight.outcome.exception()  # retrieved: no warning when no duplicate was waiting
            raise
        finally:
            del self._in_flight[scope]
        flight.outcome.set_result(accepted)
        (ACCEPTED_REPLAYED if accepted.replayed else ACCEPTED_NEW).inc()
        return accepted

    async def _submit(self, request: PaymentRequest, idempotency_key: str, api_key_id: str,
                      digest: bytes) -> Accepted:
        payment_id, event_id = new_id(), new_id()
        # Avro carries milliseconds: truncate now so a re-published event is byte-identical.
        now = datetime.now(timezone.utc)
        occurred_at = now.replace(microsecond=now.microsecond // 1000 * 1000)
        claim = Claim(request.channel_id, idempotency_key, digest, payment_id, event_id, occurred_at, api_key_id,
                      request.amount, request.account_reference, request.order_reference)
        try:
            record = await self._store.claim(claim)
        except (DatabaseError, PoolTimeout) as exc:
            log.error("idempotency claim failed: %s", untrusted(str(exc)), extra={"channel_id": request.channel_id})
            UNAVAILABLE.labels("postgresql").inc()
            raise Unavailable("postgresql") from exc
        if record.body_sha256 != digest:
            CONFLICTS.inc()
            raise IdempotencyConflict()
        if record.published:
            return Accepted(record.payment_id, replayed=True)
        # Ours, or an earlier attempt whose publish failed (or is under way in another process):
        # publish the event fixed at the claim. A duplicate on the topic is the same event id.
        await self._publish(request, idempotency_key, record)
        self._store.mark_published(record.payment_id)
        return Accepted(record.payment_id, replayed=not record.claimed)

    async def _publish(self, request: PaymentRequest, idempotency_key: str, record: Record) -> None:
        event = requested_event(request, idempotency_key, record)
        try:
            await self._producer.publish(self._topic, event)
        except PublishError as exc:
            log.error("payment request not acknowledged by Kafka: %s", exc,
                      extra={"channel_id": request.channel_id, "payment_id": record.payment_id})
            UNAVAILABLE.labels("kafka").inc()
            raise Unavailable("kafka") from exc


def requested_event(p: PaymentRequest, idempotency_key: str, record: Record) -> dict:
    return {"event_id": record.event_id, "occurred_at": record.occurred_at, "channel_id": p.channel_id,
            "payment_id": record.payment_id, "schema_version": 1, "amount": p.amount, "phone": p.phone,
            "account_reference": p.account_reference, "description": p.description,
            "order_reference": p.order_reference, "idempotency_key": idempotency_key, "metadata": p.metadata,
            "source": "API"}
