"""The Kafka plumbing against the real broker: commit after handling, dead letters, retries, acked publishing."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import pytest

from services.common.kafka import ConsumedEvent, ConsumerLoop, EventProducer, PublishError, Transient, ensure_topics
from services.common.topics import DEAD_LETTER, PAYMENT_REQUESTED, Topic
from tests.conftest import ROOT, eventually
from tests.platform.kafka_helpers import end_offsets, read_all, recording_loop, run_until, sample_request


def own_topic(kafka_bootstrap: str, unique: str) -> Topic:
    topic = Topic(f"test.loop.{unique}", "payment_requested")
    ensure_topics(kafka_bootstrap, [topic], 2)
    return topic


async def test_a_consumer_killed_before_commit_gets_the_message_again(kafka_bootstrap, codec, producer, unique,
                                                                       tmp_path):
    topic = own_topic(kafka_bootstrap, unique)
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
    topic = own_topic(kafka_bootstrap, unique)
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
    topic = own_topic(kafka_bootstrap, unique)
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
        ("DecodeError", b"this is not avro"), ("ValueError", codec.encode("payment_requested", refused))]
    assert records[1]["error"] == "amount exceeds the channel limit"
    assert all(r["consumer_group"] == f"g-{unique}" and r["original_key"] == channel.encode() for r in records)
    assert [e.value["event_id"] for e in seen] == [good["event_id"]]


async def test_a_transient_failure_is_retried_not_dead_lettered(kafka_bootstrap, codec, producer, unique):
    topic = own_topic(kafka_bootstrap, unique)
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
    assert good._outstanding == 0 and good._polling is None  # nothing left to poll for
    good.close()

    broken = EventProducer("127.0.0.1:9", codec, client_id="test", delivery_timeout_ms=300, linger_ms=1)
    with pytest.raises(PublishError):
        await broken.publish(PAYMENT_REQUESTED, records[0])
    broken.close(timeout=1)


def overlap_tracking_loop(kafka_bootstrap, group, topic, codec, producer, seen, overlaps):
    """A loop of two batches of at most 10 in flight that runs a batch beside another only when it
    is full (the consumer is behind); records how many batches were running whenever one started."""
    running = 0

    async def handler(events):
        nonlocal running
        running += 1
        overlaps.append(running)
        await asyncio.sleep(0.2)  # a batch's database work
        seen.extend(events)
        running -= 1
        return []

    return ConsumerLoop(bootstrap=kafka_bootstrap, group_id=group, topics=[topic], codec=codec, handler=handler,
                        dead_letters=producer, max_batch=10, max_in_flight=2, overlap_from=10,
                        poll_timeout=0.1)


async def test_batches_overlap_only_while_the_consumer_is_behind(kafka_bootstrap, codec, producer, unique):
    topic = own_topic(kafka_bootstrap, unique)
    backlog = [sample_request(f"ch-{unique}", str(uuid.uuid4())) for _ in range(60)]
    await asyncio.gather(*(producer.publish(topic, e) for e in backlog))
    seen: list[ConsumedEvent] = []
    overlaps: list[int] = []
    loop = overlap_tracking_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, seen, overlaps)
    await run_until(loop, lambda: len(seen) == 60)
    assert max(overlaps) == 2  # full batches: two at once

    seen, overlaps = [], []
    loop = overlap_tracking_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, seen, overlaps)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    for _ in range(6):  # one at a time: small batches
        await producer.publish(topic, sample_request(f"ch-{unique}", str(uuid.uuid4())))
        await asyncio.sleep(0.05)
    await eventually(lambda: _at_least(seen, 6))
    stop.set()
    await running
    assert max(overlaps) == 1


async def test_a_batch_published_together_arrives_in_order(kafka_bootstrap, codec, unique):
    topic = own_topic(kafka_bootstrap, unique)
    producer = EventProducer(kafka_bootstrap, codec, client_id="test", linger_ms=1)
    records = [sample_request(f"ch-{unique}", str(uuid.uuid4())) for _ in range(50)]
    await producer.publish_many([(topic, r["channel_id"].encode(), codec.encode(topic.schema, r)) for r in records])
    await producer.publish_many([])
    producer.close()
    messages = read_all(kafka_bootstrap, topic.name, lambda m: True, expected=50)
    assert [codec.decode(m.value())[1]["event_id"] for m in messages] == [r["event_id"] for r in records]


async def test_an_event_that_keeps_failing_is_dead_lettered_after_the_budget_and_the_rest_is_handled_in_order(
        kafka_bootstrap, codec, producer, unique):
    topic = own_topic(kafka_bootstrap, unique)
    channel = f"ch-{unique}"  # one key: one partition, one order
    events = [sample_request(channel, str(uuid.uuid4())) for _ in range(12)]
    poison = events[7]
    mark = end_offsets(kafka_bootstrap, DEAD_LETTER.name)
    await producer.publish_many([(topic, channel.encode(), codec.encode(topic.schema, e)) for e in events])
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
        ("RuntimeError", "unexpected\\u000afailure\\u001b[2J", codec.encode(topic.schema, poison))]
    again: list[ConsumedEvent] = []  # handled and dead-lettered count as done: committed, not delivered again
    await producer.publish(topic, sample_request(channel, str(uuid.uuid4())))
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, again), lambda: again)
    assert len(again) == 1


async def test_transient_failures_never_use_up_the_poison_budget(kafka_bootstrap, codec, producer, unique):
    topic = own_topic(kafka_bootstrap, unique)
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
    from services.common.kafka import ConsumedEvent, per_event

    async def handle(event):
        if event.offset == 1:
            raise ConnectionResetError("database connection lost")
        if event.offset == 2:
            raise ValueError("not a payment")

    handler = per_event(handle, is_transient=lambda exc: isinstance(exc, ConnectionResetError))
    events = [ConsumedEvent("t", 0, n, None, "payment_requested", {}) for n in range(3)]
    with pytest.raises(Transient, match="ConnectionResetError") as raised:
        await handler(events)
    assert isinstance(raised.value.__cause__, ConnectionResetError)
    rejections = await handler([events[0], events[2]])
    assert [(r.event.offset, type(r.error).__name__) for r in rejections] == [(2, "ValueError")]


@pytest.mark.parametrize("stuck", ["retrying", "hanging"])
async def test_readiness_fails_naming_a_consumer_that_holds_one_batch_too_long(kafka_bootstrap, codec, producer,
                                                                                unique, stuck):
    import httpx

    from services.common.observability import Health, serve_ops
    from tests.conftest import free_port

    topic = own_topic(kafka_bootstrap, unique)
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

    async def healthz():
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://127.0.0.1:{port}/healthz")
        return answer.status_code, answer.json()

    try:
        await asyncio.sleep(2)
        assert await healthz() == (200, {"status": "ok", "failing": []})  # idle is not stalled
        await producer.publish(topic, sample_request(f"ch-{unique}", str(uuid.uuid4())))
        assert await eventually(lambda: _answer_is(healthz, 503), timeout=30) == (
            503, {"status": "fail", "failing": ["test_consumer"]})
        released.set()
        await eventually(lambda: _answer_is(healthz, 200), timeout=30)
        assert len(seen) == 1
    finally:
        released.set()
        stop.set()
        await asyncio.wait_for(running, 30)
        await runner.cleanup()


async def _at_least(items: list, count: int) -> bool:
    return len(items) >= count


async def _answer_is(healthz, status):
    answer = await healthz()
    return answer if answer[0] == status else None
