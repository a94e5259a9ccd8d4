"""Consumer lag and producer metrics, labelled by group and topic."""
from __future__ import annotations

import json
import uuid

import pytest
from confluent_kafka import KafkaError, TopicPartition
from prometheus_client import REGISTRY

from services.common.kafka import (
    BrokerReachability,
    ConsumedEvent,
    ConsumerLoop,
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


async def _no_handler(events):
    return []


@pytest.fixture
def idle_loop(unique):
    """A consumer loop never run: its rebalance and statistics callbacks are called by the test."""
    loop = ConsumerLoop(bootstrap="127.0.0.1:1", group_id=f"g-{unique}", topics=[], codec=None,  # type: ignore[arg-type]
                        handler=_no_handler, dead_letters=None)  # type: ignore[arg-type]
    yield loop
    loop._consumer.close()


def test_a_revoked_partitions_lag_disappears_and_statistics_taken_before_do_not_bring_it_back(idle_loop):
    group, topic = idle_loop.group_id, "t.revoked"
    stats = json.dumps({"topics": {topic: {"partitions": {"0": {"consumer_lag": 4}, "1": {"consumer_lag": 9}}}}})
    idle_loop._on_assign(idle_loop._consumer, [TopicPartition(topic, 0), TopicPartition(topic, 1)])
    idle_loop._on_statistics(stats)
    assert (lag(group, topic, 0), lag(group, topic, 1)) == (4, 9)

    idle_loop._on_revoke(idle_loop._consumer, [TopicPartition(topic, 1)])
    assert (lag(group, topic, 0), lag(group, topic, 1)) == (4, None)
    idle_loop._on_statistics(stats)  # librdkafka's statistics from before the revocation, served after it
    assert (lag(group, topic, 0), lag(group, topic, 1)) == (4, None)

    assert idle_loop.assigned
    idle_loop._on_lost(idle_loop._consumer, [TopicPartition(topic, 0)])
    assert lag(group, topic, 0) is None
    assert not idle_loop.assigned  # out of the group: not ready until it is assigned again


def brokers(*states: str) -> dict:
    return {"brokers": {f"b{i}": {"state": state, "nodeid": i} for i, state in enumerate(states)}}


def test_a_client_is_connected_while_its_statistics_show_a_broker_up_and_are_fresh():
    now = [100.0]
    reach = BrokerReachability(stale_after_s=15, clock=lambda: now[0])
    assert not reach.connected()  # nothing known yet
    reach.on_statistics(brokers("INIT", "UP"))
    assert reach.connected() and reach.up_since == 100.0
    reach.on_statistics(brokers("DOWN", "CONNECT"))
    assert not reach.connected()
    now[0] = 110.0
    reach.on_statistics(brokers("UP"))
    assert reach.connected() and reach.up_since == 110.0
    reach.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))  # said at once, between statistics
    assert not reach.connected()
    reach.on_statistics(brokers("UP"))
    now[0] = 126.0  # no statistics for longer than stale_after_s: the client is no longer polled
    assert not reach.connected()


@pytest.mark.parametrize("stats", [{}, {"brokers": []}, {"brokers": {"b": "UP"}}, {"brokers": {"b": {}}}])
def test_statistics_without_a_broker_up_prove_no_connection(stats):
    reach = BrokerReachability()
    reach.on_statistics(stats)
    assert not reach.connected()
