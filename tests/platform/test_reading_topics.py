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
import io
import json
import subprocess
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro import json_writer, parse_schema

from services.common.avro import SCHEMA_DIR, Codec
from services.common.kafka import EventProducer, ensure_topics
from services.common.schema_registry import SchemaRegistry
from services.common.topics import ALL_TOPICS, Topic
from tests.platform.test_schemas import comparable, load_sample

ROOT = Path(__file__).resolve().parents[2]
READ_TIMEOUT_S = 30
# README's recipe: kcat fetches one raw message; its first five bytes are the Confluent header (0, then
# the schema id, big-endian), the rest an Avro body that avro-tools decodes with the writer's schema.
# (Apicurio's ccompat API has no /schemas/ids/<id>/schema, so the schema text is taken from the JSON.)
KCAT_AND_AVRO_TOOLS = r"""
set -euo pipefail
"$KCAT" -F "$KCAT_CONFIG" -q -C -t "$TOPIC" -p "$PARTITION" -o "$OFFSET" -c 1 -e -f '%s' > "$WORK/msg.bin"
[ "$(head -c1 "$WORK/msg.bin" | od -An -tu1 | tr -d ' ')" = 0 ] || { echo "not Confluent framing" >&2; exit 1; }
id=$(head -c5 "$WORK/msg.bin" | tail -c4 | od -An -tu4 --endian=big | tr -d ' ')
curl -sf "$SCHEMA_REGISTRY_URL/schemas/ids/$id" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["schema"])' > "$WORK/writer.avsc"
tail -c +6 "$WORK/msg.bin" \
  | java -jar "$AVRO_TOOLS" fragtojson --no-pretty --schema-file "$WORK/writer.avsc" - 2>/dev/null
"""


@pytest.fixture(scope="module")
def tools(infra) -> dict[str, str]:
    """KCAT, KCAT_CONFIG and AVRO_TOOLS (infra/tools.sh env; infra/up.sh installed them)."""
    out = subprocess.run(["bash", str(ROOT / "infra/tools.sh"), "env"], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.fixture(scope="module")
def registry_url(infra) -> str:
    return infra["SCHEMA_REGISTRY_URL"]


@pytest.fixture(scope="module")
def kafka_login(infra) -> dict[str, str]:
    """The admin's librdkafka settings, spelled out as a reader outside this repo would (README)."""
    return {"bootstrap.servers": infra["KAFKA_BOOTSTRAP_SERVERS"], "security.protocol": "SASL_SSL",
            "sasl.mechanisms": "SCRAM-SHA-512", "ssl.ca.location": infra["KAFKA_CLIENT_SSL_CA_LOCATION"],
            "sasl.username": infra["KAFKA_CLIENT_SASL_USERNAME"],
            "sasl.password": Path(infra["KAFKA_CLIENT_SASL_PASSWORD_FILE"]).read_text().strip()}


def read_with_kcat_and_avro_tools(tools, registry_url, topic: str, partition: int, offset: int,
                                  work: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", **tools, "SCHEMA_REGISTRY_URL": registry_url, "TOPIC": topic,
           "PARTITION": str(partition), "OFFSET": str(offset), "WORK": str(work)}
    done = subprocess.run(["bash", "-c", KCAT_AND_AVRO_TOOLS], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"kcat | avro-tools failed: {done.stderr[-2000:]}"
    return json.loads(done.stdout)


def avro_json(schema: dict, record: dict) -> dict:
    """The record in Avro's JSON encoding (unions tagged by branch), as avro-tools prints it; made by
    fastavro from the schema, not by this repo's code."""
    out = io.StringIO()
    json_writer(out, parse_schema(schema), [record])
    return json.loads(out.getvalue())


def find_with_deserializer(login, registry_url, topic: str, start: dict[int, int], event_id: str
                           ) -> tuple[int, int, dict]:
    """(partition, offset, record) of the message with `event_id`, read from `start` on by a plain
    consumer and confluent-kafka's AvroDeserializer."""
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": registry_url}))
    context = SerializationContext(topic, MessageField.VALUE)
    consumer = Consumer({**login, "group.id": f"reader-{uuid.uuid4()}", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])
        for _ in range(READ_TIMEOUT_S * 2):
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            record = deserialize(msg.value(), context)
            if record["event_id"] == event_id:
                return msg.partition(), msg.offset(), record
    finally:
        consumer.close()
    raise AssertionError(f"no message {event_id} on {topic} within {READ_TIMEOUT_S}s")


def end_offsets(login, topic: str) -> dict[int, int]:
    consumer = Consumer({**login, "group.id": "reader-offsets"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    finally:
        consumer.close()


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
    record = {"event_id": str(uuid.uuid4()), "note": "written by AvroSerializer", "amount": 1500}
    serialize = AvroSerializer(SchemaRegistryClient({"url": registry_url}), json.dumps(schema))
    producer = Producer(kafka_login)
    producer.produce(topic, serialize(record, SerializationContext(topic, MessageField.VALUE)))
    assert producer.flush(30) == 0

    partition, offset, decoded = find_with_deserializer(kafka_login, registry_url, topic, {0: 0},
                                                        record["event_id"])
    assert decoded == record
    assert read_with_kcat_and_avro_tools(tools, registry_url, topic, partition, offset, tmp_path) \
        == avro_json(schema, record)


@pytest.mark.parametrize("topic", ALL_TOPICS, ids=lambda t: t.name)
def test_every_topic_reads_with_ordinary_tools(topic, tools, registry_url, kafka_login, tmp_path):
    """The services' own producer and codec (registry-backed, Confluent framing) write a sample."""
    record = {**load_sample(topic.schema), "event_id": str(uuid.uuid4())}
    start = end_offsets(kafka_login, topic.name)

    async def write() -> None:
        registry = SchemaRegistry(registry_url)
        codec = Codec(registry=registry)
        await codec.prepare([topic])
        producer = EventProducer(kafka_login["bootstrap.servers"], codec, client_id="reading-topics-test")
        try:
            await producer.publish(topic, record)
        finally:
            producer.close()
            await registry.close()

    asyncio.run(write())

    partition, offset, decoded = find_with_deserializer(kafka_login, registry_url, topic.name, start,
                                                        record["event_id"])
    assert comparable(decoded) == record
    schema = json.loads((SCHEMA_DIR / f"{topic.schema}.avsc").read_text())
    assert read_with_kcat_and_avro_tools(tools, registry_url, topic.name, partition, offset, tmp_path) \
        == avro_json(schema, record)
