"""The in-memory dispatcher: attempts the deliveries this process holds, per endpoint and in order.

- Per endpoint a lane with at most `concurrency` attempts in flight: a slow or failing endpoint fills
  its own lane and no other (no head-of-line blocking across endpoints or channels).
- Per (endpoint, payment) a chain ordered by (occurred_at, id): only its head is attempted, so a
  `Settled` never overtakes its `Pending`. A delivered or parked head lets the next one go at once;
  a head to be retried is written back with its next attempt time and the whole chain is released
  to PostgreSQL, where the poller takes it up again in the same order.
- At most `queue_max` deliveries per endpoint are held; the rest wait in PostgreSQL (a receiver
  down for days must not fill the memory).

Results go to a sink (services/notifier/writer.py) that writes them in batches.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol

from services.common.text import untrusted
from services.notifier import metrics
from services.notifier.deliveries import Delivery, Endpoint
from services.notifier.schedule import AttemptResult, Outcome, RetryPolicy, decide
from services.notifier.store import AttemptRecord, Finished

log = logging.getLogger(__name__)

# A delivery whose signing secret cannot be opened waits this long before it is tried again; it is
# not an attempt (nothing was sent), so it never uses up the retry window's attempts or parks.
SECRET_RETRY_AFTER = timedelta(seconds=30)


class SecretsUnavailable(Exception):
    """The endpoint's signing secrets cannot be had now; the message names no secret."""


class Sender(Protocol):
    async def send(self, url: str, webhook_id: str, body: str, secrets: Sequence[str]) -> AttemptResult: ...
    async def close(self) -> None: ...


class SigningSecrets(Protocol):
    async def for_endpoint(self, endpoint: Endpoint) -> list[str]: ...


class ResultSink(Protocol):
    def finished(self, result: Finished, endpoint_id: str, succeeded: bool | None) -> None: ...
    def released(self, delivery_ids: Iterable[int]) -> None: ...
    def finishing(self, delivery_id: int) -> bool: ...


Decide = Callable[[AttemptResult, int, datetime, datetime, RetryPolicy], tuple[Outcome, datetime | None]]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Lane:
    """One endpoint's deliveries in memory: chains by payment id, those whose head may go next."""
    endpoint: Endpoint
    chains: dict[str, list[Delivery]] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)           # payments whose head is in flight
    ready: collections.deque[str] = field(default_factory=collections.deque)
    queued: set[str] = field(default_factory=set)         # what `ready` holds
    in_flight: int = 0
    held: int = 0

    def add(self, delivery: Delivery) -> None:
        chain = self.chains.setdefault(delivery.payment_id, [])
        # A late older event goes before the chain's waiting ones; the head in flight stays first.
        start = 1 if delivery.payment_id in self.busy else 0
        bisect.insort(chain, delivery, lo=min(start, len(chain)), key=lambda d: d.order)
        self.held += 1
        self.mark_ready(delivery.payment_id)

    def mark_ready(self, payment_id: str) -> None:
        if payment_id not in self.busy and payment_id not in self.queued and self.chains.get(payment_id):
            self.ready.append(payment_id)
            self.queued.add(payment_id)

    def drop_chain(self, payment_id: str) -> list[Delivery]:
        chain = self.chains.pop(payment_id, [])
        self.held -= len(chain)
        return chain


class Dispatcher:
    def __init__(self, sender: Sender, secrets: SigningSecrets, sink: ResultSink, policy: RetryPolicy, *,
                 concurrency: int, queue_max: int, clock: Callable[[], datetime] = utc_now,
                 decide: Decide = decide):
        self.sender = sender
        self.secrets = secrets
        self.sink = sink
        self.policy = policy
        self.concurrency = concurrency
        self.queue_max = queue_max
        self.clock = clock
        self.decide = decide
        self._lanes: dict[str, Lane] = {}
        self._held: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False

    # What the consumer and the poller ask.

    def held_ids(self) -> list[int]:
        return list(self._held)

    def holds(self, delivery_id: int) -> bool:
        return delivery_id in self._held

    def endpoint_ids(self) -> list[str]:
        return list(self._lanes)

    def full_endpoints(self) -> list[str]:
        return [endpoint_id for endpoint_id, lane in self._lanes.items() if lane.held >= self.queue_max]

    def accept(self, deliveries: Iterable[tuple[Delivery, Sequence[int]]], endpoints: Mapping[str, Endpoint],
               claimed: bool = False) -> list[int]:
        """Takes deliveries leased to this process, each with the pending deliveries of its (endpoint,
        payment) that came before it in PostgreSQL; returns the ids it did not take, whose leases it
        releases for the poller. One is not taken when an earlier one is neither held here nor
        just finished here (another process or the retry schedule has it: it must go first), when an
        earlier one of its chain was not taken, when its endpoint's lane is full, or when its endpoint
        is not enabled. `claimed`: the poller's claim, which leaves out full lanes but may take a
        little more than one has room for; all of it is kept (at most `queue_max` plus one claim),
        since handing the surplus back at every poll would rewrite the same rows twice a second."""
        released: list[int] = []
        refused_chains: set[tuple[str, str]] = set()
        touched: set[str] = set()
        for delivery, earlier in sorted(deliveries, key=lambda d: d[0].order):
            if delivery.id in self._held:  # already here (claimed again after a lease was renewed late)
                continue
            chain = (delivery.endpoint_id, delivery.payment_id)
            endpoint = endpoints.get(delivery.endpoint_id)
            lane = self._lane(endpoint) if endpoint is not None and endpoint.enabled else None
            if (lane is None or self._draining or chain in refused_chains
                    or (lane.held >= self.queue_max and not claimed)
                    or not all(self.holds(i) or self.sink.finishing(i) for i in earlier)):
                refused_chains.add(chain)
                released.append(delivery.id)
                continue
            lane.add(delivery)
            self._held.add(delivery.id)
            touched.add(delivery.endpoint_id)
        for endpoint_id in touched:
            self._pump(self._lanes[endpoint_id])
        self._forget_empty_lanes()
        if released:
            metrics.RELEASED.inc(len(released))
            self.sink.released(released)
        return released

    def update_endpoints(self, endpoints: Mapping[str, Endpoint]) -> None:
        """Fresh endpoint rows (the poller reads them): a URL may have changed, and the lanes of an
        endpoint disabled or deleted (absent) are released; its deliveries wait in PostgreSQL."""
        for endpoint_id, lane in list(self._lanes.items()):
            fresh = endpoints.get(endpoint_id)
            lane.endpoint = fresh if fresh is not None else Endpoint(endpoint_id, lane.endpoint.channel_id,
                                                                      lane.endpoint.url, frozenset(), enabled=False)
            self._pump(lane)
        self._forget_empty_lanes()

    def forget(self, delivery_ids: Iterable[int]) -> None:
        """Deliveries whose lease this process lost (it could not renew it in time, another process
        took them over): their chains leave memory; an attempt in flight finishes, unrecorded."""
        lost = set(delivery_ids) & self._held
        for lane in self._lanes.values():
            for payment_id in [p for p, chain in lane.chains.items() if any(d.id in lost for d in chain)]:
                if payment_id in lane.busy:
                    continue
                chain = lane.drop_chain(payment_id)
                self._held.difference_update(d.id for d in chain)
                self.sink.released(d.id for d in chain if d.id not in lost)
        self._forget_empty_lanes()

    async def drain(self, timeout_s: float) -> None:
        """At a stop: lets the attempts in flight finish (at most `timeout_s`), then releases every
        delivery still held so that another process need not wait for the leases to expire. No new
        attempt starts meanwhile."""
        self._draining = True
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self.sink.released(list(self._held))
        self._held.clear()
        self._lanes.clear()

    # Attempts.

    def _lane(self, endpoint: Endpoint) -> Lane:
        lane = self._lanes.get(endpoint.endpoint_id)
        if lane is None:
            lane = self._lanes[endpoint.endpoint_id] = Lane(endpoint)
        return lane

    def _pump(self, lane: Lane) -> None:
        if self._draining:
            return
        if not lane.endpoint.enabled:
            for payment_id in [p for p in lane.chains if p not in lane.busy]:
                self._release_chain(lane, payment_id)
            return
        while lane.in_flight < self.concurrency and lane.ready:
            payment_id = lane.ready.popleft()
            lane.queued.discard(payment_id)
            chain = lane.chains.get(payment_id)
            if not chain or payment_id in lane.busy:
                continue
            lane.busy.add(payment_id)
            lane.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._attempt(lane, payment_id, chain[0]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _attempt(self, lane: Lane, payment_id: str, delivery: Delivery) -> None:
        try:
            outcome = await self._attempted(lane.endpoint, delivery)
            self._settle(lane, payment_id, delivery, outcome)
        finally:
            lane.in_flight -= 1
            lane.busy.discard(payment_id)
            lane.mark_ready(payment_id)
            self._pump(lane)
            if not lane.chains and lane.in_flight == 0 and self._lanes.get(lane.endpoint.endpoint_id) is lane:
                del self._lanes[lane.endpoint.endpoint_id]

    async def _attempted(self, endpoint: Endpoint, delivery: Delivery) -> Outcome:
        try:
            secrets = await self.secrets.for_endpoint(endpoint)
        except Exception as exc:  # SecretsUnavailable, or PostgreSQL down while reading them
            if isinstance(exc, SecretsUnavailable):
                reason = str(exc)
            else:
                reason = f"signing secrets unreadable: {type(exc).__name__}"
                log.warning("webhook endpoint %s: %s", endpoint.endpoint_id, reason)
            at = self.clock()
            self.sink.finished(Finished(delivery.id, "pending", delivery.attempts, at + SECRET_RETRY_AFTER, at, None,
                                        reason, None), endpoint.endpoint_id, None)
            return Outcome.RETRY
        try:
            result = await self.sender.send(endpoint.url, delivery.webhook_id, delivery.body, secrets)
        except Exception as exc:  # the sender promises not to raise; a bug must not hold the chain for ever
            log.error("the sender raised %s for delivery %d", type(exc).__name__, delivery.id)
            result = AttemptResult(None, 0.0, f"unexpected error in the sender: {type(exc).__name__}", None)
        at = self.clock()
        attempts = delivery.attempts + 1
        outcome, next_at = self.decide(result, attempts, delivery.created_at, at, self.policy)
        metrics.DELIVERIES.labels(outcome.value, endpoint.endpoint_id).inc()
        metrics.ATTEMPT_SECONDS.labels(endpoint.endpoint_id).observe(max(result.latency_ms, 0.0) / 1000)
        error = untrusted(result.error, 500) if result.error is not None else None
        state = "pending" if outcome is Outcome.RETRY else outcome.value
        self.sink.finished(
            Finished(delivery.id, state, attempts, next_at, at, result.http_status, error,
                     AttemptRecord(delivery.id, at, result.http_status, result.latency_ms, error, outcome.value)),
            endpoint.endpoint_id, outcome is Outcome.DELIVERED)
        return outcome

    def _settle(self, lane: Lane, payment_id: str, delivery: Delivery, outcome: Outcome) -> None:
        chain = lane.chains.get(payment_id)
        if not chain or chain[0].id != delivery.id:  # forgotten meanwhile (lease lost)
            return
        if outcome is Outcome.RETRY:
            # The head waits for its next attempt in PostgreSQL; its followers must wait behind it
            # there too (the poller claims only a chain's earliest pending delivery).
            lane.drop_chain(payment_id)
            self._held.difference_update(d.id for d in chain)
            self.sink.released(d.id for d in chain[1:])
            return
        chain.pop(0)
        lane.held -= 1
        self._held.discard(delivery.id)
        if not chain:
            del lane.chains[payment_id]

    def _release_chain(self, lane: Lane, payment_id: str) -> None:
        chain = lane.drop_chain(payment_id)
        self._held.difference_update(d.id for d in chain)
        self.sink.released(d.id for d in chain)
        metrics.RELEASED.inc(len(chain))

    def _forget_empty_lanes(self) -> None:
        for endpoint_id in [e for e, lane in self._lanes.items() if not lane.chains and lane.in_flight == 0]:
            del self._lanes[endpoint_id]
