"""The topics the running pipeline writes in one paid payment (requested, push result, raw callback,
status) read with ordinary tools: confluent-kafka's AvroDeserializer and kcat + avro-tools
(tests/platform/test_reading_topics.py has the readers and covers the other topics), each message
decoded to the record the services' own codec reads in it."""
from __future__ import annotations

import asyncio
import json

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from services.common.avro import Codec
from services.common.schema_registry import SchemaRegistry
from services.common.topics import CALLBACK_RAW, PAYMENT_REQUESTED, PAYMENT_STATUS, STK_PUSH_RESULT
from tests.e2e.stack import running
from tests.e2e.test_pipeline import final_state, pay
from tests.platform.test_schemas import comparable
from tests.platform.topic_readers import (
    admin_login,
    avro_json,
    end_offsets,
    raw_messages,
    read_with_kcat_and_avro_tools,
    tools_env,
)

PIPELINE_TOPICS = (PAYMENT_REQUESTED, STK_PUSH_RESULT, CALLBACK_RAW, PAYMENT_STATUS)


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    yield from running(infra, tmp_path_factory.mktemp("reading"))


@pytest.fixture(scope="module")
async def channel(stack, pool):
    channel_id = f"read-{stack.unique}"
    return channel_id, await stack.onboard(pool, channel_id)


async def test_what_the_pipeline_wrote_for_a_paid_payment_reads_with_ordinary_tools(stack, channel, infra, tmp_path):
    tools, registry_url, kafka_login = tools_env(), infra["SCHEMA_REGISTRY_URL"], admin_login(infra)
    starts = {t.name: end_offsets(kafka_login, t.name) for t in PIPELINE_TOPICS}
    payment_id, _ = await pay(stack, channel, "254700000000")
    assert (await final_state(stack, channel, payment_id))["state"] == "Settled"

    registry = SchemaRegistry(registry_url)
    codec = Codec(registry=registry)  # what the services read in their own messages: the expected side
    schemas = SchemaRegistryClient({"url": registry_url})
    deserialize = AvroDeserializer(schemas)
    try:
        for topic in PIPELINE_TOPICS:
            # The status is published after the ledger's commit; wait until this payment's is there.
            ours = []
            for _ in range(60):
                ends = end_offsets(kafka_login, topic.name)
                messages = raw_messages(kafka_login, topic.name, starts[topic.name], ends)
                await codec.learn([value for _, _, value in messages])
                ours = [(p, o, v, codec.decode(v)[1]) for p, o, v in messages]
                ours = [m for m in ours if m[3].get("payment_id") == payment_id]
                if ours:
                    break
                await asyncio.sleep(0.5)
            assert ours, f"the pipeline wrote nothing on {topic.name} for {payment_id}"
            for partition, offset, value, written in ours:
                assert value[0] == 0, f"{topic.name}: not the Confluent wire format"
                decoded = deserialize(value, SerializationContext(topic.name, MessageField.VALUE))
                assert comparable(decoded) == comparable(written), topic.name
                writer = json.loads(schemas.get_schema(int.from_bytes(value[1:5], "big")).schema_str or "")
                read = read_with_kcat_and_avro_tools(tools, registry_url, topic.name, partition, offset, tmp_path)
                assert read == avro_json(writer, comparable(written)), topic.name
    finally:
        await registry.close()
