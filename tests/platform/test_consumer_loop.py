"""The Kafka plumbing against the real broker: commit after handling, dead letters, retries, acked publishing."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import pytest

from services.common.kafka import ConsumerLoop, EventProducer, PublishError, Transient, ensure_topics
from services.common.topics import DEAD_LETTER, PAYMENT_REQUESTED, Topic
from tests.conftest import ROOT
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
    seen = []
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, seen), lambda: seen)
    assert [e.value["event_id"] for e in seen] == [event["event_id"]]


async def test_committed_messages_are_not_delivered_again(kafka_bootstrap, codec, producer, unique):
    topic = own_topic(kafka_bootstrap, unique)
    first, second = (sample_request(f"ch-{unique}", str(uuid.uuid4())) for _ in range(2))
    await producer.publish(topic, first)
    seen = []
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, seen), lambda: seen)
    await producer.publish(topic, second)
    seen_after_restart = []
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

    seen = []
    fail = lambda e: ValueError("amount exceeds the channel limit") if e.value["event_id"] == refused["event_id"] else None  # noqa: E731
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
    attempts, seen = [], []

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
    seen, overlaps = [], []
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
    while len(seen) < 6:
        await asyncio.sleep(0.05)
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
