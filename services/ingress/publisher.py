"""A Kafka producer whose delivery reports are served on the event loop, for the request path.

Same contract and settings as services.common.kafka.EventProducer (idempotent, acks=all, `publish`
returns only after the broker acknowledged), but instead of a thread that polls and wakes the loop
once per message, the loop itself polls while acknowledgements are outstanding. No cross-thread
wake-up and no GIL hand-over per message: on the 2-core development machine this took the CPU per
event from about 53 to 28 µs with 64 events in flight (and from 93 to 57 µs with 16). The cost is
up to one poll interval of latency (asyncio's timers have a 1 ms granularity on epoll).
"""
from __future__ import annotations

import asyncio
from typing import Any, Protocol

from confluent_kafka import KafkaError, Message, Producer

from services.common.avro import Codec
from services.common.kafka import EVENTS_OUT, PUBLISH_FAILURES, PublishError, producer_config
from services.common.topics import Topic


class Publisher(Protocol):
    async def publish(self, topic: Topic, record: dict[str, Any]) -> None: ...

    def close(self, timeout: float = 10.0) -> None: ...


class LoopPolledProducer:
    def __init__(self, bootstrap: str, codec: Codec, *, client_id: str, delivery_timeout_ms: int, linger_ms: int,
                 poll_interval_s: float = 0.0005):
        self.codec = codec
        self._poll_interval_s = poll_interval_s
        self._producer = Producer(producer_config(bootstrap, client_id, delivery_timeout_ms, linger_ms))
        self._outstanding = 0
        self._polling: asyncio.TimerHandle | None = None
        self._acknowledged: dict[str, Any] = {}  # topic -> its EVENTS_OUT child, bound once

    async def publish(self, topic: Topic, record: dict[str, Any]) -> None:
        await self.publish_raw(topic, record["channel_id"].encode(), self.codec.encode(topic.schema, record))

    async def publish_raw(self, topic: Topic, key: bytes | None, value: bytes) -> None:
        loop = asyncio.get_running_loop()
        acked = loop.create_future()

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:  # runs inside poll(), on the loop
            self._outstanding -= 1
            _settle(acked, err)

        while True:
            try:
                self._producer.produce(topic.name, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: serve deliveries to drain it
                self._producer.poll(0)
                await asyncio.sleep(0.005)
        self._outstanding += 1
        if self._polling is None:
            self._polling = loop.call_later(self._poll_interval_s, self._poll)
        try:
            await acked
        except PublishError:
            PUBLISH_FAILURES.labels(topic.name).inc()
            raise
        counter = self._acknowledged.get(topic.name)
        if counter is None:
            counter = self._acknowledged[topic.name] = EVENTS_OUT.labels(topic.name)
        counter.inc()

    def _poll(self) -> None:
        # A timer callback rather than a task that sleeps: no future and no task step per poll.
        self._producer.poll(0)
        self._polling = None
        if self._outstanding > 0:
            self._polling = asyncio.get_running_loop().call_later(self._poll_interval_s, self._poll)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        if self._polling is not None:
            self._polling.cancel()
            self._polling = None


def _settle(future: asyncio.Future, err: KafkaError | None) -> None:
    if future.done():  # the request was cancelled meanwhile
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(PublishError(f"Kafka did not acknowledge the event: {err.str()}"))
