"""Small helpers for tests that drive the consumer loop on topics of their own."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from services.common.avro import Codec
from services.common.kafka import ConsumedEvent, ConsumerLoop, EventProducer, Rejection, client_config
from services.common.topics import Topic


def sample_request(channel_id: str, payment_id: str) -> dict:
    from services.common.kafka import new_event_fields
    return {**new_event_fields(channel_id, payment_id), "amount": 10, "phone": "254712345678",
            "account_reference": "T1", "description": None, "order_reference": None,
            "idempotency_key": None, "metadata": {}, "source": "TOPIC"}


async def run_until(loop: ConsumerLoop, done: Callable[[], object], timeout: float = 30.0) -> None:
    """Runs a consumer loop until done() holds (or fails at the deadline), then stops it gracefully."""
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while not done():
            if task.done():
                task.result()
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("consumer did not get there in time")
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def recording_loop(bootstrap: str, group: str, topic: Topic, codec: Codec, producer: EventProducer,
                   seen: list[ConsumedEvent], fail: Callable[[ConsumedEvent], Exception | None] = lambda e: None
                   ) -> ConsumerLoop:
    async def handler(events: list[ConsumedEvent]) -> list[Rejection]:
        rejections = []
        for e in events:
            error = fail(e)
            if error is None:
                seen.append(e)
            else:
                rejections.append(Rejection(e, error))
        return rejections

    return ConsumerLoop(bootstrap=bootstrap, group_id=group, topics=[topic], codec=codec,
                        handler=handler, dead_letters=producer, poll_timeout=0.1)


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Where each partition ends now: read from here to see only what a test caused."""
    consumer = Consumer(client_config({"bootstrap.servers": bootstrap, "group.id": "offsets-probe",
                                        "enable.auto.commit": False}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: _high_watermark(consumer, TopicPartition(topic, p)) for p in partitions}
    finally:
        consumer.close()


# Right after a topic is created (a fresh broker: the first test of a run) its partitions may not have a
# leader yet; the broker says so and is asked again, for at most this long.
_LEADERLESS = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
LEADER_WAIT_S = 30.0


def _high_watermark(consumer: Consumer, partition: TopicPartition) -> int:
    deadline = time.monotonic() + LEADER_WAIT_S
    while True:
        try:
            return consumer.get_watermark_offsets(partition, timeout=10)[1]
        except KafkaException as exc:
            if exc.args[0].code() not in _LEADERLESS or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def start_group_at_end(bootstrap: str, group: str, topics: list[str]) -> None:
    """Commits the current end of every partition for a new group, so a service started with it
    handles only what a test publishes from now on (not every earlier test's events)."""
    consumer = Consumer(client_config({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}))
    try:
        consumer.commit(offsets=[TopicPartition(t, p, end) for t in topics
                                 for p, end in end_offsets(bootstrap, t).items()], asynchronous=False)
    finally:
        consumer.close()


def read_all(bootstrap: str, topic: str, predicate, expected: int, since: dict[int, int] | None = None,
             timeout_polls: int = 60) -> list:
    """Messages of `topic` matching predicate, from `since` offsets (default: the beginning)."""
    consumer = Consumer(client_config({"bootstrap.servers": bootstrap, "group.id": "reader",
                                       "enable.auto.commit": False}))
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, (since or {}).get(p, -2)) for p in partitions])  # -2: beginning
    found = []
    try:
        for _ in range(timeout_polls):
            for msg in consumer.consume(500, 0.5):
                if msg.error() is None and predicate(msg):
                    found.append(msg)
            if len(found) >= expected:
                break
    finally:
        consumer.close()
    return found
