"""The settings each topic is created with, and KAFKA_TOPIC_CONFIGS (pure: no broker)."""
from __future__ import annotations

import pytest

from services.common import config
from services.common.topic_config import DAY_MS, configs_for, differences, parse_topic_configs
from services.common.topics import (
    ACCESS,
    ALL_TOPICS,
    CALLBACK_RAW,
    CALLBACK_REJECTED,
    DEAD_LETTER,
    OPERATOR_COMMAND,
    PAYMENT_STATUS,
    upstream_requested_topic,
)
from services.ledger.settings import SETTINGS, LedgerConfig


@pytest.mark.parametrize(("topic", "retention_days"), [
    (CALLBACK_RAW.name, 4), (PAYMENT_STATUS.name, 14), (DEAD_LETTER.name, 7), (CALLBACK_REJECTED.name, 3),
    (OPERATOR_COMMAND.name, 7), (upstream_requested_topic("shop-erp").name, 4), ("bench.requested", None)])
def test_each_topic_is_deleted_never_compacted_and_kept_as_long_as_its_readers_need(topic, retention_days):
    configs = configs_for(topic, None, {})
    assert configs["cleanup.policy"] == "delete"
    assert configs["unclean.leader.election.enable"] == "false"
    assert configs.get("retention.ms") == (str(retention_days * DAY_MS) if retention_days else None)
    assert "min.insync.replicas" not in configs  # the broker's: one local node has one replica


def test_the_topics_the_ledger_reads_are_kept_less_long_than_it_remembers_processed_events():
    # A redelivery the broker can still make must be one the ledger still recognises.
    remembered_days = next(s.default for s in SETTINGS if s.env == "LEDGER_PROCESSED_RETENTION_DAYS")
    for topic in ACCESS["ledger"].reads:
        assert int(configs_for(topic.name, None, {})["retention.ms"]) < remembered_days * DAY_MS


def test_every_topic_of_the_pipeline_has_defaults_of_its_own():
    assert all("retention.ms" in configs_for(t.name, None, {}) for t in ALL_TOPICS)


def test_three_replicas_or_more_need_two_in_sync():
    assert configs_for(CALLBACK_RAW.name, 3, {})["min.insync.replicas"] == "2"
    assert "min.insync.replicas" not in configs_for(CALLBACK_RAW.name, 2, {})


def test_the_most_specific_override_wins():
    overrides = parse_topic_configs("*:min.insync.replicas=2,retention.ms=1000; mpesa.dead-letter.v1:retention.ms=5000")
    assert configs_for(DEAD_LETTER.name, None, overrides)["retention.ms"] == "5000"
    assert configs_for(CALLBACK_RAW.name, None, overrides)["retention.ms"] == "1000"
    three = parse_topic_configs("*:min.insync.replicas=3")
    assert configs_for(CALLBACK_RAW.name, 3, three)["min.insync.replicas"] == "3"
    upstream = parse_topic_configs("mpesa.upstream.*:retention.ms=9")
    assert configs_for(upstream_requested_topic("p").name, None, upstream)["retention.ms"] == "9"


@pytest.mark.parametrize(("raw", "reason"), [
    ("mpesa.payment.status:retention.ms=1", "none of the pipeline's topics"),  # a typo
    ("*:cleanup.policy=compact", "cannot be set"),
    ("*:unclean.leader.election.enable=true", "cannot be set"),
    ("*:retention.ms", "key=value"),
    ("*:retention.ms=1 2", "key=value"),
    ("*:Retention.ms=1", "key=value"),
    ("*:retention.ms=1\x00", "key=value"),
    ("*", "topic:key=value"),
    ("*:retention.ms=1;*:retention.ms=2", "listed twice"),
])
def test_a_bad_topic_setting_is_refused_at_start(raw, reason):
    with pytest.raises(config.ConfigError, match=reason):
        config.load([config.TOPIC_CONFIGS], {"KAFKA_TOPIC_CONFIGS": raw})


def test_unset_means_the_defaults_and_the_brokers_replication_factor():
    values = config.load([config.TOPIC_CONFIGS, config.TOPIC_REPLICATION_FACTOR], {})
    assert values == {"KAFKA_TOPIC_CONFIGS": {}, "KAFKA_TOPIC_REPLICATION_FACTOR": None}


def test_differences_name_only_the_settings_that_differ():
    assert differences({"retention.ms": "5", "cleanup.policy": "delete"},
                       {"retention.ms": "7", "cleanup.policy": "delete", "other": "x"}) == {"retention.ms": ("7", "5")}


@pytest.mark.parametrize(("env", "reason"), [
    ({"KAFKA_TOPIC_CONFIGS": "*:retention.ms=-1"}, "kept forever"),
    ({"KAFKA_TOPIC_CONFIGS": f"{CALLBACK_RAW.name}:retention.ms={60 * DAY_MS}"}, "60 days"),
    ({"LEDGER_PROCESSED_RETENTION_DAYS": "5"}, "7 days"),
])
def test_the_ledger_refuses_to_start_if_a_topic_it_reads_outlives_what_it_remembers(env, reason):
    # A redelivery of an event whose id the ledger has forgotten would be applied as a new fact.
    with pytest.raises(config.ConfigError, match=f"{reason}.*LEDGER_PROCESSED_RETENTION_DAYS"):
        config.load_into(LedgerConfig, SETTINGS, {"DATABASE_URL": "postgresql://ledger@127.0.0.1/mpesa", **env})


def test_the_ledger_starts_with_a_longer_memory_and_a_shorter_retention():
    env = {"DATABASE_URL": "postgresql://ledger@127.0.0.1/mpesa", "LEDGER_PROCESSED_RETENTION_DAYS": "90",
           "KAFKA_TOPIC_CONFIGS": f"*:retention.ms={60 * DAY_MS};{CALLBACK_RAW.name}:retention.ms=3600000"}
    assert config.load_into(LedgerConfig, SETTINGS, env).ledger_processed_retention_days == 90
