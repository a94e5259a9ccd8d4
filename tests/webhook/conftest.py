"""Fixtures for the webhook gateway: in-process gateways on port 0 and tails of the callback topics."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

import httpx
import pytest
from aiohttp import web
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from services.common.avro import Codec
from services.common.callback_token import callback_token
from services.common.kafka import client_config
from services.common.topics import Topic
from services.webhook_consumer.app import GatewayDeps, create_app, gateway_producer
from services.webhook_consumer.settings import GatewaySettings
from services.webhook_consumer.sources import ANY_SOURCE

SECRET = b"current-webhook-secret-0123456789abcdef"
PREVIOUS_SECRET = b"previous-webhook-secret-0123456789abcdef"
ACCEPTED_BODY = b'{"ResultCode":0,"ResultDesc":"Accepted"}'
DARAJA_CONTENT_TYPE = "application/json;charset=UTF-8"


def token(channel_id: str, payment_id: str, secret: bytes = SECRET) -> str:
    return callback_token(secret, channel_id, payment_id)


def callback_path(channel_id: str, payment_id: str, secret: bytes = SECRET) -> str:
    return f"/api/webhooks/mpesa/{channel_id}/{payment_id}/{token(channel_id, payment_id, secret)}"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class FrozenClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RunningGateway:
    base: str
    http: httpx.AsyncClient

    async def post(self, path: str, body: bytes = b"{}", headers: dict[str, str] | None = None,
                   **kwargs) -> httpx.Response:
        headers = {"Content-Type": DARAJA_CONTENT_TYPE, **(headers or {})}
        return await self.http.post(self.base + path, content=body, headers=headers, **kwargs)

    async def callback(self, channel_id: str, payment_id: str, body: bytes = b"{}", **kwargs) -> httpx.Response:
        return await self.post(callback_path(channel_id, payment_id), body, **kwargs)


@pytest.fixture(scope="session")
def gateway_kafka(kafka_bootstrap, codec):
    producer = gateway_producer(kafka_bootstrap, codec, GatewaySettings(token_secrets=(SECRET,)))
    yield producer
    producer.close()


@pytest.fixture
async def start_gateway(gateway_kafka):
    """Starts in-process gateways on 127.0.0.1:0; settings are overrides of a permissive default."""
    runners: list[web.AppRunner] = []
    http = httpx.AsyncClient(timeout=15)
    base_settings = GatewaySettings(token_secrets=(SECRET,), allowed_sources=ANY_SOURCE, rate_per_source_s=10_000,
                                    rate_burst=10_000)

    async def start(*, producer=None, clock: Callable[[], float] | None = None, **overrides) -> RunningGateway:
        deps = GatewayDeps(producer or gateway_kafka)
        if clock is not None:
            deps.clock = clock
        runner = web.AppRunner(create_app(deps, replace(base_settings, **overrides)), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return RunningGateway(f"http://127.0.0.1:{runner.addresses[0][1]}", http)

    yield start
    await http.aclose()
    for runner in runners:
        await runner.cleanup()


@dataclass
class Seen:
    key: bytes | None
    value: bytes
    record: dict


class TopicTail:
    """What a topic receives from the moment the tail is made: a fresh consumer assigned at the ends."""

    def __init__(self, bootstrap: str, topic: Topic, codec: Codec):
        self.topic, self.codec = topic, codec
        self.consumer = Consumer(client_config({"bootstrap.servers": bootstrap, "group.id": f"tail-{uuid.uuid4().hex}",
                                                "enable.auto.commit": False}))
        partitions = self.consumer.list_topics(topic.name, timeout=10).topics[topic.name].partitions
        ends = [TopicPartition(topic.name, p) for p in partitions]
        for tp in ends:
            tp.offset = self.consumer.get_watermark_offsets(tp, timeout=10)[1]
        self.consumer.assign(ends)
        self.seen: list[Seen] = []

    async def collect(self, channel_id: str, until: Callable[[list[Seen]], bool], timeout: float = 20) -> list[Seen]:
        """Messages keyed by `channel_id`, read until `until(messages)` holds; fails at the deadline."""
        return await asyncio.to_thread(self._collect, channel_id.encode(), until, timeout)

    def _collect(self, key: bytes, until: Callable[[list[Seen]], bool], timeout: float) -> list[Seen]:
        ends_at = time.monotonic() + timeout
        while True:
            mine = [s for s in self.seen if s.key == key]
            if until(mine):
                return mine
            if time.monotonic() > ends_at:
                raise AssertionError(f"{self.topic.name}: condition not met within {timeout}s; saw {mine!r}")
            for msg in self.consumer.consume(100, 0.2):
                value = msg.value()
                if msg.error() is None:
                    assert value is not None, f"{self.topic.name}: a message without a value"
                    self.seen.append(Seen(msg.key(), value, self.codec.decode(value)[1]))

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def tail(kafka_bootstrap, codec):
    tails: list[TopicTail] = []

    def make(topic: Topic) -> TopicTail:
        tails.append(TopicTail(kafka_bootstrap, topic, codec))
        return tails[-1]

    yield make
    for t in tails:
        t.close()


def count(n: int) -> Callable[[list[Seen]], bool]:
    return lambda seen: len(seen) >= n


def has_payment(payment_id: str) -> Callable[[list[Seen]], bool]:
    return lambda seen: any(s.record["payment_id"] == payment_id for s in seen)
