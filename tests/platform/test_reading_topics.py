"""Ordinary tools read every topic without this repo's code: a message the services' own producer wrote
is decoded by (a) Debian's kcat fetching it and Apache avro-tools decoding it with the writer schema
from the registry (README, "Reading the topics": the same commands), and (b) confluent-kafka's
AvroDeserializer with a SchemaRegistryClient; the decoded fields must equal what was written.

Debian's kcat is built without Avro support, so `kcat -s value=avro -r <registry>` cannot be the
decoder (docs/schema-registry.md); test_debian_kcat_has_no_avro_support pins that fact, so the day it
changes this file is to be revisited.
"""
from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from services.common.avro import SCHEMA_DIR, Codec
from services.common.kafka import EventProducer, ensure_topics
from services.common.schema_registry import SchemaRegistry
from services.common.topics import ALL_TOPICS, Topic
from tests.platform.test_schemas import comparable, load_sample
from tests.platform.topic_readers import (
    ROOT,
    admin_login,
    avro_json,
    end_offsets,
    find_with_deserializer,
    read_with_kcat_and_avro_tools,
    tools_env,
)


@pytest.fixture(scope="module")
def tools(infra) -> dict[str, str]:
    return tools_env()


@pytest.fixture(scope="module")
def registry_url(infra) -> str:
    return infra["SCHEMA_REGISTRY_URL"]


@pytest.fixture(scope="module")
def kafka_login(infra) -> dict[str, str]:
    return admin_login(infra)


def test_the_kcat_config_holding_the_password_is_readable_by_its_owner_only(infra):
    # A .tmp left by an interrupted run keeps its mode through a shell redirect: it must not make the
    # file that holds the admin password readable by others.
    conf = tools_env()["KCAT_CONFIG"]
    leftover = Path(conf + ".tmp")
    leftover.write_text("")
    leftover.chmod(0o644)
    conf = tools_env()["KCAT_CONFIG"]
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600


def test_debian_kcat_has_no_avro_support(tools):
    done = subprocess.run([tools["KCAT"], "-F", tools["KCAT_CONFIG"], "-C", "-t", "x", "-s", "value=avro",
                           "-r", "http://127.0.0.1:9/", "-e"], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "lacks Avro/Schema-Registry support" in done.stderr


def test_the_readers_read_what_confluent_kafkas_own_serializer_wrote(tools, registry_url, kafka_login, unique,
                                                                     tmp_path):
    """The harness itself, on a topic and schema of its own: a tool that fails here fails everywhere."""
    topic = f"test.readers.{unique}"
    schema = {"type": "record", "name": "Probe", "namespace": "test.readers",
              "fields": [{"name": "event_id", "type": "string"}, {"name": "note", "type": ["null", "string"]},
                         {"name": "amount", "type": "long"}]}
    ensure_topics(kafka_login["bootstrap.servers"], [Topic(topic, "unused")], 1)
    event_id = str(uuid.uuid4())
    record = {"event_id": event_id, "note": "written by AvroSerializer", "amount": 1500}
    serialize = AvroSerializer(SchemaRegistryClient({"url": registry_url}), json.dumps(schema))
    producer = Producer(kafka_login)
    producer.produce(topic, serialize(record, SerializationContext(topic, MessageField.VALUE)))
    assert producer.flush(30) == 0

    partition, offset, decoded = find_with_deserializer(kafka_login, registry_url, topic, {0: 0}, event_id)
    assert decoded == record
    assert read_with_kcat_and_avro_tools(tools, registry_url, topic, partition, offset, tmp_path) \
        == avro_json(schema, record)


async def write_as_the_services_do(login, registry_url: str, topic: Topic, record: dict) -> None:
    registry = SchemaRegistry(registry_url)
    codec = Codec(registry=registry)
    await codec.prepare([topic])
    producer = EventProducer(login["bootstrap.servers"], codec, client_id="reading-topics-test")
    try:
        await producer.publish(topic, record)
    finally:
        producer.close()
        await registry.close()


@pytest.mark.parametrize("topic", ALL_TOPICS, ids=lambda t: t.name)
def test_every_topic_reads_with_ordinary_tools(topic, tools, registry_url, kafka_login, tmp_path):
    """The services' own producer and codec (registry-backed, Confluent framing) write a sample."""
    record = {**load_sample(topic.schema), "event_id": str(uuid.uuid4())}
    start = end_offsets(kafka_login, topic.name)

    asyncio.run(write_as_the_services_do(kafka_login, registry_url, topic, record))

    partition, offset, decoded = find_with_deserializer(kafka_login, registry_url, topic.name, start,
                                                        record["event_id"])
    assert comparable(decoded) == record
    schema = json.loads((SCHEMA_DIR / f"{topic.schema}.avsc").read_text())
    assert read_with_kcat_and_avro_tools(tools, registry_url, topic.name, partition, offset, tmp_path) \
        == avro_json(schema, record)


def readme_block(language: str, after: str) -> str:
    """The first ```language block after `after` in README's "Reading the topics"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reading the topics"):]
    section = section[:section.index("\n## ", 1)]
    return section[section.index(after):].split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_readmes_commands_read_a_topic(infra, tools, registry_url, kafka_login, unique, tmp_path):
    """README's own kcat + avro-tools and Python blocks, run as written on a topic of the test's own
    (one partition, one message the services' code wrote), only the topic name swapped."""
    topic = Topic(f"test.readme.{unique}", "payment_status")
    ensure_topics(kafka_login["bootstrap.servers"], [topic], 1)
    record = {**load_sample("payment_status"), "event_id": str(uuid.uuid4())}
    asyncio.run(write_as_the_services_do(kafka_login, registry_url, topic, record))
    env = {"PATH": "/usr/bin:/bin", **tools, **infra, "SCHEMA_REGISTRY_URL": registry_url}

    shell = readme_block("sh", "**kcat and avro-tools.**").replace("mpesa.payment.status.v1", topic.name)
    assert topic.name in shell
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", shell], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    *decoded, listing = done.stdout.strip().splitlines()
    schema = json.loads((SCHEMA_DIR / "payment_status.avsc").read_text())
    assert json.loads("\n".join(line for line in decoded if not line.startswith("%"))) == avro_json(schema, record)
    assert listing.split()[:3] == ["0", "0", record["channel_id"]]

    python = readme_block("python", "**Python**").replace("mpesa.payment.status.v1", topic.name)
    python = python.replace("poll(10)", "poll(3)")  # it runs until the topic is quiet that long
    assert topic.name in python
    done = subprocess.run([sys.executable, "-c", python], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{topic.name} 0 0 " in done.stdout and record["event_id"] in done.stdout
