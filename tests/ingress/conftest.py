"""Fixtures for the ingress tests: an ingress served in this process on the real broker and database,
channels and API keys made through the channels repository, and a reader of the topic."""
from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from datetime import date
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from services.channels import repository as channels_repository
from services.channels.apikeys import key_sha256, new_api_key
from services.channels.model import Channel
from services.common import config
from services.common.avro import Codec
from services.common.kafka import client_config
from services.common.observability import serve
from services.common.topics import PAYMENT_REQUESTED
from services.ingress.app import create_app
from services.ingress.bootstrap import SETTINGS, IngressSettings, close_deps, open_deps
from tests.conftest import database_url_of, free_port


def ingress_config(infra: dict[str, str], **overrides: Any) -> IngressSettings:
    """The ingress's settings on the test infrastructure and a free port; `overrides` by field name."""
    cfg = config.load_into(IngressSettings, SETTINGS, {**infra, "DATABASE_URL": database_url_of(infra, "ingress"),
                                                       "INGRESS_PORT": str(free_port())})
    return dataclasses.replace(cfg, **overrides)


class RunningIngress:
    def __init__(self, deps, runner, base_url: str):
        self.deps, self.runner, self.base_url = deps, runner, base_url

    def client(self, api_key: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=15)

    async def stop(self, *, close_producer: bool = True) -> None:
        await self.runner.cleanup()
        await close_deps(self.deps, close_producer=close_producer)


async def start_ingress(cfg: IngressSettings, **deps_overrides: Any) -> RunningIngress:
    deps = await open_deps(cfg, **deps_overrides)
    runner = await serve(create_app(deps, max_body_bytes=cfg.ingress_max_body_bytes), "127.0.0.1", cfg.ingress_port)
    return RunningIngress(deps, runner, f"http://127.0.0.1:{cfg.ingress_port}")


@pytest.fixture(scope="session")
async def ingress(infra):
    running = await start_ingress(ingress_config(infra))
    yield running
    await running.stop()


async def make_channel(pool, channel_id: str, *, status: str = "active", max_amount: int | None = None) -> None:
    consent = ("MSA-1", date(2025, 1, 6)) if status != "onboarding" else (None, None)
    agreement = ("DPA-1", "1", date(2025, 1, 6), "contract") if status != "onboarding" else (None,) * 4
    channel = Channel(channel_id=channel_id, display_name=f"Shop {channel_id}", shortcode_type="paybill",
                      business_shortcode="174379", environment="sandbox", status=status,
                      consent_reference=consent[0], consent_date=consent[1], max_amount=max_amount,
                      agreement_reference=agreement[0], agreement_version=agreement[1],
                      agreement_signed_on=agreement[2], lawful_basis=agreement[3])
    async with pool.connection() as conn:
        assert await channels_repository.insert_channel(conn, channel)


async def make_api_key(pool, *channel_ids: str) -> str:
    key_id, key = new_api_key()
    async with pool.connection() as conn:
        await channels_repository.insert_api_key(conn, key_id, key_sha256(key), "ingress tests", list(channel_ids),
                                                 "tests")
    return key


@pytest.fixture
async def shop(pool, unique):
    """An active channel of its own and an API key scoped to it: (channel id, key)."""
    channel_id = f"shop-{unique}"
    await make_channel(pool, channel_id)
    return channel_id, await make_api_key(pool, channel_id)


def payment_body(channel_id: str, **changes: Any) -> dict[str, Any]:
    body = {"channelId": channel_id, "amount": 150, "phone": "0712 345 678", "accountReference": "INV-42",
            "description": "Shoes", "orderReference": f"ord-{uuid.uuid4().hex[:8]}", "metadata": {"cart": "7"}}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def new_key() -> str:
    return str(uuid.uuid4())


class TopicWatch:
    """Reads what was published to a topic after the watch began (never the topic's whole history)."""

    def __init__(self, bootstrap: str, codec: Codec, topic: str = PAYMENT_REQUESTED.name):
        self.topic = topic
        self._consumer = Consumer(client_config({
            "bootstrap.servers": bootstrap, "group.id": f"ingress-tests-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "isolation.level": "read_uncommitted"}))
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._start = {p: self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                       for p in partitions}
        self._codec = codec  # knows the ids of the current schemas, as the ingress writes them

    def events(self, predicate: Callable[[dict[str, Any]], bool]) -> list[tuple[bytes | None, dict[str, Any]]]:
        """(key, decoded record) of every message since the start that satisfies predicate, in offset order."""
        ends = {p: self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1]
                for p in self._start}
        wanted = {p for p in self._start if ends[p] > self._start[p]}
        if not wanted:
            return []
        self._consumer.assign([TopicPartition(self.topic, p, self._start[p]) for p in wanted])
        found = []
        for _ in range(30):  # bounded: 30 polls of at most a second
            for msg in self._consumer.consume(1000, 1.0):
                offset, partition = msg.offset(), msg.partition()
                if msg.error() is None and offset is not None and partition is not None and offset < ends[partition]:
                    _, record = self._codec.decode(msg.value())
                    if predicate(record):
                        found.append((msg.key(), record))
            positions = self._consumer.position([TopicPartition(self.topic, p) for p in wanted])
            if all(tp.offset >= ends[tp.partition] for tp in positions):
                break
        else:
            raise AssertionError(f"could not read {self.topic} up to {ends}")
        self._consumer.unassign()
        return found

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture
def topic(kafka_bootstrap, codec):
    watch = TopicWatch(kafka_bootstrap, codec)
    yield watch
    watch.close()


def of_channel(channel_id: str) -> Callable[[dict], bool]:
    return lambda record: record["channel_id"] == channel_id
