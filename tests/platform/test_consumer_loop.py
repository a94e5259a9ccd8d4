"""The Kafka plumbing against the real broker: commit after handling, dead letters, retries, acked publishing."""
from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import uuid

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient

from services.common.avro import Codec
from services.common.kafka import (
    ConsumedEvent,
    ConsumerLoop,
    EventProducer,
    PublishError,
    Transient,
    client_config,
    ensure_topics,
    new_event_fields,
    rewind_points,
)
from services.common.topics import DEAD_LETTER, PAYMENT_REQUESTED, STK_PUSH_RESULT, Topic
from tests.conftest import ROOT, eventually
from tests.platform.kafka_helpers import end_offsets, read_all, recording_loop, run_until, sample_request


async def own_topic(kafka_bootstrap: str, codec: Codec, unique: str, partitions: int = 2) -> Topic:
    topic = Topic(f"test.loop.{unique}", "payment_requested")
    ensure_topics(kafka_bootstrap, [topic], partitions)
    await codec.prepare([topic])  # its subject, as a service registers the topics it writes
    return topic


async def test_a_consumer_killed_before_commit_gets_the_message_again(kafka_bootstrap, codec, producer, unique,
                                                                       tmp_path):
    topic = await own_topic(kafka_bootstrap, codec, unique)
    event = sample_request(f"ch-{unique}", str(uuid.uuid4()))
    await producer.publish(topic, event)
    record = tmp_path / "handled.txt"

    died = subprocess.run([sys.executable, "-m", "tests.platform.consumer_that_dies", kafka_bootstrap,
                           f"g-{unique}", topic.name, str(record)], cwd=ROOT, timeout=60)

    assert died.returncode == -9
    assert record.read_text().split() == [event["event_id"]]
    seen: list[ConsumedEvent] = []
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, seen), lambda: seen)
    assert [e.value["event_id"] for e in seen] == [event["event_id"]]


async def test_committed_messages_are_not_delivered_again(kafka_bootstrap, codec, producer, unique):
    topic = await own_topic(kafka_bootstrap, codec, unique)
    first, second = (sample_request(f"ch-{unique}", str(uuid.uuid4())) for _ in range(2))
    await producer.publish(topic, first)
    seen: list[ConsumedEvent] = []
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, seen), lambda: seen)
    await producer.publish(topic, second)
    seen_after_restart: list[ConsumedEvent] = []
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, seen_after_restart),
                    lambda: seen_after_restart)
    assert [e.value["event_id"] for e in seen_after_restart] == [second["event_id"]]


async def test_poison_messages_go_to_the_dead_letter_topic_and_the_consumer_continues(
        kafka_bootstrap, codec, producer, unique):
    topic = await own_topic(kafka_bootstrap, codec, unique)
    channel = f"ch-{unique}"
    refused = sample_request(channel, str(uuid.uuid4()))
    good = sample_request(channel, str(uuid.uuid4()))
    mark = end_offsets(kafka_bootstrap, DEAD_LETTER.name)
    await producer.publish_many([(topic, channel.encode(), b"this is not avro")])
    await producer.publish(topic, refused)
    await producer.publish(topic, good)

    seen: list[ConsumedEvent] = []
    def fail(e):
        return ValueError("amount exceeds the channel limit") if e.value["event_id"] == refused["event_id"] else None
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, seen, fail),
                    lambda: any(e.value["event_id"] == good["event_id"] for e in seen))

    letters = read_all(kafka_bootstrap, DEAD_LETTER.name,
                       lambda m: codec.decode(m.value())[1]["source_topic"] == topic.name, expected=2, since=mark)
    records = sorted((codec.decode(m.value())[1] for m in letters), key=lambda r: r["source_offset"])
    assert [(r["error_type"], r["original_value"]) for r in records] == [
        ("DecodeError", b"this is not avro"), ("ValueError", codec.encode(PAYMENT_REQUESTED, refused))]
    assert records[1]["error"] == "amount exceeds the channel limit"
    assert all(r["consumer_group"] == f"g-{unique}" and r["original_key"] == channel.encode() for r in records)
    assert [e.value["event_id"] for e in seen] == [good["event_id"]]


async def test_a_transient_failure_is_retried_not_dead_lettered(kafka_bootstrap, codec, producer, unique):
    topic = await own_topic(kafka_bootstrap, codec, unique)
    event = sample_request(f"ch-{unique}", str(uuid.uuid4()))
    await producer.publish(topic, event)
    attempts: list[int] = []
    seen: list[ConsumedEvent] = []

    async def flaky(events):
        attempts.append(len(events))
        if len(attempts) < 3:
            raise Transient("database restarting")
        seen.extend(events)
        return []

    from services.common.kafka import ConsumerLoop
    loop = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                        handler=flaky, dead_letters=producer, poll_timeout=0.1)
    await run_until(loop, lambda: seen)
    assert len(attempts) == 3
    assert [e.value["event_id"] for e in seen] == [event["event_id"]]


async def test_producer_returns_after_the_ack_and_fails_without_a_broker(kafka_bootstrap, codec, unique):
    good = EventProducer(kafka_bootstrap, codec, client_id="test", delivery_timeout_ms=10_000, linger_ms=1)
    records = [sample_request(f"lp-{unique}", str(uuid.uuid4())) for _ in range(20)]
    await asyncio.gather(*(good.publish(PAYMENT_REQUESTED, r) for r in records))
    assert good._outstanding == 0 and good._polling_idle  # nothing left to poll for but log lines, once a second
    good.close()

    broken = EventProducer("127.0.0.1:9", codec, client_id="test", delivery_timeout_ms=300, linger_ms=1)
    with pytest.raises(PublishError):
        await broken.publish(PAYMENT_REQUESTED, records[0])
    broken.close(timeout=1)


async def test_batches_overlap_but_a_batch_sharing_a_key_with_an_earlier_one_waits_for_it(
        kafka_bootstrap, codec, producer, unique):
    """Two batches of at most 10 run at once; the events' payment ids are the order key. Every other
    event belongs to one of three payments, each in its own stretch of 20 events: the batches within
    a stretch share its payment, those on either side of a stretch's end do not."""
    topic = await own_topic(kafka_bootstrap, codec, unique, partitions=1)  # the offsets are the fetch order
    shared = [str(uuid.uuid4()) for _ in range(3)]
    backlog = [sample_request(f"ch-{unique}", shared[i // 20] if i % 2 else str(uuid.uuid4())) for i in range(60)]
    for e in backlog:  # one after the other: in this order on the partition
        await producer.publish(topic, e)
    running: list[set[str]] = []
    overlaps: list[int] = []
    applied: list[tuple[str, int]] = []  # (payment, offset) in the order handlers applied them
    beside: list[set[str]] = []  # keys a batch shared with one running beside it (an assertion in the
    # handler would be caught and the batch retried)

    async def handler(events: list[ConsumedEvent]) -> list:
        keys = {e.value["payment_id"] for e in events}
        beside.extend(keys & other for other in running if keys & other)
        running.append(keys)
        overlaps.append(len(running))
        await asyncio.sleep(0.2)  # a batch's database work
        applied.extend((e.value["payment_id"], e.offset) for e in events)
        running.remove(keys)
        return []
    loop = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                        handler=handler, dead_letters=producer, max_batch=10, max_in_flight=2,
                        order_key=lambda e: e.value["payment_id"], poll_timeout=0.1)
    await run_until(loop, lambda: len(applied) == 60)
    assert beside == []
    by_payment = collections.defaultdict(list)
    for payment, offset in applied:
        by_payment[payment].append(offset)
    assert all(offsets == sorted(offsets) for offsets in by_payment.values())
    assert [len(by_payment[p]) for p in shared] == [10, 10, 10]
    assert max(overlaps) == 2  # batches without a shared payment did run side by side


async def test_a_batch_waiting_for_one_given_up_at_a_stop_is_given_up_too_and_both_come_again_in_order(
        kafka_bootstrap, codec, producer, unique):
    """Three batches of 10 at most in flight: the first fails for as long as the database is down,
    the second shares a payment with it and waits, the third shares none and is applied. At the stop
    the first is given up, so the second must be too: nothing of theirs is committed, and the next
    consumer applies the payment's two events in their order."""
    topic = await own_topic(kafka_bootstrap, codec, unique, partitions=1)
    payment = str(uuid.uuid4())
    events = [sample_request(f"ch-{unique}", payment if i in (0, 10) else str(uuid.uuid4())) for i in range(30)]
    for e in events:
        await producer.publish(topic, e)
    applied: list[int] = []

    async def database_down_for_the_first(batch: list[ConsumedEvent]) -> list:
        if any(e.offset == 0 for e in batch):
            raise Transient("the database is down")
        applied.extend(e.offset for e in batch)
        return []
    loop = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                        handler=database_down_for_the_first, dead_letters=producer, max_batch=10,
                        max_in_flight=3, order_key=lambda e: e.value["payment_id"], poll_timeout=0.1)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await eventually(lambda: _true(len(applied) == 10 and len(loop._in_hand) == 2), timeout=30)
    assert applied == list(range(20, 30))  # the third went ahead: it shares no payment
    stop.set()
    await asyncio.wait_for(running, 30)
    assert applied == list(range(20, 30))  # the second never ran

    again: list[ConsumedEvent] = []
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, again),
                    lambda: len(again) >= 30)
    assert sorted(e.offset for e in again) == list(range(30))  # nothing was committed past the first
    assert [e.offset for e in again if e.value["payment_id"] == payment] == [0, 10]


async def test_a_lingering_consumer_takes_what_arrives_soon_after_the_first_event_in_the_same_batch(
        kafka_bootstrap, codec, producer, unique):
    topic = await own_topic(kafka_bootstrap, codec, unique)
    batches: list[int] = []

    async def handler(events: list[ConsumedEvent]) -> list:
        batches.append(len(events))
        return []
    loop = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                        handler=handler, dead_letters=producer, poll_timeout=0.1, linger_s=5.0)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    async def assigned() -> bool:
        return loop.assigned

    async def all_handled() -> bool:
        return sum(batches) >= 4
    await eventually(assigned)
    await producer.publish(topic, sample_request(f"ch-{unique}", str(uuid.uuid4())))
    await asyncio.sleep(0.3)  # well inside the linger: these join the first event's batch
    await asyncio.gather(*(producer.publish(topic, sample_request(f"ch-{unique}", str(uuid.uuid4())))
                           for _ in range(3)))
    await eventually(all_handled)
    stop.set()
    await running
    assert batches == [4]


async def test_a_batch_published_together_arrives_in_order(kafka_bootstrap, codec, unique):
    topic = await own_topic(kafka_bootstrap, codec, unique)
    producer = EventProducer(kafka_bootstrap, codec, client_id="test", linger_ms=1)
    records = [sample_request(f"ch-{unique}", str(uuid.uuid4())) for _ in range(50)]
    await producer.publish_many([(topic, r["channel_id"].encode(), codec.encode(topic, r)) for r in records])
    await producer.publish_many([])
    producer.close()
    messages = read_all(kafka_bootstrap, topic.name, lambda m: True, expected=50)
    assert [codec.decode(m.value())[1]["event_id"] for m in messages] == [r["event_id"] for r in records]


async def test_an_event_that_keeps_failing_is_dead_lettered_after_the_budget_and_the_rest_is_handled_in_order(
        kafka_bootstrap, codec, producer, unique):
    topic = await own_topic(kafka_bootstrap, codec, unique)
    channel = f"ch-{unique}"  # one key: one partition, one order
    events = [sample_request(channel, str(uuid.uuid4())) for _ in range(12)]
    poison = events[7]
    mark = end_offsets(kafka_bootstrap, DEAD_LETTER.name)
    await producer.publish_many([(topic, channel.encode(), codec.encode(topic, e)) for e in events])
    seen, tries_alone = [], 0

    async def all_or_nothing(batch):  # like a handler that applies a batch in one transaction
        nonlocal tries_alone
        if any(e.value["event_id"] == poison["event_id"] for e in batch):
            tries_alone += len(batch) == 1
            raise RuntimeError("unexpected\nfailure\x1b[2J")
        seen.extend(batch)
        return []

    loop = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                        handler=all_or_nothing, dead_letters=producer, poll_timeout=0.1, poison_budget=3)
    await run_until(loop, lambda: len(seen) == 11, timeout=60)

    assert [e.value["event_id"] for e in seen] == [e["event_id"] for e in events if e is not poison]
    assert tries_alone == 3  # the whole budget again before an event is given up for good
    letters = read_all(kafka_bootstrap, DEAD_LETTER.name,
                       lambda m: codec.decode(m.value())[1]["source_topic"] == topic.name, expected=1, since=mark)
    records = [codec.decode(m.value())[1] for m in letters]
    assert [(r["error_type"], r["error"], r["original_value"]) for r in records] == [
        ("RuntimeError", "unexpected\\u000afailure\\u001b[2J", codec.encode(topic, poison))]
    again: list[ConsumedEvent] = []  # handled and dead-lettered count as done: committed, not delivered again
    await producer.publish(topic, sample_request(channel, str(uuid.uuid4())))
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, again), lambda: again)
    assert len(again) == 1


async def test_transient_failures_never_use_up_the_poison_budget(kafka_bootstrap, codec, producer, unique):
    topic = await own_topic(kafka_bootstrap, codec, unique)
    event = sample_request(f"ch-{unique}", str(uuid.uuid4()))
    mark = end_offsets(kafka_bootstrap, DEAD_LETTER.name)
    await producer.publish(topic, event)
    attempts: list[int] = []
    seen: list[ConsumedEvent] = []

    async def dependency_down_for_a_while(events):
        attempts.append(len(events))
        if len(attempts) <= 5:
            raise Transient("database restarting")
        seen.extend(events)
        return []

    loop = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                        handler=dependency_down_for_a_while, dead_letters=producer, poll_timeout=0.1,
                        poison_budget=1)
    await run_until(loop, lambda: seen, timeout=60)
    assert len(attempts) == 6 and [e.value["event_id"] for e in seen] == [event["event_id"]]
    assert read_all(kafka_bootstrap, DEAD_LETTER.name,
                    lambda m: codec.decode(m.value())[1]["source_topic"] == topic.name,
                    expected=1, since=mark, timeout_polls=4) == []


async def test_per_event_reports_a_transient_error_as_transient_so_it_is_never_dead_lettered():
    """The STK worker's adapter: a dependency error its is_transient recognises (Kafka, the database)
    must reach the loop as Transient, or the poison budget would dead-letter a payment request."""
    from services.common.kafka import ConsumedEvent, EventRejected, per_event

    async def handle(event):
        if event.offset == 1:
            raise ConnectionResetError("database connection lost")
        if event.offset == 2:
            raise EventRejected("not a payment")

    handler = per_event(handle, is_transient=lambda exc: isinstance(exc, ConnectionResetError))
    events = [ConsumedEvent("t", 0, n, None, "payment_requested", {}) for n in range(3)]
    with pytest.raises(Transient, match="ConnectionResetError") as raised:
        await handler(events)
    assert isinstance(raised.value.__cause__, ConnectionResetError)
    rejections = await handler([events[0], events[2]])
    assert [(r.event.offset, type(r.error).__name__) for r in rejections] == [(2, "EventRejected")]


async def test_per_event_raises_an_unexpected_error_for_the_poison_budget_and_retries_only_what_failed():
    """One policy for every consumer (docs/errors.md): an error the handler did not declare as the
    event's fault is most likely a bug, so it is not dead-lettered at once (that would hide a payment
    until its review deadline) but raised, for the loop to retry against its poison budget. A retry
    handles again only the events that failed."""
    from services.common.kafka import ConsumedEvent, per_event

    handled, buggy = [], True

    async def handle(event):
        handled.append(event.offset)
        if event.offset == 1 and buggy:
            raise KeyError("amount")

    handler = per_event(handle, is_transient=lambda exc: False)
    events = [ConsumedEvent("t", 0, n, None, "payment_requested", {}) for n in range(3)]
    with pytest.raises(KeyError):
        await handler(events)
    with pytest.raises(KeyError):
        await handler(events)
    buggy = False  # the fault passed (or the loop split the batch down to the others)
    assert await handler(events) == []
    assert sorted(handled) == [0, 1, 1, 1, 2]
    assert await handler(events) == [] and len(handled) == 8  # a batch that returned is forgotten


async def test_an_unexpected_error_in_a_per_event_handler_is_dead_lettered_after_the_budget_and_counted(
        kafka_bootstrap, codec, producer, unique):
    from prometheus_client import REGISTRY

    from services.common.kafka import per_event

    topic = await own_topic(kafka_bootstrap, codec, unique)
    channel = f"ch-{unique}"
    events = [sample_request(channel, str(uuid.uuid4())) for _ in range(6)]
    bug = events[2]
    mark = end_offsets(kafka_bootstrap, DEAD_LETTER.name)
    await producer.publish_many([(topic, channel.encode(), codec.encode(topic, e)) for e in events])
    tries: collections.Counter[str] = collections.Counter()
    seen: list[str] = []

    async def handle(event):
        tries[event.value["event_id"]] += 1
        if event.value["event_id"] == bug["event_id"]:
            raise ZeroDivisionError("a bug this event triggers")
        seen.append(event.value["event_id"])

    def alerts():
        return REGISTRY.get_sample_value("pipeline_unexpected_errors_total",
                                         {"group": f"g-{unique}", "error_type": "ZeroDivisionError"}) or 0

    loop = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                        handler=per_event(handle, lambda exc: False), dead_letters=producer, poll_timeout=0.1,
                        poison_budget=3)
    await run_until(loop, lambda: len(seen) == 5 and alerts() == 1, timeout=60)

    assert sorted(seen) == sorted(e["event_id"] for e in events if e is not bug)
    assert tries[bug["event_id"]] > 3  # retried against the budget, not dead-lettered at the first failure
    assert all(tries[e["event_id"]] == 1 for e in events if e is not bug)  # the others handled once
    letters = read_all(kafka_bootstrap, DEAD_LETTER.name,
                       lambda m: codec.decode(m.value())[1]["source_topic"] == topic.name, expected=1, since=mark)
    assert [codec.decode(m.value())[1]["error_type"] for m in letters] == ["ZeroDivisionError"]


async def test_a_rebalance_lets_the_batches_in_hand_finish_and_commits_them_before_the_partitions_move(
        kafka_bootstrap, codec, producer, unique):
    """A second consumer joins while the first has slow batches in hand: the first gives a partition up
    only once those finished and were committed, so every event is handled exactly once across both
    (without the wait, the new owner would start from the last commit and handle them again)."""
    topic = await own_topic(kafka_bootstrap, codec, unique)
    events = [sample_request(f"ch-{unique}-{n}", str(uuid.uuid4())) for n in range(200)]  # keys on both partitions
    for e in events:  # one record batch each, so that small fetches interleave the partitions
        await producer.publish(topic, e)
    handled: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)  # event id -> (consumer, partition)

    def slow_loop(name: str, delay_s: float) -> ConsumerLoop:
        async def handler(batch):
            await asyncio.sleep(delay_s)  # a batch of Daraja calls
            for e in batch:
                handled[e.value["event_id"]].append((name, e.partition))
            return []
        return ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                            handler=handler, dead_letters=producer, max_batch=10, max_in_flight=8,
                            poll_timeout=0.1, extra_config={"max.partition.fetch.bytes": 1000})

    first, second = slow_loop("first", 1.0), slow_loop("second", 0.05)
    in_hand_when_revoked = []
    on_revoke = first._on_revoke

    def recording_revoke(consumer, partitions):
        with first._lock:
            in_hand_when_revoked.append(first._in_hand_of({(p.topic, p.partition) for p in partitions}))
        on_revoke(consumer, partitions)
    first._on_revoke = recording_revoke  # type: ignore[method-assign]  # before run() subscribes with it
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    running_first = asyncio.create_task(first.run(stop_first))
    try:
        await eventually(lambda: _true(first._running), timeout=30, interval=0.01)  # batches in hand
        running_second = asyncio.create_task(second.run(stop_second))
        try:
            await eventually(lambda: _true(len(handled) == len(events)), timeout=90, interval=0.1)
            await asyncio.sleep(1)  # room for a second handling, if one were coming
        finally:
            stop_second.set()
            await asyncio.wait_for(running_second, 30)
    finally:
        stop_first.set()
        await asyncio.wait_for(running_first, 30)

    assert in_hand_when_revoked[0] is True  # the first consumer had events of the moving partition in hand
    twice = {event_id: by for event_id, by in handled.items() if len(by) > 1}
    assert twice == {}, f"{len(twice)} events handled twice, e.g. {list(twice.values())[:3]}"
    owners = collections.defaultdict(set)
    for [(name, partition)] in handled.values():
        owners[partition].add(name)
    assert {"first", "second"} in owners.values()  # a partition really moved with events in hand
    assert sum(len(by) for by in handled.values()) == len(events)


async def test_a_batch_that_never_finishes_holds_a_rebalance_up_only_until_the_revoke_timeout(
        kafka_bootstrap, codec, producer, unique):
    """A hung handler must not keep a partition from its new owner: the revocation gives up after
    revoke_timeout_s, counts it, and the new owner handles the event again (at least once)."""
    from prometheus_client import REGISTRY

    topic = await own_topic(kafka_bootstrap, codec, unique)
    events = [sample_request(f"ch-{unique}-{n}", str(uuid.uuid4())) for n in range(8)]  # keys on both partitions
    for e in events:
        await producer.publish(topic, e)
    hung, released, seen = [], asyncio.Event(), []

    async def hangs(batch):
        hung.extend(batch)
        await released.wait()  # until the end of the test
        return []

    async def records(batch):
        seen.extend(batch)
        return []

    first = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                         handler=hangs, dead_letters=producer, poll_timeout=0.1, max_batch=100, max_in_flight=3,
                         revoke_timeout_s=2)
    second = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                          handler=records, dead_letters=producer, poll_timeout=0.1)
    stop_first = asyncio.Event()
    running_first = asyncio.create_task(first.run(stop_first))
    try:
        await eventually(lambda: _true(len(hung) == len(events)), timeout=30, interval=0.05)
        # The moved partition's events, hung in the first consumer, all handled by the second.
        await run_until(second, lambda: bool(seen) and len(seen) == sum(e.partition == seen[0].partition
                                                                         for e in hung), timeout=60)
    finally:
        released.set()
        stop_first.set()
        await asyncio.wait_for(running_first, 30)
    moved = {e.partition for e in seen}
    assert len(moved) == 1 and {e.value["event_id"] for e in seen} == {
        e.value["event_id"] for e in hung if e.partition in moved}
    assert REGISTRY.get_sample_value("pipeline_revoke_timeouts_total", {"group": f"g-{unique}"}) == 1


async def _true(value) -> bool:
    return bool(value)


@pytest.mark.parametrize("stuck", ["retrying", "hanging"])
async def test_readiness_fails_naming_a_consumer_that_holds_one_batch_too_long(kafka_bootstrap, codec, producer,
                                                                                unique, stuck):
    import httpx
    from prometheus_client import REGISTRY

    from services.common.observability import Health, serve_ops
    from tests.conftest import free_port

    topic = await own_topic(kafka_bootstrap, codec, unique)
    released, seen = asyncio.Event(), []

    async def until_released(events):
        if stuck == "hanging":
            await released.wait()
        elif not released.is_set():
            raise Transient("database down")
        seen.extend(events)
        return []

    loop = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{unique}", topics=[topic], codec=codec,
                        handler=until_released, dead_letters=producer, poll_timeout=0.1)
    health = Health()
    health.add_progress("test_consumer", loop.stalled_for, limit_s=1.0)
    port = free_port()
    runner = await serve_ops(health, "127.0.0.1", port)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))

    async def get(path):
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://127.0.0.1:{port}{path}")
        return answer.status_code, answer.json()

    async def readyz():
        return await get("/readyz")

    group = {"group": f"g-{unique}"}

    def stalled_s() -> float:
        return REGISTRY.get_sample_value("pipeline_consumer_stalled_seconds", group) or 0.0

    def retries() -> float:
        return REGISTRY.get_sample_value("pipeline_consumer_retries_total", {**group, "reason": "transient"}) or 0.0

    try:
        await eventually(lambda: _true(loop.assigned), timeout=30)
        assert await readyz() == (200, {"status": "ok", "failing": []})  # idle is not stalled
        assert stalled_s() == 0
        await producer.publish(topic, sample_request(f"ch-{unique}", str(uuid.uuid4())))
        assert await eventually(lambda: _answer_is(readyz, 503), timeout=30) == (
            503, {"status": "fail", "failing": ["test_consumer"]})
        assert stalled_s() > 1.0
        assert REGISTRY.get_sample_value("pipeline_ready", {"check": "test_consumer"}) == 0
        # Alive all the same: restarting the process would not bring the database back.
        assert await get("/healthz") == (200, {"status": "ok"})
        if stuck == "retrying":
            assert retries() >= 1
        else:  # a handler that never returns is not retried
            assert retries() == 0
        released.set()
        await eventually(lambda: _answer_is(readyz, 200), timeout=30)
        assert len(seen) == 1
        assert stalled_s() == 0
        assert REGISTRY.get_sample_value("pipeline_ready", {"check": "test_consumer"}) == 1
    finally:
        released.set()
        stop.set()
        await asyncio.wait_for(running, 30)
        await runner.cleanup()


async def _answer_is(healthz, status):
    answer = await healthz()
    return answer if answer[0] == status else None


def test_a_partition_revoked_and_assigned_back_in_one_fetch_is_fetched_again_from_its_first_dropped_message():
    """Messages of a partition revoked during a fetch are dropped; if the partition came back in the
    same fetch, the consumer's position is past them and its next batch would commit past them: it is
    fetched again from the earliest dropped one. A partition that went for good is left to its new owner."""
    dropped = [Message(topic="t", partition=1, offset=7), Message(topic="t", partition=1, offset=5),
               Message(topic="t", partition=2, offset=3)]
    points = rewind_points(dropped, assigned_again={("t", 1)})
    assert [(p.topic, p.partition, p.offset) for p in points] == [("t", 1, 5)]
    assert rewind_points(dropped, assigned_again=set()) == []


async def test_an_event_the_producer_refuses_before_sending_is_a_publish_error_not_an_unexpected_one(codec):
    """produce() raises KafkaException itself in some states (an idempotent producer's fatal error):
    retried as a publish failure, never dead-lettered as if the event had caused a bug."""
    producer = EventProducer("127.0.0.1:9", codec, client_id="test")

    class Fatal:
        def produce(self, *args, **kwargs):
            raise KafkaException(KafkaError(KafkaError._FATAL, "fatal idempotent producer error", fatal=True))

        def poll(self, timeout):  # the producer's polling timer outlives the test
            return 0

    producer._producer = Fatal()  # type: ignore[assignment]  # the client's own state cannot be forced
    with pytest.raises(PublishError, match="refused the event"):
        await producer.publish(STK_PUSH_RESULT, {**new_event_fields("shop", "p1"), "outcome": "ACCEPTED",
                                                 "merchant_request_id": None, "checkout_request_id": "ws_CO_1",
                                                 "error_code": None, "error_message": None, "attempts": 1})


async def test_progress_is_committed_at_most_once_an_interval_and_on_stop_whatever_is_left(
        kafka_bootstrap, codec, producer, unique):
    topic = await own_topic(kafka_bootstrap, codec, unique)
    channel = f"ch-{unique}"  # one key: one partition
    group = f"g-{unique}"
    seen: list[ConsumedEvent] = []
    loop = recording_loop(kafka_bootstrap, group, topic, codec, producer, seen)
    loop.commit_interval_s = 3600  # after the first commit, none until the loop stops
    admin = AdminClient(client_config({"bootstrap.servers": kafka_bootstrap}))

    def committed() -> int:
        request = ConsumerGroupTopicPartitions(group)
        result = admin.list_consumer_group_offsets([request])[group].result()
        return sum(max(tp.offset, 0) for tp in result.topic_partitions or [])

    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await producer.publish(topic, sample_request(channel, str(uuid.uuid4())))
    await eventually(lambda: met_async(committed() == 1), timeout=30)  # the first batch: committed at once
    for _ in range(3):
        await producer.publish(topic, sample_request(channel, str(uuid.uuid4())))
    await eventually(lambda: met_async(len(seen) == 4), timeout=30)
    assert committed() == 1  # handled, and left to the next commit
    stop.set()
    await running
    assert committed() == 4  # stopping commits what was handled


async def met_async(value: bool) -> bool:
    return value
