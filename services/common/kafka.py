"""Kafka plumbing: an acknowledged producer, topic creation, and a consumer loop that commits
only what was fully handled and dead-letters what it cannot read or handle.

confluent-kafka is used directly (its asyncio producer is experimental: docs/design.md, "Kafka client"); this
module is the project's one small interface to it.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client import Counter, Gauge, Histogram

from services.common.avro import Codec, DecodeError
from services.common.config import ConfigError, client_variable, kafka_client_config
from services.common.ids import new_id
from services.common.schema_registry import RegistryUnavailable
from services.common.text import untrusted
from services.common.topics import DEAD_LETTER, Topic

log = logging.getLogger(__name__)

EVENTS_OUT = Counter("pipeline_events_published_total", "Events acknowledged by Kafka", ["topic"])
PUBLISH_FAILURES = Counter("pipeline_publish_failures_total", "Events Kafka did not acknowledge", ["topic"])
EVENTS_IN = Counter("pipeline_events_consumed_total", "Events handled by a consumer", ["topic", "result"])
HANDLE_SECONDS = Histogram("pipeline_batch_handle_seconds", "Time to handle one consumed batch", ["group"])
CONSUMER_LAG = Gauge("pipeline_consumer_lag", "Messages behind the end of the partition", ["topic", "partition"])
UNEXPECTED_ERRORS = Counter(
    "pipeline_unexpected_errors_total", "Events dead-lettered because an unexpected error (most likely a bug) "
    "outlived the poison budget: alert on any increase (docs/errors.md)", ["group", "error_type"])
REVOKE_TIMEOUTS = Counter(
    "pipeline_revoke_timeouts_total", "Rebalances that gave partitions up before the batches in hand for them "
    "finished (their new owner handles those events again)", ["group"])


class PublishError(Exception):
    """Kafka did not acknowledge the event (broker down, timeout, authorisation...)."""


def new_event_fields(channel_id: str, payment_id: str | None = None) -> dict[str, Any]:
    """The fields every event carries (docs/design.md: event_id, occurred_at, channel_id, payment_id)."""
    fields = {"event_id": new_id(), "occurred_at": datetime.now(timezone.utc),
              "channel_id": channel_id, "schema_version": 1}
    if payment_id is not None:
        fields["payment_id"] = payment_id
    return fields


def client_config(own: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """A client's own settings plus the ones every client of the process shares (TLS, SASL login...,
    from KAFKA_CLIENT_* variables: config.kafka_client_config). A setting the code decides itself
    (acks, group.id, ...) cannot be overridden from the environment: that is refused, not ignored."""
    shared = kafka_client_config(environ)
    clash = sorted(shared.keys() & own.keys())
    if clash:
        raise ConfigError(f"{client_variable(clash[0])} cannot be set: the service decides {clash[0]} itself")
    return {**shared, **own}


def producer_config(bootstrap: str, client_id: str, delivery_timeout_ms: int, linger_ms: int) -> dict:
    """Idempotent producer with acks=all, set explicitly so no library default decides durability;
    delivery.timeout.ms bounds how long a caller waits before hearing that Kafka did not ack."""
    return client_config({
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        "max.in.flight.requests.per.connection": 5,
        "linger.ms": linger_ms,
        "compression.type": "lz4",
        "delivery.timeout.ms": delivery_timeout_ms,
    })


class Publisher(Protocol):
    async def publish(self, topic: Topic, record: dict[str, Any]) -> None: ...


class EventProducer:
    """Publishes Avro events keyed by channel id; `publish` returns only after the broker acked.

    Delivery reports are served on the event loop, which polls the client while acknowledgements
    are outstanding, rather than by a thread that wakes the loop once per message: no cross-thread
    wake-up and no GIL hand-over per event. On the 2-core development machine this took the CPU per
    event from about 53 to 28 µs with 64 events in flight. The cost is up to one poll interval of
    latency (asyncio's timers have a 1 ms granularity on epoll).
    """

    def __init__(self, bootstrap: str, codec: Codec, *, client_id: str, delivery_timeout_ms: int = 15000,
                 linger_ms: int = 2, poll_interval_s: float = 0.0005):
        self.codec = codec
        self._producer = Producer(producer_config(bootstrap, client_id, delivery_timeout_ms, linger_ms))
        self._poll_interval_s = poll_interval_s
        self._outstanding = 0
        self._polling: asyncio.TimerHandle | None = None
        self._polling_loop: asyncio.AbstractEventLoop | None = None
        self._acknowledged: dict[str, Any] = {}  # topic -> its EVENTS_OUT child, bound once

    async def publish(self, topic: Topic, record: dict[str, Any]) -> None:
        await self.publish_many([(topic, record["channel_id"].encode(), self.codec.encode(topic, record))])

    async def publish_many(self, messages: list[tuple[Topic, bytes | None, bytes]]) -> None:
        """Produces in order (so per-key order is kept) and returns once the broker acknowledged every
        message, or raises PublishError if one was not: one future for the lot."""
        if not messages:
            return
        loop = asyncio.get_running_loop()
        acked = loop.create_future()
        waiting, failed = len(messages), []

        def on_delivery(err: KafkaError | None, msg: Message) -> None:  # runs inside poll(), on the loop
            nonlocal waiting
            self._outstanding -= 1
            waiting -= 1
            if err is not None:
                failed.append((msg.topic(), err))
            if waiting == 0:
                _settle(acked, failed[0][1] if failed else None)

        for topic, key, value in messages:
            while True:
                try:
                    self._producer.produce(topic.name, key=key, value=value, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: serve deliveries to drain it
                    self._producer.poll(0)
                    await asyncio.sleep(0.005)
                except KafkaException as exc:
                    # Refused before it left (an idempotent producer in its fatal state, an unknown
                    # topic): the event is fine, the producer is not. A PublishError is retried, and
                    # the stall shows on /healthz, rather than the event being dead-lettered as a
                    # bug's victim (a payment request whose push was made among them).
                    PUBLISH_FAILURES.labels(topic.name).inc()
                    raise PublishError(f"the producer refused the event: {exc.args[0] if exc.args else exc}") from exc
            self._outstanding += 1
        self._keep_polling(loop)
        try:
            await acked
        finally:
            for topic_name, _ in failed:
                PUBLISH_FAILURES.labels(topic_name).inc()
        for topic, _, _ in messages:
            counter = self._acknowledged.get(topic.name)
            if counter is None:
                counter = self._acknowledged[topic.name] = EVENTS_OUT.labels(topic.name)
            counter.inc()

    def _keep_polling(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._polling is None or self._polling_loop is not loop:  # a test may switch loops
            self._polling_loop = loop
            self._polling = loop.call_later(self._poll_interval_s, self._poll)

    def _poll(self) -> None:
        # A timer callback rather than a task that sleeps: no future and no task step per poll.
        self._producer.poll(0)
        self._polling = None
        if self._outstanding > 0:
            self._keep_polling(asyncio.get_running_loop())

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        if self._polling is not None:
            self._polling.cancel()
            self._polling = None


def _settle(fut: asyncio.Future, err: KafkaError | None) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(PublishError(f"Kafka did not acknowledge the event: {err.str()}"))


def ensure_topics(bootstrap: str, topics: Iterable[Topic], partitions: int, timeout: float = 30.0) -> None:
    """Creates missing topics with the configured partition count; existing ones are left alone."""
    admin = AdminClient(client_config({"bootstrap.servers": bootstrap}))
    existing = admin.list_topics(timeout=timeout).topics
    missing = [NewTopic(t.name, num_partitions=partitions, replication_factor=1)
               for t in topics if t.name not in existing]
    if not missing:
        return
    for _name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def _where(exc: BaseException) -> str:
    """file:line where an exception was raised: enough to find a bug without the traceback's text."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"


def _record_lag(stats_json: str) -> None:
    """librdkafka's statistics carry consumer_lag per partition (-1 when unknown)."""
    for topic, t in json.loads(stats_json).get("topics", {}).items():
        for partition, p in t.get("partitions", {}).items():
            if partition != "-1" and p.get("consumer_lag", -1) >= 0:
                CONSUMER_LAG.labels(topic, partition).set(p["consumer_lag"])


@dataclass
class ConsumedEvent:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    schema: str
    value: dict[str, Any]
    raw: bytes | None = None  # the message's bytes as consumed, for whoever must store the event as is


@dataclass
class Rejection:
    """A consumed event the handler cannot apply, ever; it goes to the dead-letter topic."""
    event: ConsumedEvent
    error: Exception


class Transient(Exception):
    """Infrastructure trouble (a dependency is down): the batch is retried for as long as it takes,
    never dead-lettered, and the stall shows on /healthz (docs/errors.md)."""


class EventRejected(Exception):
    """The event's own fault, declared by the handler that raises it (it names a channel its producer
    may not use, it can never be applied...): the event is dead-lettered at once with this reason."""


BatchHandler = Callable[[list[ConsumedEvent]], Awaitable[list[Rejection]]]


def per_event(handle: Callable[[ConsumedEvent], Awaitable[None]], is_transient: Callable[[Exception], bool]
              ) -> BatchHandler:
    """Adapts a one-event handler to a batch handler (runs the batch concurrently) under the one policy
    of docs/errors.md:
    - `EventRejected` (the event's fault): the event becomes a rejection, dead-lettered at once;
    - `Transient`, or what `is_transient` recognises (a dependency down): the batch raises Transient
      and is retried without end, visible on /healthz;
    - anything else (most likely a bug): the batch raises it, so the loop retries it against its poison
      budget, splits it and dead-letters the event that still fails alone, counted in
      pipeline_unexpected_errors_total.
    An event that succeeded is not handled again when its batch is retried (or split) for another
    event's failure: only the failed ones are."""
    # The events of batches that failed, by identity (the loop retries and splits the same objects;
    # a position need not be unique where events are made up), held until a call covering them returns.
    succeeded: dict[int, ConsumedEvent] = {}

    async def handle_batch(events: list[ConsumedEvent]) -> list[Rejection]:
        todo = [e for e in events if succeeded.get(id(e)) is not e]
        results = await asyncio.gather(*(handle(e) for e in todo), return_exceptions=True)
        failures = [(e, r) for e, r in zip(todo, results, strict=True) if isinstance(r, BaseException)]
        for e, r in zip(todo, results, strict=True):
            if not isinstance(r, BaseException):
                succeeded[id(e)] = e
        _raise_unless_rejections(failures, is_transient)
        for e in events:
            succeeded.pop(id(e), None)
        return [Rejection(e, error) for e, error in failures if isinstance(error, Exception)]

    return handle_batch


def _raise_unless_rejections(failures: list[tuple[ConsumedEvent, BaseException]],
                             is_transient: Callable[[Exception], bool]) -> None:
    """Raises what makes the batch be retried: a transient failure first (it costs no poison budget,
    and the bug, if there is one, still shows once the dependency is back), else an unexpected one."""
    unexpected = None
    for _, error in failures:
        if not isinstance(error, Exception) or isinstance(error, Transient):
            raise error
        if is_transient(error):  # as Transient, or the loop would count it against the poison budget
            raise Transient(f"{type(error).__name__}: {untrusted(str(error))}") from error
        if not isinstance(error, EventRejected) and unexpected is None:
            unexpected = error
    if unexpected is not None:
        raise unexpected


def _finished(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    """A batch's task is done. One that raised was abandoned uncommitted (a stop interrupts a batch
    being retried): its events are handled again by the partition's next owner. Said here in one
    line, rather than by asyncio as an exception never retrieved."""
    tasks.discard(task)
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("a batch was abandoned uncommitted, its events are handled again: %s: %s",
                    type(error).__name__, untrusted(str(error)))


def rewind_points(dropped: list[Message], assigned_again: set[tuple[str, int]]) -> list[TopicPartition]:
    """Where to fetch again a partition whose messages were dropped because it was revoked during
    a fetch and then assigned back to this consumer in the same fetch: its position moved past
    them, and its next batch would commit past them, so they would be skipped for good."""
    earliest: dict[tuple[str, int], int] = {}
    for m in dropped:
        tp = _partition_of(m)
        if tp in assigned_again:
            earliest[tp] = min(earliest.get(tp, cast(int, m.offset())), cast(int, m.offset()))
    return [TopicPartition(topic, partition, offset) for (topic, partition), offset in sorted(earliest.items())]


def _partition_of(message: Message) -> tuple[str, int]:
    """A data message's topic and partition (the client types them optional for its error events)."""
    return cast(str, message.topic()), cast(int, message.partition())


@dataclass
class _PartitionProgress:
    """Offsets handed out in order; the committable position is the first one not yet done."""
    pending: collections.deque[int] = field(default_factory=collections.deque)
    done: set[int] = field(default_factory=set)
    next_commit: int | None = None

    def committable(self, even_if_committed: bool = False) -> int | None:
        """The position to commit if it advanced since the last call (or at all, `even_if_committed`:
        a commit queued in the background may not have reached the broker yet)."""
        advanced = even_if_committed
        while self.pending and self.pending[0] in self.done:
            offset = self.pending.popleft()
            self.done.discard(offset)
            self.next_commit = offset + 1
            advanced = True
        return self.next_commit if advanced else None


class ConsumerLoop:
    """Consumes topics in batches and hands each decoded batch to `handler`.

    Offsets are committed only after the handler returned for every earlier message of the
    partition. Errors follow the one policy of docs/errors.md: undecodable messages and the handler's
    rejections (the event's own fault) go to the dead-letter topic (after its ack) and count as
    handled. When the handler raises, the batch is retried with back-off and nothing is committed
    meanwhile: without end for a Transient error (a dependency is down: nothing is wrong with the
    events), `poison_budget` times in all for any other (unexpected: most likely a bug). A batch that
    used up its budget is split to find the event(s) that make it fail, which are dead-lettered with the
    error and counted in pipeline_unexpected_errors_total; the others are handled as usual, in order
    (see _handled). `stalled_for` says how long the oldest batch in hand has been, for readiness.

    Up to `max_in_flight` batches run at once; with `overlap_from`, a batch smaller than that waits for
    the others (and takes what arrives meanwhile): overlapping helps a consumer that is behind, while
    small batches are faster one after the other.

    Rebalances: partitions revoked from this consumer are given up only once the batches in hand for
    them finished and their offsets are committed, for up to `revoke_timeout_s`: the new owner starts
    after them instead of handling them a second time beside us (for the STK worker, a push in flight
    would otherwise come back to its new owner as an outcome unknown). Partitions *lost* (the session
    expired: another consumer may own them already) are dropped at once, with no wait and no commit.
    """

    def __init__(self, *, bootstrap: str, group_id: str, topics: list[Topic], codec: Codec,
                 handler: BatchHandler, dead_letters: Publisher, max_batch: int = 500,
                 max_in_flight: int = 1, overlap_from: int = 1, poll_timeout: float = 0.2,
                 poison_budget: int = 5, revoke_timeout_s: float = 30.0, extra_config: dict | None = None):
        if poison_budget < 1:
            raise ValueError("poison_budget must be at least 1")
        self.group_id = group_id
        # Five tries take about 1.5 s of back-off: enough for a fault that was not marked Transient
        # but passes (a connection reset mid-query), little next to a partition stalled for good.
        self.poison_budget = poison_budget
        self._in_hand: dict[int, float] = {}  # batch number -> when it was fetched (monotonic)
        self._batches = 0
        self.overlap_from = overlap_from
        self.topics = topics
        self.codec = codec
        self.handler = handler
        self.dead_letters = dead_letters
        self.max_batch = max_batch
        self.poll_timeout = poll_timeout
        self._slots = asyncio.Semaphore(max_in_flight)
        self._progress: dict[tuple[str, int], _PartitionProgress] = {}
        self._lock = threading.Lock()
        self._done_changed = threading.Condition(self._lock)  # a revocation waits on it for batches in hand
        self._running: dict[int, set[tuple[str, int]]] = {}  # batch's id -> its partitions, until it ends
        # Bounded well below max.poll.interval.ms (300 s): a consumer that blocks in a rebalance
        # callback longer is thrown out of the group, and its partitions are lost, not handed over.
        self.revoke_timeout_s = revoke_timeout_s
        # Partitions revoked during the current fetch (written on the consumer thread, read on the
        # loop's after the fetch returned): messages of theirs taken before the revocation are dropped.
        self._revoked_in_fetch: set[tuple[str, int]] = set()
        self._assigned_in_fetch: set[tuple[str, int]] = set()  # likewise, partitions assigned during it
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{group_id}-consumer")
        self._consumer = Consumer(client_config({
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            # A crashed worker's partitions move after 10 s instead of librdkafka's 45 s.
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 1000,
            "statistics.interval.ms": 5000,
            "stats_cb": _record_lag,
            **(extra_config or {}),
        }))
        self.assigned = False

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        await self._in_thread(self._consumer.subscribe, [t.name for t in self.topics],
                              on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        tasks: set[asyncio.Task] = set()
        try:
            while not stop.is_set():
                await self._slots.acquire()
                self._revoked_in_fetch.clear()
                self._assigned_in_fetch.clear()
                batch = [m for m in await self._in_thread(self._fetch) if self._is_data(m)]
                if tasks and batch and len(batch) < self.overlap_from:
                    await asyncio.wait(set(tasks))  # small batches go one after the other...
                    more = await self._in_thread(self._consumer.consume, self.max_batch - len(batch), 0)
                    batch += [m for m in more if self._is_data(m)]  # ...with what came meanwhile
                # Tracked only now, with no consumer call (which may revoke) since the messages of
                # partitions revoked meanwhile were dropped: a revocation waits for every tracked one.
                dropped = [m for m in batch if _partition_of(m) in self._revoked_in_fetch]
                batch = [m for m in batch if _partition_of(m) not in self._revoked_in_fetch]
                for point in rewind_points(dropped, self._assigned_in_fetch):
                    await self._in_thread(self._rewind, point)
                if not batch:
                    self._slots.release()
                    continue
                owners = self._track(batch)
                task = loop.create_task(self._handle(batch, owners, stop))
                tasks.add(task)
                task.add_done_callback(functools.partial(_finished, tasks))
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await self._commit()
            await self._in_thread(self._consumer.close)
            self._thread.shutdown(wait=True)

    def _fetch(self) -> list[Message]:
        """Waits for one message, then takes whatever else is already here: a batch never waits
        to fill up, so latency stays low at low rates and batches grow under load."""
        first = self._consumer.consume(1, self.poll_timeout)
        return first + self._consumer.consume(self.max_batch - 1, 0) if first else first

    def _in_thread(self, fn, *args, **kwargs):
        # Every consumer call happens on one thread: the client is not safe across threads.
        return asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    def _is_data(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error: %s", err.str())
        return False

    def _track(self, messages: list[Message]) -> dict[tuple[str, int], _PartitionProgress]:
        """Hands the messages' offsets out; returns the progress of each partition they belong to, so
        that a batch finishing after its partition was revoked (and perhaps assigned again) marks nothing."""
        owners = {}
        with self._lock:
            for m in messages:
                tp = _partition_of(m)
                progress = owners[tp] = self._progress.setdefault(tp, _PartitionProgress())
                progress.pending.append(cast(int, m.offset()))
            self._running[id(owners)] = set(owners)
        return owners

    def stalled_for(self) -> float:
        """Seconds the oldest batch in hand has been so (0 with none): grows while a batch is retried
        because its handler keeps failing (a dependency down) or while a handler never returns."""
        oldest = min(self._in_hand.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    async def _handle(self, messages: list[Message], owners: dict[tuple[str, int], _PartitionProgress],
                      stop: asyncio.Event) -> None:
        self._batches += 1
        number = self._batches
        self._in_hand[number] = time.monotonic()
        try:
            await self._learn(messages, stop)
            events, undecodable = self._decode_all(messages)
            await asyncio.gather(*(self._dead_letter(msg, error, stop) for msg, error in undecodable))
            await self._handle_with_retry(events, messages, stop)
            self._mark_done(messages, owners)
            self._commit_in_background()
        finally:
            del self._in_hand[number]
            with self._done_changed:  # done, or given up (stopping): a revocation waits no more for it
                del self._running[id(owners)]
                self._done_changed.notify_all()
            self._slots.release()

    async def _learn(self, messages: list[Message], stop: asyncio.Event) -> None:
        """Fetches the writer schemas of registry ids not seen yet, retrying while the registry is
        down: the messages are fine, so they wait rather than being dead-lettered as unreadable."""
        delay = 0.1
        while True:
            try:
                await self.codec.learn(m.value() for m in messages)
                return
            except RegistryUnavailable as exc:
                if stop.is_set():
                    raise
                log.warning("batch of %d waits for the schema registry, retrying in %.1fs: %s", len(messages),
                            delay, exc)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)

    def _decode_all(self, messages: list[Message]) -> tuple[list[ConsumedEvent], list[tuple[Message, Exception]]]:
        events: list[ConsumedEvent] = []
        undecodable: list[tuple[Message, Exception]] = []
        for m in messages:
            try:
                schema, value = self.codec.decode(m.value())
                events.append(ConsumedEvent(*_partition_of(m), cast(int, m.offset()), m.key(), schema, value,
                                            m.value()))
            except DecodeError as exc:
                undecodable.append((m, exc))
        return events, undecodable

    async def _handle_with_retry(self, events: list[ConsumedEvent], messages: list[Message],
                                 stop: asyncio.Event) -> None:
        if not events:
            return
        by_position = {(m.topic(), m.partition(), m.offset()): m for m in messages}
        rejections = await self._handled(events, stop, self.poison_budget)
        await asyncio.gather(*(self._dead_letter(by_position[(r.event.topic, r.event.partition, r.event.offset)],
                                                 r.error, stop) for r in rejections))
        rejected = {(r.event.topic, r.event.partition, r.event.offset) for r in rejections}
        outcomes = collections.Counter(
            (e.topic, "dead_letter" if (e.topic, e.partition, e.offset) in rejected else "ok") for e in events)
        for (topic, result), n in outcomes.items():
            EVENTS_IN.labels(topic, result).inc(n)

    async def _handled(self, events: list[ConsumedEvent], stop: asyncio.Event, attempts: int) -> list[Rejection]:
        """The handler's rejections of `events`, once it returned. A Transient failure is retried until
        it passes, however long that takes: the events are fine, a dependency is not. Any other failure
        is retried until `attempts` were made, then the batch is split in two and the halves are handled
        in turn, so that the order is kept. A half gets one attempt (its batch failed already) and an
        event alone the whole budget again, since dead-lettering is for good: an event still failing
        alone after that is poison and is rejected with its last error, and k of them among n cost
        about 2·budget·k + 2k·log2(n) attempts instead of stopping the partition."""
        outcome = await self._tried(events, stop, attempts)
        if not isinstance(outcome, Exception):
            return outcome
        error = outcome
        if len(events) == 1:
            e = events[0]
            UNEXPECTED_ERRORS.labels(self.group_id, type(error).__name__).inc()
            log.error("%s[%d]@%d failed %d times alone, dead-lettered: %s: %s (raised at %s)", e.topic, e.partition,
                      e.offset, attempts, type(error).__name__, untrusted(str(error)), _where(error))
            return [Rejection(e, error)]
        log.error("batch of %d failed %d times (%s), split to find the event that fails", len(events), attempts,
                  type(error).__name__)
        half = len(events) // 2
        first, second = events[:half], events[half:]
        return (await self._handled(first, stop, self.poison_budget if len(first) == 1 else 1)
                + await self._handled(second, stop, self.poison_budget if len(second) == 1 else 1))

    async def _tried(self, events: list[ConsumedEvent], stop: asyncio.Event, attempts: int
                     ) -> list[Rejection] | Exception:
        """The handler's rejections once it returned, or its last error after `attempts` failures that
        were not Transient (a Transient one is retried for as long as it takes)."""
        failures, delay = 0, 0.1
        while True:
            started = time.perf_counter()
            try:
                rejections = await self.handler(events)
                HANDLE_SECONDS.labels(self.group_id).observe(time.perf_counter() - started)
                return rejections
            except Exception as exc:
                if stop.is_set():
                    raise
                transient = isinstance(exc, Transient)
                if not transient:
                    failures += 1
                if failures >= attempts:
                    return exc
                # The error's text may quote an event: made safe, and no traceback (it repeats the text).
                log.log(logging.WARNING if transient else logging.ERROR,
                        "batch of %d failed (%s), retrying in %.1fs: %s: %s (raised at %s)", len(events),
                        "transient" if transient else f"{failures} of {attempts} tries", delay,
                        type(exc).__name__, untrusted(str(exc)), _where(exc))
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)

    async def _dead_letter(self, msg: Message, error: Exception, stop: asyncio.Event) -> None:
        """Publishes the message with its error to the dead-letter topic, retrying until Kafka acks
        (the message counts as handled only then, so it is never lost between the two topics)."""
        key = msg.key()
        # The key and the error's text may quote what a hostile producer wrote: cleaned and cut before
        # they reach the dead-letter topic or a log line (the original bytes are kept as they were).
        record = new_event_fields(untrusted(key.decode("utf-8", "replace")) if key else "")
        reason = untrusted(str(error), 1000)
        record.update(payment_id=None, source_topic=msg.topic(), source_partition=msg.partition(),
                      source_offset=msg.offset(), consumer_group=self.group_id,
                      error_type=type(error).__name__, error=reason,
                      original_key=key, original_value=msg.value())
        log.warning("dead-lettered %s[%d]@%d: %s: %s", msg.topic(), msg.partition(), msg.offset(),
                    type(error).__name__, reason)
        delay = 0.1
        while True:
            try:
                await self.dead_letters.publish(DEAD_LETTER, record)
                return
            except PublishError as exc:
                if stop.is_set():
                    raise
                log.warning("dead letter not acknowledged, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)

    def _mark_done(self, messages: list[Message], owners: dict[tuple[str, int], _PartitionProgress]) -> None:
        with self._done_changed:
            for m in messages:
                tp = _partition_of(m)
                if self._progress.get(tp) is owners[tp]:  # else revoked meanwhile: its new owner redoes it
                    owners[tp].done.add(cast(int, m.offset()))

    async def _commit(self) -> None:
        offsets = self._committable()
        if offsets:
            await self._in_thread(self._consumer.commit, offsets=offsets, asynchronous=False)

    def _commit_in_background(self) -> None:
        # Handlers are idempotent, so a commit that is late (or lost in a crash) only means a
        # redelivery: the next batch need not wait for the broker's answer. Queued on the consumer's
        # thread, commits go out in order; close and revoke still commit synchronously.
        offsets = self._committable()
        if offsets:
            self._thread.submit(self._consumer.commit, offsets=offsets, asynchronous=True)

    def _committable(self, only: set[tuple[str, int]] | None = None) -> list[TopicPartition]:
        with self._lock:
            result = []
            for (topic, partition), progress in self._progress.items():
                if only is not None and (topic, partition) not in only:
                    continue
                position = progress.committable(even_if_committed=only is not None)
                if position is not None:
                    result.append(TopicPartition(topic, partition, position))
            return result

    # Rebalance callbacks run on the consumer thread, inside consume().
    def _rewind(self, point: TopicPartition) -> None:
        """Fetches a partition again from a dropped message: ours again, its position is past it."""
        try:
            self._consumer.seek(point)
        except KafkaException as exc:
            # Going on would commit past the dropped messages later: stopping leaves them uncommitted,
            # for whoever owns the partition next, this process restarted included.
            raise RuntimeError(f"cannot fetch {point.topic}[{point.partition}] again from {point.offset} "
                               f"after a rebalance dropped messages of it: {exc}") from exc

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_in_fetch |= {(p.topic, p.partition) for p in partitions}
        self.assigned = True
        log.info("assigned %s", [(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Waits for the batches in hand of the revoked partitions (they run on the event loop, which
        this thread does not block), then commits them and gives the partitions up."""
        revoked = {(p.topic, p.partition) for p in partitions}
        self._revoked_in_fetch |= revoked
        with self._done_changed:
            finished = self._done_changed.wait_for(lambda: not self._in_hand_of(revoked), self.revoke_timeout_s)
        if not finished:
            REVOKE_TIMEOUTS.labels(self.group_id).inc()
            log.warning("revoked partitions given up after %.0fs with events still in hand: their new owner "
                        "handles those again", self.revoke_timeout_s)
        offsets = self._committable(only=revoked)
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit on revoke failed: %s", exc)
        with self._lock:
            for tp in revoked:
                self._progress.pop(tp, None)
        log.info("revoked %s", sorted(revoked))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Another consumer may own these already: nothing to wait for, nothing we may commit."""
        lost = {(p.topic, p.partition) for p in partitions}
        self._revoked_in_fetch |= lost
        with self._lock:
            for tp in lost:
                self._progress.pop(tp, None)
        log.warning("lost %s: events in hand of theirs are handled again by their new owner", sorted(lost))

    def _in_hand_of(self, partitions: set[tuple[str, int]]) -> bool:
        """Whether a batch holding events of these partitions is running (call under the lock)."""
        return any(running & partitions for running in self._running.values())
