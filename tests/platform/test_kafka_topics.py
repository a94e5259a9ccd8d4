"""Topic creation against the real broker: each name once, safe when services start together, the
broker's replication factor unless configured, each topic's settings, an existing topic left as it is."""
from __future__ import annotations

import logging
import threading

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from services.common.kafka import client_config, ensure_topics
from services.common.topic_config import DAY_MS
from services.common.topics import PAYMENT_REQUESTED, Topic


def admin(kafka_bootstrap: str) -> AdminClient:
    return AdminClient(client_config({"bootstrap.servers": kafka_bootstrap}))


def settings_of(kafka_bootstrap: str, name: str) -> dict[str, str | None]:
    client = admin(kafka_bootstrap)  # held until the answer came: a client destroyed fails its futures
    future = client.describe_configs([ConfigResource(ResourceType.TOPIC, name)])
    return {k: e.value for k, e in next(iter(future.values())).result().items()}


def replicas_of(kafka_bootstrap: str, name: str) -> set[int]:
    partitions = admin(kafka_bootstrap).list_topics(name, timeout=10).topics[name].partitions
    return {len(p.replicas) for p in partitions.values()}


def test_a_topic_named_twice_in_one_call_is_created_once(kafka_bootstrap, unique):
    # The same name twice (two Topic values for one topic, as a service's list of topics it reads and
    # writes may hold) once made Kafka answer "Duplicate topic name" to the whole request.
    name = f"test.topics.{unique}"

    ensure_topics(kafka_bootstrap, [Topic(name, "payment_requested"), Topic(name, "payment_requested"),
                                    Topic(name, "other")], 1)

    assert name in admin(kafka_bootstrap).list_topics(timeout=10).topics


def test_services_creating_the_same_topics_at_once_all_start(kafka_bootstrap, unique):
    # Four services starting together on a fresh broker: every one lists the topics missing, every one
    # asks to create them; the broker creates each once and answers the others that it exists.
    names = [Topic(f"test.topics.{unique}.{i}", "payment_requested") for i in range(3)]
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def service() -> None:
        start.wait()
        try:
            ensure_topics(kafka_bootstrap, names, 2)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=service) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert failures == []
    existing = admin(kafka_bootstrap).list_topics(timeout=10).topics
    assert all(len(existing[t.name].partitions) == 2 for t in names)


def test_a_new_topic_has_the_brokers_replication_factor_and_its_own_settings(kafka_bootstrap, unique):
    name = f"mpesa.upstream.test{unique}.payment-requested.v1"  # an upstream producer's topic

    ensure_topics(kafka_bootstrap, [Topic(name, PAYMENT_REQUESTED.schema)], 1)

    assert replicas_of(kafka_bootstrap, name) == {1}  # the local broker's default.replication.factor
    settings = settings_of(kafka_bootstrap, name)
    assert settings["retention.ms"] == str(4 * DAY_MS)
    assert settings["cleanup.policy"] == "delete"
    assert settings["unclean.leader.election.enable"] == "false"


def test_configured_settings_win_over_a_topics_defaults(kafka_bootstrap, unique):
    name = f"mpesa.upstream.test{unique}.payment-requested.v1"
    overrides = {"*": {"retention.ms": str(2 * DAY_MS), "max.message.bytes": "200000"},
                 "mpesa.upstream.*": {"retention.ms": str(3 * DAY_MS)}}

    ensure_topics(kafka_bootstrap, [Topic(name, PAYMENT_REQUESTED.schema)], 1, overrides=overrides)

    settings = settings_of(kafka_bootstrap, name)
    assert (settings["retention.ms"], settings["max.message.bytes"]) == (str(3 * DAY_MS), "200000")


def test_a_replication_factor_the_cluster_cannot_meet_is_refused(kafka_bootstrap, unique):
    # One broker cannot hold three replicas: the service stops at start rather than run on a topic
    # that is not what it was told to make.
    name = f"test.topics.{unique}"

    with pytest.raises(Exception, match="(?i)replication"):
        ensure_topics(kafka_bootstrap, [Topic(name, "payment_requested")], 1, replication_factor=3)

    assert name not in admin(kafka_bootstrap).list_topics(timeout=10).topics


def test_an_existing_topic_whose_settings_differ_is_reported_and_left_as_it_is(kafka_bootstrap, unique, caplog):
    name = f"mpesa.upstream.test{unique}.payment-requested.v1"
    client = admin(kafka_bootstrap)
    next(iter(client.create_topics([NewTopic(name, 1, 1, config={"retention.ms": "3600000"})]).values())).result()

    with caplog.at_level(logging.WARNING, logger="services.common.kafka"):
        ensure_topics(kafka_bootstrap, [Topic(name, PAYMENT_REQUESTED.schema)], 1)

    reported = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert any(f"retention.ms=3600000 where this service would create it with {4 * DAY_MS}" in m for m in reported)
    assert settings_of(kafka_bootstrap, name)["retention.ms"] == "3600000"
