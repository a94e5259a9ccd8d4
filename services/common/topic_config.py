"""The settings each topic is created with: defaults per topic, overrides from KAFKA_TOPIC_CONFIGS, and
how an existing topic differs from them. Pure: services.common.kafka.ensure_topics does the I/O.
docs/kafka-topics.md gives the reasoning and README's topic table the values."""
from __future__ import annotations

import re
from collections.abc import Mapping

from services.common.topics import (
    CALLBACK_RAW,
    CALLBACK_REJECTED,
    DEAD_LETTER,
    OPERATOR_COMMAND,
    PAYMENT_REQUESTED,
    PAYMENT_STATUS,
    STK_PUSH_RESULT,
    STK_QUERY_REQUESTED,
    STK_QUERY_RESULT,
    UPSTREAM_PREFIX,
)

DAY_MS = 24 * 3600 * 1000
ALL = "*"
UPSTREAM = f"{UPSTREAM_PREFIX}*"  # every upstream producer's topic

# Every topic carries events that move money or prove it moved: none may be compacted away (they are
# keyed by channel, so compaction would keep one event per channel) or lost to an unclean election.
_EVERY_TOPIC = {"cleanup.policy": "delete", "unclean.leader.election.enable": "false"}
# Facts the ledger consumes carry payers' data in clear (the phone, or a CheckoutRequestID ending in
# it): kept 4 days, long enough for a consumer down over a four-day holiday weekend, short for the
# data (schemas/README.md, "Personal data"), and below LEDGER_PROCESSED_RETENTION_DAYS (30), so that
# a redelivery the broker can still make is one the ledger still recognises (docs/kafka-topics.md §2).
_LEDGER_INPUT = {**_EVERY_TOPIC, "retention.ms": str(4 * DAY_MS)}
# Operators' instructions name no payer: Kafka's own default, written down.
_OPERATOR_INPUT = {**_EVERY_TOPIC, "retention.ms": str(7 * DAY_MS)}

DEFAULTS: dict[str, dict[str, str]] = {
    PAYMENT_REQUESTED.name: _LEDGER_INPUT,
    STK_PUSH_RESULT.name: _LEDGER_INPUT,
    CALLBACK_RAW.name: _LEDGER_INPUT,
    STK_QUERY_RESULT.name: _LEDGER_INPUT,
    STK_QUERY_REQUESTED.name: _LEDGER_INPUT,  # the STK worker's input: as long, for a worker down a while
    PAYMENT_STATUS.name: {**_EVERY_TOPIC, "retention.ms": str(14 * DAY_MS)},
    # Raw callbacks refused at the edge move no money; their metrics alert at once, and 3 days of them
    # is enough to see a forgery's pattern.
    CALLBACK_REJECTED.name: {**_EVERY_TOPIC, "retention.ms": str(3 * DAY_MS)},
    # Each dead letter waits for an operator to look and replay (docs/poison.md): a week covers a
    # holiday and the fix of what refused it.
    DEAD_LETTER.name: {**_EVERY_TOPIC, "retention.ms": str(7 * DAY_MS)},
    OPERATOR_COMMAND.name: _OPERATOR_INPUT,
    UPSTREAM: _LEDGER_INPUT,
}
# With three replicas or more, two must have an event before it counts as acknowledged (acks=all):
# Kafka's documentation's own recipe. Below three it is left to the broker (one node has one replica).
MIN_INSYNC_FROM_REPLICAS = 3

_KEY = re.compile(r"[a-z][a-z0-9.]{0,62}[a-z0-9]")
_VALUE = re.compile(r"[A-Za-z0-9._,-]{1,64}")
# Decided by the code, or not topic settings at all: creating a topic with them would change what
# this module promises (delete, never compact; no unclean election), or they are set elsewhere.
_NOT_SETTABLE = {"cleanup.policy", "unclean.leader.election.enable"}


def key_of(topic: str) -> str:
    """The DEFAULTS entry a topic name falls under (an upstream producer's topic under UPSTREAM)."""
    if topic in DEFAULTS:
        return topic
    if topic.startswith(UPSTREAM_PREFIX):
        return UPSTREAM
    return ALL  # a topic of a test or a benchmark: the settings every topic has


def parse_topic_configs(raw: str) -> dict[str, dict[str, str]]:
    """`*:min.insync.replicas=2;mpesa.payment.status.v1:retention.ms=2592000000` -> {topic: {key: value}};
    `*` is every topic, `mpesa.upstream.*` every upstream producer's. A topic this code does not
    create, a malformed key or value, or a setting the code decides is refused: a typo must not be
    a setting silently not applied."""
    overrides: dict[str, dict[str, str]] = {}
    for entry in filter(None, (e.strip() for e in raw.split(";"))):
        topic, sep, settings = entry.partition(":")
        topic = topic.strip()
        if not sep or not settings.strip():
            raise ValueError("must be topic:key=value[,key=value...][;topic:...]")
        if topic != ALL and topic not in DEFAULTS:
            raise ValueError(f"{topic} is none of the pipeline's topics (nor * or {UPSTREAM})")
        if topic in overrides:
            raise ValueError(f"{topic} is listed twice")
        overrides[topic] = dict(_setting(item, topic) for item in settings.split(","))
    return overrides


def _setting(item: str, topic: str) -> tuple[str, str]:
    key, sep, value = (part.strip() for part in item.partition("="))
    if not sep or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
        raise ValueError(f"{topic}: each setting must be key=value (Kafka's topic configuration names)")
    if key in _NOT_SETTABLE:
        raise ValueError(f"{topic}: {key} cannot be set: every topic has it {_EVERY_TOPIC[key]}")
    return key, value


def configs_for(topic: str, replication_factor: int | None,
                overrides: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """What `topic` is created with: its defaults, then min.insync.replicas for a replication factor
    that allows two, then the overrides for every topic, then those for its own kind (most specific wins)."""
    key = key_of(topic)
    configs = dict(DEFAULTS.get(key, _EVERY_TOPIC))
    if replication_factor is not None and replication_factor >= MIN_INSYNC_FROM_REPLICAS:
        configs["min.insync.replicas"] = "2"
    configs.update(overrides.get(ALL, {}))
    if key != ALL:
        configs.update(overrides.get(key, {}))
    return configs


def differences(wanted: Mapping[str, str], actual: Mapping[str, str | None]) -> dict[str, tuple[str | None, str]]:
    """{key: (the topic's value, the wanted one)} for each wanted setting the topic has otherwise."""
    return {k: (actual.get(k), v) for k, v in sorted(wanted.items()) if actual.get(k) != v}
