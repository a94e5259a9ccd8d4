"""Readers of our topics that use none of this repo's code for decoding (README, "Reading the topics"):
kcat + avro-tools, and confluent-kafka's AvroDeserializer; shared by the tests that prove them."""
from __future__ import annotations

import io
import json
import subprocess
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro import json_writer, parse_schema

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


def tools_env() -> dict[str, str]:
    """KCAT, KCAT_CONFIG and AVRO_TOOLS (infra/tools.sh env; infra/up.sh installed them)."""
    out = subprocess.run(["bash", str(ROOT / "infra/tools.sh"), "env"], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


class KafkaLogin(dict):
    """librdkafka settings whose repr hides the password: pytest prints a failing frame's arguments."""

    def __repr__(self) -> str:
        return repr({k: "<hidden>" if k == "sasl.password" else v for k, v in self.items()})


def admin_login(infra: dict[str, str]) -> KafkaLogin:
    """The admin's librdkafka settings, spelled out as a reader outside this repo would (README)."""
    return KafkaLogin({"bootstrap.servers": infra["KAFKA_BOOTSTRAP_SERVERS"], "security.protocol": "SASL_SSL",
            "sasl.mechanisms": "SCRAM-SHA-512", "ssl.ca.location": infra["KAFKA_CLIENT_SSL_CA_LOCATION"],
            "sasl.username": infra["KAFKA_CLIENT_SASL_USERNAME"],
            "sasl.password": Path(infra["KAFKA_CLIENT_SASL_PASSWORD_FILE"]).read_text().strip()})


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
                partition, offset, _ = where(msg)
                return partition, offset, record
    finally:
        consumer.close()
    raise AssertionError(f"no message {event_id} on {topic} within {READ_TIMEOUT_S}s")


def where(msg: Message) -> tuple[int, int, bytes]:
    """(partition, offset, value) of a consumed message (never None there)."""
    partition, offset, value = msg.partition(), msg.offset(), msg.value()
    assert partition is not None and offset is not None and value is not None
    return partition, offset, value


def end_offsets(login, topic: str) -> dict[int, int]:
    consumer = Consumer({**login, "group.id": "reader-offsets"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    finally:
        consumer.close()


def raw_messages(login, topic: str, start: dict[int, int], end: dict[int, int]) -> list[tuple[int, int, bytes]]:
    """Every (partition, offset, value) from `start` up to `end`, read by a plain consumer."""
    consumer = Consumer({**login, "group.id": "reader-range", "enable.auto.commit": False})
    wanted = {p: (start.get(p, 0), e) for p, e in end.items() if e > start.get(p, 0)}
    found: list[tuple[int, int, bytes]] = []
    try:
        consumer.assign([TopicPartition(topic, p, s) for p, (s, _) in wanted.items()])
        for _ in range(120):
            if len(found) == sum(e - s for s, e in wanted.values()):
                return found
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                partition, offset, value = where(msg)
                if offset < wanted[partition][1]:
                    found.append((partition, offset, value))
    finally:
        consumer.close()
    raise AssertionError(f"{topic}: read {len(found)} of the messages in {wanted}")
