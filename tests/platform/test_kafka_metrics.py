"""Consumer lag and producer metrics, labelled by group and topic."""
from __future__ import annotations

import json
import uuid

from prometheus_client import REGISTRY

from services.common.kafka import (
    ConsumedEvent,
    _forget_lag,
    _record_lag,
    _record_producer_stats,
    ensure_topics,
)
from services.common.topics import Topic
from tests.platform.kafka_helpers import recording_loop, run_until, sample_request


def lag(group: str, topic: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value("pipeline_consumer_lag", {"group": group, "topic": topic,
                                                               "partition": str(partition)})


def test_lag_is_recorded_per_group_topic_and_partition_from_librdkafkas_statistics():
    # librdkafka's statistics: partition -1 is the topic's unassigned queue, -1 a lag not known yet.
    stats = {"topics": {"t.lag": {"partitions": {"0": {"consumer_lag": 7}, "1": {"consumer_lag": -1},
                                                 "-1": {"consumer_lag": 3}}}}}

    _record_lag("group-a", json.dumps(stats))
    _record_lag("group-b", json.dumps({"topics": {"t.lag": {"partitions": {"0": {"consumer_lag": 2}}}}}))

    assert (lag("group-a", "t.lag", 0), lag("group-b", "t.lag", 0)) == (7, 2)
    assert lag("group-a", "t.lag", 1) is None and lag("group-a", "t.lag", -1) is None
    _forget_lag("group-a", [("t.lag", 0), ("t.lag", 5)])  # 5 was never reported
    assert (lag("group-a", "t.lag", 0), lag("group-b", "t.lag", 0)) == (None, 2)


def test_a_producers_queue_is_recorded_per_topic():
    stats = {"client_id": "test-client", "topics": {"t.queue": {"partitions": {
        "0": {"msgq_cnt": 2, "xmit_msgq_cnt": 1}, "-1": {"msgq_cnt": 4, "xmit_msgq_cnt": 0}}}}}

    _record_producer_stats(json.dumps(stats))

    assert REGISTRY.get_sample_value("pipeline_producer_queued_events",
                                     {"client": "test-client", "topic": "t.queue"}) == 7


async def test_a_consumer_reports_its_lag_under_its_group_and_a_producer_its_latency(kafka_bootstrap, codec,
                                                                                     producer, unique):
    topic = Topic(f"test.metrics.{unique}", "payment_requested")
    ensure_topics(kafka_bootstrap, [topic], 1)
    await codec.prepare([topic])  # its subject in the registry, as a service's topics are at start
    published = {"topic": topic.name}
    before = REGISTRY.get_sample_value("pipeline_publish_seconds_count", published) or 0
    for _ in range(3):
        await producer.publish(topic, sample_request(f"ch-{unique}", str(uuid.uuid4())))
    assert REGISTRY.get_sample_value("pipeline_publish_seconds_count", published) == before + 3

    seen: list[ConsumedEvent] = []
    group = f"g-{unique}"
    # Statistics come every 5 s: the loop runs until its group's lag on the partition reads 0.
    await run_until(recording_loop(kafka_bootstrap, group, topic, codec, producer, seen),
                    lambda: len(seen) == 3 and lag(group, topic.name, 0) == 0)
    assert lag(group, topic.name, 0) is None  # given up on close: no value left behind
