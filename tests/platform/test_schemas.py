"""Every schema's sample round-trips, in memory and through the real broker; evolution is checked."""
from __future__ import annotations

import io
import json
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from services.common.avro import SCHEMA_DIR, Codec, DecodeError
from services.common.kafka import EventProducer
from services.common.topics import ALL_TOPICS, PAYMENT_REQUESTED, Topic
from tests.schema_compat import backward_compatibility_errors

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_NAMES = sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))
BYTES_FIELDS = {"body", "original_key", "original_value"}


def load_sample(name: str, sample_text: str | None = None) -> dict:
    sample = json.loads(sample_text or (SCHEMA_DIR / "samples" / f"{name}.json").read_text())
    return {k: v.encode() if k in BYTES_FIELDS and isinstance(v, str) else v for k, v in sample.items()}


def comparable(record: dict) -> dict:
    """Decoded timestamps come back as datetimes; samples hold epoch milliseconds."""
    return {k: int(v.timestamp() * 1000) if isinstance(v, datetime) else v for k, v in record.items()}


def test_every_topic_has_a_schema_and_every_schema_a_sample():
    assert {t.schema for t in ALL_TOPICS} == set(SCHEMA_NAMES)
    assert {p.stem for p in (SCHEMA_DIR / "samples").glob("*.json")} == set(SCHEMA_NAMES)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_field_is_documented(name):
    schema = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    assert schema.get("doc")
    assert [f["name"] for f in schema["fields"] if not f.get("doc")] == []
    required = {"event_id", "occurred_at", "channel_id", "payment_id", "schema_version"}
    assert required <= {f["name"] for f in schema["fields"]}


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_sample_round_trips_in_memory(name):
    codec = Codec()  # no registry: single-object encoding
    sample = load_sample(name)
    encoded = codec.encode(Topic(name, name), sample)
    assert encoded[:2] == b"\xc3\x01" and encoded[2:10] == codec.current[name].fingerprint
    decoded_name, decoded = codec.decode(encoded)
    assert decoded_name == name
    assert comparable(decoded) == sample


def test_samples_round_trip_through_the_broker(kafka_bootstrap, unique):
    async def produce_all(p: EventProducer):
        for name in SCHEMA_NAMES:
            await p.publish(Topic(f"test.schemas.{unique}", name), load_sample(name))

    import asyncio

    from services.common.kafka import client_config, ensure_topics
    topic = Topic(f"test.schemas.{unique}", "unused")
    ensure_topics(kafka_bootstrap, [topic], 1)
    # Every record on one topic: single-object encoding (no registry), whose framing names the record;
    # under the registry's topic-name strategy one topic's subject holds one record.
    codec = Codec()
    producer = EventProducer(kafka_bootstrap, codec, client_id="schema-test")
    asyncio.run(produce_all(producer))
    producer.close()

    consumer = Consumer(client_config({"bootstrap.servers": kafka_bootstrap, "group.id": f"schemas-{unique}",
                                       "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic.name])
    received = {}
    for _ in range(100):
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            name, value = codec.decode(msg.value())
            received[name] = comparable(value)
            assert msg.key() == value["channel_id"].encode()
        if len(received) == len(SCHEMA_NAMES):
            break
    consumer.close()
    assert received == {name: load_sample(name) for name in SCHEMA_NAMES}


@pytest.mark.parametrize("data", [b"", b"plain text, not avro", b"\xc3\x01" + b"\x00" * 8 + b"x",
                                  b"\x00\x00\x00\x00\x01abc"])
def test_codec_refuses_what_it_cannot_read(codec, data):
    with pytest.raises(DecodeError):
        codec.decode(data)


def test_a_corrupt_body_is_a_decode_error(codec):
    encoded = codec.encode(PAYMENT_REQUESTED, load_sample("payment_requested"))
    with pytest.raises(DecodeError):
        codec.decode(encoded[:14])


def _committed_versions(name: str) -> list[tuple[str, str, str | None]]:
    """(commit, schema text, sample text) for every committed version of a schema, newest first."""
    path = f"schemas/{name}.avsc"
    commits = subprocess.run(["git", "log", "--format=%H", "--", path], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    versions = []
    for commit in commits:
        schema, sample = (subprocess.run(["git", "show", f"{commit}:{p}"], cwd=ROOT,
                                         capture_output=True, text=True)
                          for p in (path, f"schemas/samples/{name}.json"))
        if schema.returncode == 0:
            versions.append((commit, schema.stdout, sample.stdout if sample.returncode == 0 else None))
    return versions


def _earlier_versions(name: str) -> list[tuple[str, str, str | None]]:
    """Every committed version and every copy in schemas/history/ the codec still reads: (where, text, sample)."""
    kept = [(f"schemas/history/{p.name}", p.read_text(), None)
            for p in sorted((SCHEMA_DIR / "history").glob(f"{name}.v*.avsc"))]
    return [(commit[:8], text, sample) for commit, text, sample in _committed_versions(name)] + kept


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_reads_every_earlier_version(name):
    """BACKWARD compatibility, by Apache Avro's checker (tests/schema_compat.py): today's schema reads data
    written with any earlier one; each committed sample, written with its version, is read with today's."""
    current = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    for where, old_text, old_sample in _earlier_versions(name):
        old = json.loads(old_text)
        errors = backward_compatibility_errors(old, current)
        assert errors == [], f"schemas/{name}.avsc cannot read what {where} wrote: {errors}"
        if old_sample:
            buf = io.BytesIO()
            schemaless_writer(buf, parse_schema(old), load_sample(name, old_sample))
            buf.seek(0)
            schemaless_reader(buf, parse_schema(old), parse_schema(current))


def test_earlier_versions_come_from_git_and_from_the_history_copies():
    # A path git does not know (one through services/schemas, a link) would find no commit and check nothing.
    versions = [where for where, _, _ in _earlier_versions("payment_status")]
    assert len(versions) >= 5 and versions[-3:] == ["schemas/history/payment_status.v1.avsc",
                                                    "schemas/history/payment_status.v2.avsc",
                                                    "schemas/history/payment_status.v3.avsc"], versions
