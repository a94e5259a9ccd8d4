"""The notifier's consumer adapter: a batch of status events in, one delivery row per (event,
subscribed endpoint) in one transaction, then handed to the dispatcher.

The consumer loop commits the batch's offsets only after this returns, so the rows are in
PostgreSQL before Kafka forgets the events (at least once); a redelivered event inserts nothing new
(the unique (event_id, endpoint_id)). Batches must be handled one after the other (the loop's
max_in_flight=1): two batches in parallel could commit a payment's Settled before its Pending.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import psycopg

from services.common.kafka import ConsumedEvent, EventRejected, Rejection, Transient
from services.common.text import untrusted
from services.notifier import metrics
from services.notifier.deliveries import Endpoint, NewDelivery, StatusChange, deliveries_of, status_change_of
from services.notifier.dispatcher import Dispatcher
from services.notifier.store import NotifierStore

log = logging.getLogger(__name__)


class EndpointCache:
    """Each channel's enabled endpoints, read again after `ttl_s`: a new, disabled or deleted
    endpoint counts for the events consumed from then on."""

    def __init__(self, store: NotifierStore, ttl_s: float):
        self.store = store
        self.ttl_s = ttl_s
        self._by_channel: dict[str, tuple[float, list[Endpoint]]] = {}

    async def of(self, channel_ids: Sequence[str]) -> dict[str, list[Endpoint]]:
        now = time.monotonic()
        stale = [c for c in set(channel_ids) if now - self._by_channel.get(c, (-1e18, []))[0] > self.ttl_s]
        if stale:
            for channel_id, endpoints in (await self.store.endpoints_of(stale)).items():
                self._by_channel[channel_id] = (now, endpoints)
        if len(self._by_channel) > 10_000:  # many channels come and go: forget the stale ones
            self._by_channel = {c: v for c, v in self._by_channel.items() if now - v[0] <= self.ttl_s}
        return {c: self._by_channel[c][1] for c in channel_ids}


class Enqueuer:
    def __init__(self, store: NotifierStore, endpoints: EndpointCache, dispatcher: Dispatcher, lease_s: float):
        self.store = store
        self.endpoints = endpoints
        self.dispatcher = dispatcher
        self.lease_s = lease_s

    async def handle_batch(self, events: list[ConsumedEvent]) -> list[Rejection]:
        rejections: list[Rejection] = []
        changes: list[StatusChange] = []
        for e in events:
            try:
                change = status_change_of(e.schema, e.value)
            except EventRejected as exc:
                rejections.append(Rejection(e, exc))
                continue
            if change is not None:
                changes.append(change)
        try:
            await self._enqueue(changes)
        except psycopg.OperationalError as exc:  # PostgreSQL down or restarting: no event's fault
            raise Transient(f"database unavailable: {type(exc).__name__}: {untrusted(str(exc))}") from exc
        return rejections

    async def _enqueue(self, changes: list[StatusChange]) -> None:
        if not changes:
            return
        endpoints = await self.endpoints.of([c.channel_id for c in changes])
        new: list[NewDelivery] = []
        for change in changes:
            new.extend(deliveries_of(change, endpoints[change.channel_id]))
        enqueued = await self.store.enqueue(new, self.lease_s)
        metrics.ENQUEUED.inc(len(enqueued))
        by_id = {e.endpoint_id: e for found in endpoints.values() for e in found}
        self.dispatcher.accept(((e.delivery, e.earlier_ids) for e in enqueued), by_id)
