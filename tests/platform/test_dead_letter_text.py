"""A dead letter quotes the error that refused the event and carries the message key as its channel:
both may be a hostile producer's text, so both arrive cleaned and cut (services.common.text)."""
from __future__ import annotations

import uuid

from services.common.kafka import ConsumedEvent, ensure_topics
from services.common.topics import DEAD_LETTER, Topic
from tests.platform.kafka_helpers import end_offsets, read_all, recording_loop, run_until, sample_request


async def test_the_error_and_the_key_of_a_dead_letter_are_cleaned(kafka_bootstrap, codec, producer, unique):
    topic = Topic(f"test.letters.{unique}", "payment_requested")
    ensure_topics(kafka_bootstrap, [topic], 1)
    await codec.prepare([topic])
    channel = f"ch-{unique}"
    refused, good = sample_request(channel, str(uuid.uuid4())), sample_request(channel, str(uuid.uuid4()))
    mark = end_offsets(kafka_bootstrap, DEAD_LETTER.name)
    hostile_key = f"{channel}\nforged line\x1b[2J".encode()
    await producer.publish_many([(topic, hostile_key, b"not avro")])
    await producer.publish(topic, refused)
    await producer.publish(topic, good)

    reason = "bad receipt \r\nlevel=INFO msg=settled " + "x" * 5000  # as if a parser quoted what it read
    fail = lambda e: ValueError(reason) if e.value["event_id"] == refused["event_id"] else None  # noqa: E731
    seen: list[ConsumedEvent] = []
    await run_until(recording_loop(kafka_bootstrap, f"g-{unique}", topic, codec, producer, seen, fail),
                    lambda: any(e.value["event_id"] == good["event_id"] for e in seen))

    letters = read_all(kafka_bootstrap, DEAD_LETTER.name,
                       lambda m: codec.decode(m.value())[1]["source_topic"] == topic.name, expected=2, since=mark)
    undecodable, rejected = sorted((codec.decode(m.value())[1] for m in letters), key=lambda r: r["source_offset"])
    assert undecodable["channel_id"] == f"{channel}\\u000aforged line\\u001b[2J"
    assert undecodable["original_key"] == hostile_key  # the original bytes are kept as they came
    assert rejected["error"].startswith("bad receipt \\u000d\\u000alevel=INFO msg=settled xxx")
    assert len(rejected["error"]) == 1001 and rejected["error"].endswith("…")
    assert "\n" not in rejected["error"] + undecodable["channel_id"]
