"""The codec on the project's real schema registry (infra/registry.sh): Confluent framing, subjects
by topic name held to BACKWARD compatibility, writer schemas learned by id and resolved to this
code's own, and what a hostile message or a hostile registry can make a consumer do."""
from __future__ import annotations

import asyncio
import json
import shutil
import uuid

import pytest
from aiohttp import web

from services.common import avro
from services.common.avro import SCHEMA_DIR, Codec, DecodeError, open_codec, subject_of
from services.common.kafka import ConsumedEvent, ensure_topics
from services.common.ratelimit import RateLimiter
from services.common.runtime import StartupRefused
from services.common.schema_registry import REGISTER_ATTEMPTS, RegistryError, RegistryUnavailable, SchemaRegistry
from services.common.topics import ALL_TOPICS, DEAD_LETTER, PAYMENT_STATUS, Topic
from tests.conftest import free_port
from tests.platform.kafka_helpers import end_offsets, read_all, recording_loop, run_until, sample_request
from tests.platform.test_schemas import load_sample

UNKNOWN_ID = 2**31 - 7  # far above any id a test registry hands out


@pytest.fixture
async def registry(infra):
    client = SchemaRegistry(infra["SCHEMA_REGISTRY_URL"])
    yield client
    await client.close()


class CountingRegistry(SchemaRegistry):
    """The real client, counting the schema lookups a codec makes."""

    def __init__(self, url: str):
        super().__init__(url)
        self.asked: list[int] = []

    async def schema(self, schema_id: int) -> str | None:
        self.asked.append(schema_id)
        return await super().schema(schema_id)


def framed(schema_id: int, body: bytes = b"\x02") -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


@pytest.mark.parametrize("topic", ALL_TOPICS, ids=lambda t: t.name)
def test_every_topic_is_written_in_the_confluent_framing_with_its_subjects_id(codec, topic):
    sample = load_sample(topic.schema)
    encoded = codec.encode(topic, sample)
    assert encoded[:1] == b"\x00"
    name, record = codec.decode(encoded)
    assert name == topic.schema and codec.encode(topic, record) == encoded


async def test_each_subject_is_named_after_its_topic_and_held_to_backward_compatibility(codec, registry):
    for topic in ALL_TOPICS:
        assert await registry.compatibility(subject_of(topic)) == "BACKWARD"
        own = await registry.register(subject_of(topic), codec.current[topic.schema].text)  # already there
        assert codec.encode(topic, load_sample(topic.schema))[1:5] == own.to_bytes(4, "big")


async def test_an_incompatible_schema_is_refused_by_the_registry_with_its_reason(codec, registry, unique):
    topic = Topic(f"test.registry.{unique}", "payment_status")
    await codec.prepare([topic])
    changed = json.loads(codec.current["payment_status"].text)
    changed["fields"].append({"name": "required_without_default", "type": "string"})

    with pytest.raises(RegistryError) as refused:
        await registry.register(subject_of(topic), json.dumps(changed))

    assert "409" in str(refused.value) and "required_without_default" in str(refused.value)


async def test_services_registering_a_new_subject_at_once_all_get_its_one_id(codec, infra, unique):
    """Every service of `make run` registers the dead-letter subject as it starts; Apicurio answers
    409 "already exists" to the losers of that race, which once stopped a first `make run`."""
    subject = subject_of(Topic(f"test.registry.race.{unique}", "dead_letter"))
    clients = [SchemaRegistry(infra["SCHEMA_REGISTRY_URL"]) for _ in range(8)]
    try:
        ids = await asyncio.gather(*(c.register(subject, codec.current["dead_letter"].text) for c in clients))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert len(set(ids)) == 1


async def test_a_conflict_answered_once_is_asked_again_and_one_that_stays_is_refused():
    attempts = []

    async def versions(request: web.Request) -> web.Response:
        attempts.append(request.path)
        if len(attempts) == 1 or "always" in request.path:
            return web.json_response({"error_code": 409, "message": "artifact already exists"}, status=409)
        return web.json_response({"id": 7})

    app = web.Application()
    app.router.add_post("/subjects/{subject}/versions", versions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = SchemaRegistry(f"http://127.0.0.1:{port}")
    try:
        assert await client.register("once-value", "{}") == 7
        assert len(attempts) == 2
        with pytest.raises(RegistryError, match="409"):
            await client.register("always-value", "{}")
        assert len(attempts) == 2 + REGISTER_ATTEMPTS
    finally:
        await client.close()
        await runner.cleanup()


async def test_a_stricter_compatibility_an_operator_set_is_kept(codec, registry, unique):
    topic = Topic(f"test.registry.{unique}", "payment_status")
    await registry.set_compatibility(subject_of(topic), "FULL_TRANSITIVE")
    await codec.prepare([topic])
    assert await registry.compatibility(subject_of(topic)) == "FULL_TRANSITIVE"


async def test_a_reader_with_only_payment_status_v1_reads_a_v2_message_through_the_registry(codec, infra, tmp_path):
    # The reader's schema directory holds v1 as its current PaymentStatus (as a consumer built before
    # v2 has): single-object encoding names v2 by a fingerprint it has never seen, the registry does not.
    shutil.copy(SCHEMA_DIR / "history" / "payment_status.v1.avsc", tmp_path / "payment_status.avsc")
    reader = Codec(tmp_path, registry=SchemaRegistry(infra["SCHEMA_REGISTRY_URL"]))
    v2_fields = {f["name"] for f in json.loads(codec.current["payment_status"].text)["fields"]}
    v1_fields = {f["name"] for f in json.loads(reader.current["payment_status"].text)["fields"]}
    assert v2_fields - v1_fields, "the current payment_status has fields v1 lacks"
    sample = load_sample("payment_status")
    written = codec.encode(PAYMENT_STATUS, sample)
    try:
        await reader.learn([written])
        name, record = reader.decode(written)
    finally:
        await reader.close()

    assert name == "payment_status"
    assert set(record) == v1_fields
    assert record["payment_id"] == sample["payment_id"] and record["status"] == sample["status"]


async def test_an_id_the_registry_does_not_know_is_refused_and_asked_for_once(infra):
    registry = CountingRegistry(infra["SCHEMA_REGISTRY_URL"])
    reader = Codec(registry=registry)
    try:
        await reader.learn([memoryview(framed(UNKNOWN_ID))] * 3)  # as a bytea column may come back
        await reader.learn([framed(UNKNOWN_ID)])
        with pytest.raises(DecodeError, match="not known to the schema registry"):
            reader.decode(framed(UNKNOWN_ID))
    finally:
        await reader.close()
    assert registry.asked == [UNKNOWN_ID]


async def test_an_unknown_id_is_asked_for_again_once_its_refusal_is_old(infra, monkeypatch):
    # A registry replica behind a registration answers 404 for an id that exists: that must not make
    # the id unreadable for as long as the consumer runs.
    monkeypatch.setattr(avro, "UNUSABLE_FOR_S", 0.0)
    registry = CountingRegistry(infra["SCHEMA_REGISTRY_URL"])
    reader = Codec(registry=registry)
    try:
        await reader.learn([framed(UNKNOWN_ID)])
        await reader.learn([framed(UNKNOWN_ID)])
    finally:
        await reader.close()
    assert registry.asked == [UNKNOWN_ID, UNKNOWN_ID] and len(reader._unusable) == 1


async def test_remembered_unknown_ids_are_bounded(infra, monkeypatch):
    monkeypatch.setattr(avro, "UNUSABLE_IDS_MAX", 10)
    registry = CountingRegistry(infra["SCHEMA_REGISTRY_URL"])
    reader = Codec(registry=registry)
    try:
        await reader.learn(framed(UNKNOWN_ID - i) for i in range(25))
    finally:
        await reader.close()
    assert len(registry.asked) == 25 and len(reader._unusable) == 10


async def test_lookups_of_unseen_ids_are_throttled_not_one_request_each(infra):
    registry = CountingRegistry(infra["SCHEMA_REGISTRY_URL"])
    reader = Codec(registry=registry)
    reader._lookups = RateLimiter(1.0, 2, clock=lambda: 0.0)  # time stands still: no token comes back
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.learn(framed(UNKNOWN_ID - i) for i in range(5)), 2.0)
    finally:
        await reader.close()
    assert len(registry.asked) == 2


async def test_a_message_with_bytes_after_the_record_is_refused_in_the_confluent_framing(codec):
    encoded = codec.encode(PAYMENT_STATUS, load_sample("payment_status"))
    with pytest.raises(DecodeError, match="after the record"):
        codec.decode(encoded + b"\x00")


async def hostile_registry(answers: dict[str, web.Response]) -> tuple[web.AppRunner, str]:
    async def answer(request: web.Request) -> web.StreamResponse:
        return answers.get(request.path, web.json_response({"error_code": 40403}, status=404))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_what_a_hostile_registry_answers_makes_its_ids_unreadable_and_nothing_else():
    huge = "x" * (2 * 1024 * 1024)
    array_of_nulls = {"type": "record", "name": "PaymentStatus", "namespace": "mpesa_pipeline.events",
                      "fields": [{"name": "a", "type": {"type": "array", "items": "null"}}]}
    answers = {
        "/schemas/ids/1": web.json_response({"schema": huge}),
        "/schemas/ids/2": web.json_response({"schema": json.dumps({"type": "record", "name": "Stranger",
                                                                   "fields": []})}),
        "/schemas/ids/3": web.json_response({"schema": json.dumps(array_of_nulls)}),
        "/schemas/ids/4": web.json_response({"schema": "{not json"}),
        "/schemas/ids/5": web.json_response({"schema": "syntax = 'proto3';", "schemaType": "PROTOBUF"}),
        "/schemas/ids/6": web.json_response({"schema": json.dumps({"type": "string"})}),
    }
    runner, url = await hostile_registry(answers)
    reader = Codec(registry=SchemaRegistry(url))
    try:
        await reader.learn(framed(i) for i in range(1, 7))
        reasons = {}
        for i in range(1, 7):
            with pytest.raises(DecodeError) as refused:
                reader.decode(framed(i))
            reasons[i] = str(refused.value)
    finally:
        await reader.close()
        await runner.cleanup()
    assert "larger than" in reasons[1]
    assert "record 'Stranger' is none of this code's schemas" in reasons[2]
    assert "zero bytes" in reasons[3]
    assert "cannot read" in reasons[4]
    assert "not Avro" in reasons[5]
    assert "not a named schema" in reasons[6]


async def test_a_registry_password_in_the_url_stays_out_of_the_startup_error():
    nowhere = f"http://reader:s3cret-pw@127.0.0.1:{free_port()}/apis/ccompat/v7"
    with pytest.raises(StartupRefused) as refused:
        await open_codec(nowhere, [DEAD_LETTER], wait_s=0.5)
    assert "s3cret-pw" not in str(refused.value) and "reader:****@127.0.0.1" in str(refused.value)


async def test_a_service_whose_registry_is_down_at_start_gives_up_with_a_clear_error():
    nowhere = f"http://127.0.0.1:{free_port()}/apis/ccompat/v7"
    with pytest.raises(StartupRefused, match=r"schema registry .* not reachable after 1s.*SCHEMA_REGISTRY_URL"):
        await open_codec(nowhere, [DEAD_LETTER], wait_s=1.0)


async def test_a_consumer_dead_letters_a_message_naming_an_unknown_id_and_goes_on(kafka_bootstrap, codec, producer,
                                                                                   unique):
    topic = Topic(f"test.registry.{unique}", "payment_requested")
    ensure_topics(kafka_bootstrap, [topic], 1)
    await codec.prepare([topic])
    channel = f"ch-{unique}"
    good = sample_request(channel, str(uuid.uuid4()))
    mark = end_offsets(kafka_bootstrap, DEAD_LETTER.name)
    stranger = framed(UNKNOWN_ID, codec.encode(topic, good)[5:])  # a valid body under an id nobody gave
    await producer.publish_many([(topic, channel.encode(), stranger)])
    await producer.publish(topic, good)

    seen: list[ConsumedEvent] = []
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, seen),
                    lambda: any(e.value["event_id"] == good["event_id"] for e in seen))

    [letter] = [codec.decode(m.value())[1] for m in read_all(
        kafka_bootstrap, DEAD_LETTER.name, lambda m: codec.decode(m.value())[1]["source_topic"] == topic.name,
        expected=1, since=mark)]
    assert letter["error_type"] == "DecodeError" and "not known to the schema registry" in letter["error"]
    assert letter["original_value"] == stranger
    assert [e.value["event_id"] for e in seen] == [good["event_id"]]


async def test_a_consumer_learns_the_writer_schema_of_an_id_it_has_not_seen(kafka_bootstrap, codec, producer, infra,
                                                                             unique):
    topic = Topic(f"test.registry.{unique}", "payment_requested")
    ensure_topics(kafka_bootstrap, [topic], 1)
    await codec.prepare([topic])
    event = sample_request(f"ch-{unique}", str(uuid.uuid4()))
    await producer.publish(topic, event)
    fresh = await open_codec(infra["SCHEMA_REGISTRY_URL"], [DEAD_LETTER])  # as a consumer just started
    assert codec.encode(topic, event)[1:5] != codec.encode(DEAD_LETTER, load_sample("dead_letter"))[1:5]

    seen: list[ConsumedEvent] = []
    try:
        await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, fresh, producer, seen),
                        lambda: any(e.value["event_id"] == event["event_id"] for e in seen))
    finally:
        await fresh.close()
    assert [e.schema for e in seen] == ["payment_requested"]


async def test_messages_wait_while_the_registry_is_down_and_are_read_once_it_is_back(kafka_bootstrap, codec,
                                                                                     producer, infra, unique):
    # A registry in front of the real one that answers 503 until told otherwise: the consumer must
    # retry the batch, not dead-letter good messages as unreadable.
    up = asyncio.Event()
    asked_while_down = 0

    async def schema_by_id(request: web.Request) -> web.Response:
        nonlocal asked_while_down
        if not up.is_set():
            asked_while_down += 1
            return web.json_response({"error_code": 50001}, status=503)
        text = await SchemaRegistry(infra["SCHEMA_REGISTRY_URL"]).schema(int(request.match_info["id"]))
        return web.json_response({"schema": text})

    app = web.Application()
    app.router.add_get("/schemas/ids/{id}", schema_by_id)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    topic = Topic(f"test.registry.{unique}", "payment_requested")
    ensure_topics(kafka_bootstrap, [topic], 1)
    await codec.prepare([topic])
    event = sample_request(f"ch-{unique}", str(uuid.uuid4()))
    await producer.publish(topic, event)
    flaky = Codec(registry=SchemaRegistry(f"http://127.0.0.1:{port}"))

    async def back_after_three_refusals() -> None:
        while asked_while_down < 3:
            await asyncio.sleep(0.05)
        up.set()

    seen: list[ConsumedEvent] = []
    reviver = asyncio.create_task(back_after_three_refusals())
    try:
        await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, flaky, producer, seen),
                        lambda: any(e.value["event_id"] == event["event_id"] for e in seen), timeout=60)
    finally:
        reviver.cancel()
        await flaky.close()
        await runner.cleanup()
    assert asked_while_down >= 3
    assert [e.value["event_id"] for e in seen] == [event["event_id"]]  # handled, so not dead-lettered


@pytest.mark.parametrize(("answer", "reason"), [
    *((web.json_response({"error_code": status}, status=status), f"HTTP {status}")
      for status in (302, 400, 401, 403, 408, 429)),
    (web.Response(text="<html>Service maintenance</html>", content_type="text/html"), "not JSON"),
])
async def test_a_registry_that_cannot_answer_now_makes_messages_wait_not_unreadable(answer, reason):
    # Only a 404 says the id is unknown, and only a schema says what it is. Too many requests, a
    # timeout, credentials refused, a redirect or a proxy's page say nothing about the id, which the
    # message alone chose: it may be fine, so the batch waits (RegistryUnavailable) instead of every
    # message of that id being dead-lettered as unreadable until the consumer restarts.
    runner, url = await hostile_registry({"/schemas/ids/1": answer})
    reader = Codec(registry=SchemaRegistry(url))
    try:
        with pytest.raises(RegistryUnavailable, match=reason):
            await reader.learn([framed(1)])
        with pytest.raises(DecodeError, match="was not learned"):
            reader.decode(framed(1))
    finally:
        await reader.close()
        await runner.cleanup()


async def test_a_registry_schema_far_larger_than_ours_is_refused_so_remembered_ids_stay_small():
    # Each remembered id keeps its parsed schema: 1024 ids of 1 MiB schemas held about 2 GB. A valid
    # PaymentStatus grown to 100 kB by an optional field's name is refused like any unusable schema.
    bloated = json.loads((SCHEMA_DIR / "payment_status.avsc").read_text())
    bloated["fields"].append({"name": "x" * 100_000, "type": ["null", "string"], "default": None})
    runner, url = await hostile_registry({"/schemas/ids/1": web.json_response({"schema": json.dumps(bloated)})})
    reader = Codec(registry=SchemaRegistry(url))
    try:
        await reader.learn([framed(1)])
        with pytest.raises(DecodeError, match="schema text is too long"):
            reader.decode(framed(1))
    finally:
        await reader.close()
        await runner.cleanup()
    assert max(len(p.read_text()) for p in SCHEMA_DIR.glob("*.avsc")) * 10 < avro.SCHEMA_TEXT_MAX
