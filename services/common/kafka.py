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
import math
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final, Protocol, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
from prometheus_client import Counter, Gauge, Histogram

from services.common.avro import Codec, DecodeError
from services.common.config import ConfigError, client_variable, kafka_client_config
from services.common.ids import new_id
from services.common.key_order import KeyOrder, Turn
from services.common.schema_registry import RegistryUnavailable
from services.common.text import untrusted
from services.common.topic_config import configs_for, differences
from services.common.topics import DEAD_LETTER, Topic

log = logging.getLogger(__name__)

EVENTS_OUT = Counter("pipeline_events_published_total", "Events acknowledged by Kafka", ["topic"])
PUBLISH_FAILURES = Counter("pipeline_publish_failures_total", "Events Kafka did not acknowledge", ["topic"])
EVENTS_IN = Counter("pipeline_events_consumed_total", "Events handled by a consumer", ["topic", "result"])
HANDLE_SECONDS = Histogram("pipeline_batch_handle_seconds", "Time to handle one consumed batch", ["group"])
CONSUMER_LAG = Gauge("pipeline_consumer_lag", "Messages a consumer group is behind the end of a partition it is "
                     "assigned", ["group", "topic", "partition"])
PUBLISH_SECONDS = Histogram("pipeline_publish_seconds", "Time from producing an event to Kafka's acknowledgement",
                            ["topic"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 15))
PRODUCER_QUEUED = Gauge("pipeline_producer_queued_events", "Events a producer holds that Kafka has not "
                        "acknowledged yet (librdkafka's statistics, every 5 s)", ["client", "topic"])
UNEXPECTED_ERRORS = Counter(
    "pipeline_unexpected_errors_total", "Events dead-lettered because an unexpected error (most likely a bug) "
    "outlived the poison budget: alert on any increase (docs/errors.md)", ["group", "error_type"])
CONSUMER_RETRIES = Counter(
    "pipeline_consumer_retries_total", "Batches a consumer tried again: reason transient (a dependency is down: "
    "retried for as long as it takes) or unexpected (any other error: retried against the poison budget, then "
    "split); a steady rate means a stall (docs/errors.md)", ["group", "reason"])
CONSUMER_STALLED = Gauge(
    "pipeline_consumer_stalled_seconds", "How long the oldest batch a consumer holds has been in hand (0 with "
    "none), or since a batch was given up (a consumer with an order key: services/common/key_order.py): grows while "
    "a batch is retried; its partitions' later events wait behind it", ["group"])
REVOKE_TIMEOUTS = Counter(
    "pipeline_revoke_timeouts_total", "Rebalances that gave partitions up before the batches in hand for them "
    "finished (their new owner handles those events again)", ["group"])


IDLE_POLL_S = 1.0  # how often a producer with nothing in flight is polled (log lines, statistics)


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
    clash = sorted(shared.keys() & {*own.keys(), "logger"})
    if clash:
        raise ConfigError(f"{client_variable(clash[0])} cannot be set: the service decides {clash[0]} itself")
    merged = {**shared, **own}
    secrets = [str(v) for k, v in merged.items() if _SECRET_PROPERTY.search(k)]
    return {"logger": ClientLog(secrets), **merged}


_SECRET_PROPERTY = re.compile(r"password|secret|jaas|oauthbearer\.config|private\.key")
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")


class ClientLog:
    """Where librdkafka's own log lines go (confluent-kafka's `logger` setting) instead of stderr as
    `%3|1795996904.040|FAIL|...`: the process's JSON logger, under the name "librdkafka", at the level
    confluent-kafka maps from the line's syslog level (3 error, 4 warning, 5-6 info, 7 debug). The
    client's own secrets are masked before the text is cut, and the text is made safe, as it quotes
    what brokers sent. Lines are served by the client's poll/consume/flush calls."""

    def __init__(self, secrets: Iterable[str] = ()):
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)  # longest first: no half left

    def log(self, level: int, msg: str, *args: Any) -> None:
        text = msg % args if args else msg
        for secret in self._secrets:
            text = text.replace(secret, "****")
        LIBRDKAFKA_LOG.log(level, "%s", untrusted(text, 1000))


class BrokerReachability:
    """Whether a librdkafka client has a broker connection up now, for readiness. The client's
    statistics (every statistics.interval.ms, served by its poll/consume calls) list each broker's
    connection state; the error callback says at once when every broker went down, so a readiness
    check turns within a second or so, and back with the first statistics after reconnecting.
    Statistics older than `stale_after_s` prove nothing: the client is no longer polled."""

    def __init__(self, stale_after_s: float = 15.0, clock: Callable[[], float] = time.monotonic):
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._up = False
        self._seen_at: float | None = None
        self.up_since: float | None = None  # when it last went from down to up

    def on_statistics(self, stats: Mapping[str, Any]) -> None:
        brokers = stats.get("brokers")
        up = isinstance(brokers, dict) and any(isinstance(b, dict) and b.get("state") == "UP"
                                               for b in brokers.values())
        self._seen_at = self._clock()
        self._set(up)

    def on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._set(False)

    def _set(self, up: bool) -> None:
        if up and not self._up:
            self.up_since = self._clock()
        self._up = up

    def connected(self) -> bool:
        return self._up and self._seen_at is not None and self._clock() - self._seen_at <= self._stale_after_s


def producer_config(bootstrap: str, client_id: str, delivery_timeout_ms: int, linger_ms: int,
                    reachability: BrokerReachability | None = None) -> dict:
    """Idempotent producer with acks=all, set explicitly so no library default decides durability;
    delivery.timeout.ms bounds how long a caller waits before hearing that Kafka did not ack."""
    def on_statistics(stats_json: str) -> None:
        stats = _record_producer_stats(stats_json)
        if reachability is not None:
            reachability.on_statistics(stats)

    return client_config({
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        "max.in.flight.requests.per.connection": 5,
        "linger.ms": linger_ms,
        "compression.type": "lz4",
        "delivery.timeout.ms": delivery_timeout_ms,
        "statistics.interval.ms": 5000,
        "stats_cb": on_statistics,
        **({"error_cb": reachability.on_error} if reachability is not None else {}),
    })


# How long a failed delivery keeps a connected producer not ready when nothing succeeds after it
# (EventProducer.ready): several readiness probes' periods, so a load balancer takes the process out,
# and longer than ServiceNotReady's `for: 1m` (ops/prometheus/alerts.yml), so a producer that fails
# again each time it is let back in still pages.
FAILURE_REMEMBERED_S: Final = 120.0


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
                 linger_ms: int = 2, poll_interval_s: float = 0.0005,
                 failure_remembered_s: float = FAILURE_REMEMBERED_S):
        self.codec = codec
        self._failure_remembered_s = failure_remembered_s
        self.reachability = BrokerReachability()
        self._producer = Producer(producer_config(bootstrap, client_id, delivery_timeout_ms, linger_ms,
                                                  self.reachability))
        self._last_failure_at: float | None = None  # monotonic: a delivery Kafka did not acknowledge
        self._last_success_at: float | None = None
        self._poll_interval_s = poll_interval_s
        self._outstanding = 0
        self._polling: asyncio.TimerHandle | None = None
        self._polling_loop: asyncio.AbstractEventLoop | None = None
        self._polling_idle = False
        self._acknowledged: dict[str, Any] = {}  # topic -> its EVENTS_OUT child, bound once
        self._latencies: dict[str, Any] = {}  # topic -> its PUBLISH_SECONDS child, likewise
        try:
            self._keep_polling(asyncio.get_running_loop(), idle=True)
        except RuntimeError:  # made outside an event loop: polling starts with the first event
            pass

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
                self._last_failure_at = time.monotonic()
            else:  # about 1 µs per event (the histogram's lock and bucket search)
                self._latency_of(cast(str, msg.topic())).observe(cast(float, msg.latency()))
                self._last_success_at = time.monotonic()
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
                    # the stall shows on /readyz, rather than the event being dead-lettered as a
                    # bug's victim (a payment request whose push was made among them).
                    PUBLISH_FAILURES.labels(topic.name).inc()
                    self._last_failure_at = time.monotonic()
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

    def ready(self) -> bool:
        """For readiness: a broker connection is up, and no delivery failed in the last
        `failure_remembered_s` since the last one that succeeded or since the connection came back
        (a failure with the connection up, an ACL or a topic gone say, stays visible until a delivery
        succeeds, or for that long). Not for ever: a process out of rotation for it (the ingress, the
        webhook gateway) is sent nothing, so no delivery of its own could ever bring it back; a
        delivery still failing after that turns it not ready again."""
        if not self.reachability.connected():
            return False
        failed_at = self._last_failure_at
        if failed_at is None:
            return True
        recovered_at = max(self._last_success_at or 0.0, self.reachability.up_since or 0.0)
        return failed_at < recovered_at or time.monotonic() - failed_at > self._failure_remembered_s

    def _latency_of(self, topic: str) -> Any:
        histogram = self._latencies.get(topic)
        if histogram is None:  # bound once per topic: the label lookup is the costly part
            histogram = self._latencies[topic] = PUBLISH_SECONDS.labels(topic)
        return histogram

    def _keep_polling(self, loop: asyncio.AbstractEventLoop, idle: bool = False) -> None:
        if self._polling is not None and self._polling_loop is loop and (idle or not self._polling_idle):
            return  # polled often enough already
        if self._polling is not None:
            self._polling.cancel()
        self._polling_loop, self._polling_idle = loop, idle  # a test may switch loops
        self._polling = loop.call_later(IDLE_POLL_S if idle else self._poll_interval_s, self._poll)

    def _poll(self) -> None:
        # A timer callback rather than a task that sleeps: no future and no task step per poll.
        loop = asyncio.get_running_loop()
        if loop is not self._polling_loop:  # a timer left on a loop a test has moved on from: it ends here
            return
        self._producer.poll(0)
        self._polling = None
        # Idle, it still polls now and then: librdkafka's log lines (a broker lost meanwhile) and its
        # statistics are served by poll, and would otherwise wait for the next event.
        self._keep_polling(loop, idle=self._outstanding == 0)

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


def ensure_topics(bootstrap: str, topics: Iterable[Topic], partitions: int | None, timeout: float = 30.0, *,
                  replication_factor: int | None = None,
                  overrides: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Creates the missing topics, each once whatever the list repeats, with `partitions` and
    `replication_factor` (None: the broker's num.partitions / default.replication.factor) and the
    settings topic_config gives it. A topic another process created meanwhile counts as created:
    services start in any order, several at once. An existing topic is left as it is; a setting it
    has otherwise is logged (docs/kafka-topics.md, "Existing topics")."""
    wanted = {t.name: configs_for(t.name, replication_factor, overrides or {}) for t in topics}
    admin = AdminClient(client_config({"bootstrap.servers": bootstrap}))
    existing = admin.list_topics(timeout=timeout).topics
    missing = [NewTopic(name, num_partitions=partitions or -1, replication_factor=replication_factor or -1,
                        config=configs) for name, configs in wanted.items() if name not in existing]
    if missing:
        for future in admin.create_topics(missing, operation_timeout=timeout, request_timeout=timeout).values():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # another service was first
                    raise
    try:
        _report_differences(admin, {n: wanted[n] for n in wanted if n in existing}, existing, replication_factor,
                            timeout)
    finally:
        admin.poll(0)  # serves librdkafka's log lines (ClientLog) queued meanwhile


def _report_differences(admin: AdminClient, wanted: dict[str, dict[str, str]], metadata: dict[str, Any],
                        replication_factor: int | None, timeout: float) -> None:
    """Logs each setting an existing topic has otherwise than this service would create it with.
    Reported, not altered: see docs/kafka-topics.md, "Existing topics"."""
    for name in sorted(wanted):
        replicas = {len(p.replicas) for p in metadata[name].partitions.values()}
        if replication_factor is not None and replicas and min(replicas) < replication_factor:
            log.warning("topic %s has %d replica(s) per partition, fewer than KAFKA_TOPIC_REPLICATION_FACTOR=%d; "
                        "left as it is", name, min(replicas), replication_factor)
    if not wanted:
        return
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in sorted(wanted)]
    for resource, future in admin.describe_configs(resources, request_timeout=timeout).items():
        try:
            actual = {k: e.value for k, e in future.result().items()}
        except KafkaException as exc:  # no DescribeConfigs right, say: the topic is used as it is
            log.warning("cannot read the settings of topic %s to compare them: %s", resource.name,
                        exc.args[0].str() if exc.args else exc)
            continue
        for key, (has, would) in differences(wanted[resource.name], actual).items():
            log.warning("topic %s has %s=%s where this service would create it with %s; left as it is",
                        resource.name, key, untrusted(has), would)


def _where(exc: BaseException) -> str:
    """file:line where an exception was raised: enough to find a bug without the traceback's text."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"


def _record_lag(group: str, stats_json: str, assigned: set[tuple[str, int]] | None = None) -> dict[str, Any]:
    """librdkafka's statistics of a consumer carry consumer_lag per partition (-1 when unknown). The
    labels stay few: a group reads a fixed list of topics (the upstream ones are configured). With
    `assigned`, only those partitions are reported: statistics taken before a revocation and served
    after it would otherwise bring a revoked partition's lag back. Returns the statistics."""
    stats = json.loads(stats_json)
    for topic, t in stats.get("topics", {}).items():
        for partition, p in t.get("partitions", {}).items():
            if partition == "-1" or p.get("consumer_lag", -1) < 0:
                continue
            if assigned is None or (topic, int(partition)) in assigned:
                CONSUMER_LAG.labels(group, topic, partition).set(p["consumer_lag"])
    return stats


def _record_producer_stats(stats_json: str) -> dict[str, Any]:
    """librdkafka's statistics of a producer: events queued or in flight per topic (msgq_cnt counts
    those waiting for a batch, xmit_msgq_cnt those ready to send; partition -1 holds those not yet
    given a partition)."""
    stats = json.loads(stats_json)
    client = stats.get("client_id", "")
    for topic, t in stats.get("topics", {}).items():
        queued = sum(p.get("msgq_cnt", 0) + p.get("xmit_msgq_cnt", 0) for p in t.get("partitions", {}).values())
        PRODUCER_QUEUED.labels(client, topic).set(queued)
    return stats


def _forget_lag(group: str, partitions: Iterable[tuple[str, int]]) -> None:
    """A partition given up is no longer this group member's to report: its last lag would stay."""
    for topic, partition in partitions:
        try:
            CONSUMER_LAG.remove(group, topic, str(partition))
        except KeyError:  # never reported
            pass


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
    never dead-lettered, and the stall shows on /readyz (docs/errors.md)."""


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
      and is retried without end, visible on /readyz;
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


def _given_up_unless_ended(order: KeyOrder, turn: Turn, task: asyncio.Task[None]) -> None:
    order.end(turn, handled=False)  # a no-op when the batch's own `finally` ended its turn


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


def take(consumer: Consumer, most: int, wait_s: float, linger_s: float = 0.0) -> list[Message]:
    """Waits up to `wait_s` for a first message, then takes what else is already here, or arrives
    within `linger_s`, up to `most` in all. Not one consume(most, wait_s): librdkafka's batch consume
    returns only once it has `most` messages or the timeout has passed, so it would hold the first
    ones back for the whole timeout whenever fewer arrive."""
    first = consumer.consume(1, wait_s)
    return first + consumer.consume(most - 1, linger_s) if first else first


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


# How often a consumer commits its progress while it runs (ConsumerLoop._commit_in_background).
COMMIT_INTERVAL_S: Final = 0.5


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

    Up to `max_in_flight` batches run at once. With `order_key`, a batch waits before its handler
    runs for every earlier batch in hand that has an event of the same key
    (services/common/key_order.py): the ledger's batches overlap while each payment's events keep
    their order. With `linger_s`, a fetch that got a first message waits up to that long for more
    (up to `max_batch`): a handler whose cost is mostly per batch (the ledger's transaction) then
    spends less per event at moderate rates, for that much latency.

    Rebalances: partitions revoked from this consumer are given up only once the batches in hand for
    them finished and their offsets are committed, for up to `revoke_timeout_s`: the new owner starts
    after them instead of handling them a second time beside us (for the STK worker, a push in flight
    would otherwise come back to its new owner as an outcome unknown). Partitions *lost* (the session
    expired: another consumer may own them already) are dropped at once, with no wait and no commit.
    """

    def __init__(self, *, bootstrap: str, group_id: str, topics: list[Topic], codec: Codec,
                 handler: BatchHandler, dead_letters: Publisher, max_batch: int = 500,
                 max_in_flight: int = 1, order_key: Callable[[ConsumedEvent], Hashable] | None = None,
                 poll_timeout: float = 0.2, linger_s: float = 0.0,
                 poison_budget: int = 5, revoke_timeout_s: float = 30.0, extra_config: dict | None = None,
                 commit_interval_s: float = COMMIT_INTERVAL_S):
        if poison_budget < 1:
            raise ValueError("poison_budget must be at least 1")
        self.group_id = group_id
        # Five tries take about 1.5 s of back-off: enough for a fault that was not marked Transient
        # but passes (a connection reset mid-query), little next to a partition stalled for good.
        self.poison_budget = poison_budget
        self.commit_interval_s = commit_interval_s
        # Minus infinity until the first commit, so that it goes at once: monotonic time counts from the
        # host's boot, and on a machine up for less than the interval a last commit "at 0" held it back.
        self._last_commit = -math.inf
        self._commit_timer: asyncio.TimerHandle | None = None
        self._in_hand: dict[int, float] = {}  # batch number -> when it was fetched (monotonic)
        self._batches = 0
        self.order_key = order_key
        self._order = KeyOrder()
        self.topics = topics
        self.codec = codec
        self.handler = handler
        self.dead_letters = dead_letters
        self.max_batch = max_batch
        self.poll_timeout = poll_timeout
        self.linger_s = linger_s
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
        self.reachability = BrokerReachability()
        self._owned: set[tuple[str, int]] = set()  # partitions assigned now (consumer thread only)
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
            "stats_cb": self._on_statistics,
            "error_cb": self.reachability.on_error,
            **(extra_config or {}),
        }))
        self.assigned = False
        CONSUMER_STALLED.labels(group_id).set_function(self.stalled_for)

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
                turn = self._order.take(owners) if self.order_key is not None else None  # in fetch order
                task = loop.create_task(self._handle(batch, owners, turn, stop))
                tasks.add(task)
                task.add_done_callback(functools.partial(_finished, tasks))
                if turn is not None:  # a task cancelled before its first step never runs its finally
                    task.add_done_callback(functools.partial(_given_up_unless_ended, self._order, turn))
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if self._commit_timer is not None:
                self._commit_timer.cancel()  # the commit below takes its offsets
                self._commit_timer = None
            await self._commit()
            await self._in_thread(self._consumer.close)
            self._thread.shutdown(wait=True)

    def _fetch(self) -> list[Message]:
        """Waits for one message, then takes whatever else is already here, or arrives within
        `linger_s` (0 by default: a batch never waits to fill up, so latency stays low at low rates
        and batches grow under load)."""
        return take(self._consumer, self.max_batch, self.poll_timeout, self.linger_s)

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

    def ready(self, stalled_after_s: float) -> bool:
        """For readiness: connected to a broker, given an assignment by the group (an empty one
        counts: a member beyond the partition count is idle, not broken) and not lost since, and no
        batch held longer than `stalled_after_s`."""
        return self.reachability.connected() and self.assigned and self.stalled_for() <= stalled_after_s

    def _on_statistics(self, stats_json: str) -> None:
        self.reachability.on_statistics(_record_lag(self.group_id, stats_json, self._owned))

    def stalled_for(self) -> float:
        """Seconds the oldest batch in hand has been so (0 with none): grows while a batch is retried
        because its handler keeps failing (a dependency down) or while a handler never returns. With
        an order key, also since a batch was given up: the later batches sharing a key with it are
        given up too, until a restart (services/common/key_order.py)."""
        oldest = min(self._in_hand.values(), default=None)
        return max(0.0 if oldest is None else time.monotonic() - oldest, self._order.given_up_for())

    async def _handle(self, messages: list[Message], owners: dict[tuple[str, int], _PartitionProgress],
                      turn: Turn | None, stop: asyncio.Event) -> None:
        self._batches += 1
        number = self._batches
        self._in_hand[number] = time.monotonic()
        handled = False
        try:
            await self._learn(messages, stop)
            events, undecodable = self._decode_all(messages)
            await asyncio.gather(*(self._dead_letter(msg, error, stop) for msg, error in undecodable))
            if turn is not None:
                await self._order.wait(turn, self._keys(events))
            await self._handle_with_retry(events, messages, stop)
            self._mark_done(messages, owners)
            handled = True
            self._commit_in_background()
        finally:
            if turn is not None:
                self._order.end(turn, handled)
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
                CONSUMER_RETRIES.labels(self.group_id, "transient").inc()
                log.warning("batch of %d waits for the schema registry, retrying in %.1fs: %s", len(messages),
                            delay, exc)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)

    def _keys(self, events: list[ConsumedEvent]) -> set[Hashable]:
        assert self.order_key is not None
        return {k for k in map(self.order_key, events) if k is not None}  # a keyless event touches nothing

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
                CONSUMER_RETRIES.labels(self.group_id, "transient" if transient else "unexpected").inc()
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
        # thread, commits go out in order; close and revoke still commit synchronously. At most one
        # every commit_interval_s: a commit per batch was an OffsetCommit request per batch, and at
        # a few hundred payments/s the small batches of every consumer made those a good part of the
        # broker's CPU (docs/cpu-per-payment.md). A crash now redelivers up to that much more.
        if self._commit_timer is not None:
            return  # a commit is due soon: it takes these offsets too
        wait = self._last_commit + self.commit_interval_s - time.monotonic()
        if wait > 0:
            self._commit_timer = asyncio.get_running_loop().call_later(wait, self._commit_now)
        else:
            self._commit_now()

    def _commit_now(self) -> None:
        self._commit_timer = None
        self._last_commit = time.monotonic()
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
        self._owned |= {(p.topic, p.partition) for p in partitions}
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
        self._owned -= revoked
        _forget_lag(self.group_id, revoked)
        log.info("revoked %s", sorted(revoked))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Another consumer may own these already: nothing to wait for, nothing we may commit."""
        lost = {(p.topic, p.partition) for p in partitions}
        self._revoked_in_fetch |= lost
        with self._lock:
            for tp in lost:
                self._progress.pop(tp, None)
        self._owned -= lost
        if not self._owned:  # out of the group (its session expired): not ready until it is let back in
            self.assigned = False
        _forget_lag(self.group_id, lost)
        log.warning("lost %s: events in hand of theirs are handled again by their new owner", sorted(lost))

    def _in_hand_of(self, partitions: set[tuple[str, int]]) -> bool:
        """Whether a batch holding events of these partitions is running (call under the lock)."""
        return any(running & partitions for running in self._running.values())
