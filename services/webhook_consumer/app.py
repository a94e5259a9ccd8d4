"""The webhook gateway: checks a Daraja callback at the door and hands its bytes to Kafka.

Checks run cheapest first and the rate limit before anything that writes: rate limit per source,
source allow-list, URL token, body size, and last whether the body is a bounded JSON object
(body.py). Its content is never judged (no business logic before the ack); the ledger reads it.
Daraja gets 200 only after Kafka acknowledged the raw event. A refused callback is counted and,
unless it was rate limited, kept on the rejected topic for forensics, token removed and body capped.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from confluent_kafka import KafkaException
from prometheus_client import Counter

from services.common.avro import Codec
from services.common.callback_token import token_is_valid
from services.common.kafka import EventProducer, Publisher, PublishError, new_event_fields
from services.common.observability import Health, add_ops_routes, http_metrics
from services.common.problems import problem
from services.common.ratelimit import RateLimiter, retry_after_header
from services.common.text import untrusted
from services.common.topics import CALLBACK_RAW, CALLBACK_REJECTED, Topic
from services.webhook_consumer.body import is_bounded_json_object
from services.webhook_consumer.settings import MAX_BODY_BYTES, GatewaySettings
from services.webhook_consumer.sources import SourcePolicy, rate_limit_key

log = logging.getLogger(__name__)

PREFIX = "/api/webhooks/mpesa"
TOKEN_PLACEHOLDER = "<token>"
ACCEPTED_BODY = b'{"ResultCode":0,"ResultDesc":"Accepted"}'
FORENSICS_IN_FLIGHT_MAX = 1000  # rejected callbacks awaiting Kafka at once; beyond that they are only counted

# reason -> (status, title). Titles stay vague: the reason is for our metrics, not for a prober.
REFUSALS = {
    "missing_token": (401, "Unauthorized"),
    "bad_token": (403, "Forbidden"),
    "source_not_allowed": (403, "Forbidden"),
    "too_large": (413, "Request too large"),
    "malformed_body": (400, "Bad request"),  # not UTF-8 JSON, not an object, too deep, or NaN/Infinity
    "rate_limited": (429, "Too many requests"),
}

ACCEPTED = Counter("webhook_callbacks_accepted_total", "Callbacks acknowledged by Kafka and answered 200")
REJECTED = Counter("webhook_callbacks_rejected_total", "Callbacks refused at the door", ["reason"])
PUBLISH_FAILURES = Counter("webhook_publish_failures_total", "Events Kafka did not acknowledge in time", ["topic"])
FORENSICS_DROPPED = Counter("webhook_forensics_dropped_total", "Rejected callbacks not kept: too many in flight")
for _reason in REFUSALS:
    REJECTED.labels(_reason)
for _topic in (CALLBACK_RAW, CALLBACK_REJECTED):
    PUBLISH_FAILURES.labels(_topic.name)


@dataclass
class GatewayDeps:
    producer: Publisher
    clock: Callable[[], float] = time.monotonic  # the rate limiter's


def gateway_producer(bootstrap: str, codec: Codec, settings: GatewaySettings) -> EventProducer:
    """The producer the gateway needs: its delivery timeout is the bound on a callback's 503."""
    return EventProducer(bootstrap, codec, client_id="webhook-gateway",
                         delivery_timeout_ms=settings.kafka_timeout_ms, linger_ms=settings.kafka_linger_ms)


@dataclass
class Arrival:
    """What the gateway knows of a request before reading its body; never holds the token."""
    received_at: datetime
    source: str
    path: str
    channel_id: str
    payment_id: str | None
    content_type: str | None

    def record(self, body: bytes, rejection_reason: str | None = None) -> dict[str, Any]:
        params = {"channelId": self.channel_id}
        if self.payment_id is not None:
            params["paymentId"] = self.payment_id
        return {**new_event_fields(self.channel_id), "payment_id": self.payment_id,
                "occurred_at": self.received_at, "received_at": self.received_at, "source_address": self.source,
                "path": self.path, "path_params": params, "content_type": self.content_type, "body": body,
                "rejection_reason": rejection_reason}


class Gateway:
    def __init__(self, deps: GatewayDeps, settings: GatewaySettings):
        self.producer = deps.producer
        self.secrets = list(settings.token_secrets)
        self.policy = SourcePolicy(settings.allowed_sources, settings.trusted_proxies)
        self.limiter = RateLimiter(settings.rate_per_source_s, settings.rate_burst, clock=deps.clock)
        # A little past the producer's own delivery timeout, in case its ack never comes at all.
        self.publish_timeout_s = settings.kafka_timeout_ms / 1000 + 1.0
        self._forensics: set[asyncio.Task] = set()

    async def receive_callback(self, request: web.Request) -> web.Response:
        channel_id, payment_id, token = (request.match_info[k] for k in ("channelId", "paymentId", "token"))
        arrival = self._arrival(request, f"{PREFIX}/{channel_id}/{payment_id}/{TOKEN_PLACEHOLDER}",
                                channel_id, payment_id)
        refused = await self._screen(request, arrival)
        if refused is not None:
            return refused
        if not (token.isascii() and token_is_valid(self.secrets, channel_id, payment_id, token)):
            return await self._refuse(request, arrival, "bad_token")
        body, complete = await read_capped(request, MAX_BODY_BYTES)
        if not complete:
            return await self._refuse(request, arrival, "too_large", body)
        if not is_bounded_json_object(body):
            # What no callback can be, kept off the raw topic: one such body must not reach a reader
            # that might choke on it (a parser's recursion, a non-finite amount).
            return await self._refuse(request, arrival, "malformed_body", body)
        return await self._publish(arrival, body)

    async def receive_tokenless(self, request: web.Request) -> web.Response:
        """Any other shape under the prefix: no token where one must be."""
        path, channel_id, payment_id = _redacted_path(request.raw_path)
        arrival = self._arrival(request, path, channel_id, payment_id)
        refused = await self._screen(request, arrival)
        if refused is not None:  # (a Response is a mapping: test for None, not truth)
            return refused
        return await self._refuse(request, arrival, "missing_token")

    def _arrival(self, request: web.Request, path: str, channel_id: str, payment_id: str | None) -> Arrival:
        forwarded_for = None
        if self.policy.trusted_proxies:
            forwarded_for = ",".join(request.headers.getall("X-Forwarded-For", ())) or None
        return Arrival(datetime.now(timezone.utc), self.policy.client_address(request.remote, forwarded_for),
                       path, channel_id, payment_id, request.headers.get("Content-Type"))

    async def _screen(self, request: web.Request, arrival: Arrival) -> web.Response | None:
        wait_s = self.limiter.take(rate_limit_key(arrival.source))
        if wait_s > 0:
            # Only counted: keeping what a flooder sends would let it make us write without bound.
            REJECTED.labels("rate_limited").inc()
            return _refusal("rate_limited", headers={"Retry-After": retry_after_header(wait_s)})
        if not self.policy.allows(arrival.source):
            return await self._refuse(request, arrival, "source_not_allowed")
        return None

    async def _refuse(self, request: web.Request, arrival: Arrival, reason: str,
                      body: bytes | None = None) -> web.Response:
        REJECTED.labels(reason).inc()
        log.debug("callback refused: %s from %s", reason, arrival.source,
                  extra=_log_ids(arrival.channel_id, arrival.payment_id))
        if body is None:
            body, _ = await read_capped(request, MAX_BODY_BYTES)
        self._keep_for_forensics(arrival.record(body, reason))
        # An oversized body's unread rest is drained and the connection closed by aiohttp's lingering
        # close (bounded in time); closing at once could reset the connection before the 413 is read.
        return _refusal(reason)

    async def _publish(self, arrival: Arrival, body: bytes) -> web.Response:
        record = arrival.record(body)
        if not await self._publish_acked(CALLBACK_RAW, record):
            return problem(503, "Service unavailable", "the callback could not be recorded")
        ACCEPTED.inc()
        return web.Response(body=ACCEPTED_BODY, content_type="application/json")

    async def _publish_acked(self, topic: Topic, record: dict[str, Any]) -> bool:
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                await self.producer.publish(topic, record)
            return True
        except (PublishError, KafkaException, TimeoutError) as exc:
            PUBLISH_FAILURES.labels(topic.name).inc()
            log.error("callback not acknowledged by Kafka on %s: %s", topic.name, exc,
                      extra=_log_ids(record["channel_id"], record["payment_id"]))
            return False

    def _keep_for_forensics(self, record: dict[str, Any]) -> None:
        # In the background: a refusal does not wait for Kafka, and a bounded number wait at once.
        if len(self._forensics) >= FORENSICS_IN_FLIGHT_MAX:
            FORENSICS_DROPPED.inc()
            return
        task = asyncio.get_running_loop().create_task(self._publish_acked(CALLBACK_REJECTED, record))
        self._forensics.add(task)
        task.add_done_callback(self._forensics.discard)

    async def drain(self, _: web.Application | None = None) -> None:
        """Waits for the rejected callbacks still on their way to Kafka."""
        if self._forensics:
            await asyncio.gather(*self._forensics, return_exceptions=True)


GATEWAY = web.AppKey("gateway", Gateway)


def create_app(deps: GatewayDeps, settings: GatewaySettings, health: Health | None = None) -> web.Application:
    gateway = Gateway(deps, settings)
    # Bodies are read by read_capped, never by request.read(); this only caps other readers.
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[http_metrics])
    app[GATEWAY] = gateway
    app.router.add_post(PREFIX + "/{channelId}/{paymentId}/{token}", gateway.receive_callback)
    app.router.add_post(PREFIX + "{rest:(/.*)?}", gateway.receive_tokenless)
    add_ops_routes(app, health or Health())
    app.on_cleanup.append(gateway.drain)
    return app


async def read_capped(request: web.Request, limit: int) -> tuple[bytes, bool]:
    """Reads at most `limit` bytes of the body. Returns (bytes, complete); incomplete means longer."""
    chunks, size = [], 0
    while size <= limit:  # one byte past the limit tells a too-long body, with or without Content-Length
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    return body[:limit], size <= limit


def _redacted_path(raw_path: str) -> tuple[str, str, str | None]:
    """(path, channel id, payment id) of a path under PREFIX. Segments past the first two are
    replaced by the placeholder, as one of them may be a token; empty segments keep their place."""
    rest = raw_path.split("?", 1)[0][len(PREFIX) + 1:]  # the query string is dropped: it may hold a token
    segments = [unquote(s) for s in rest.split("/")] if rest else []
    kept = segments[:2] + [TOKEN_PLACEHOLDER if s else "" for s in segments[2:]]
    path = "/".join([PREFIX, *kept])
    return path, (segments[0] if segments else ""), (segments[1] if len(segments) > 1 else None)


def _log_ids(channel_id: str, payment_id: str | None) -> dict[str, str | None]:
    """The ids of a request for a log line. A refused request's ids are whatever its path said."""
    return {"channel_id": untrusted(channel_id), "payment_id": None if payment_id is None else untrusted(payment_id)}


def _refusal(reason: str, headers: dict[str, str] | None = None) -> web.Response:
    status, title = REFUSALS[reason]
    return problem(status, title, headers=headers)
