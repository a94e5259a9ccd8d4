"""The STK worker's two jobs: push payment requests to Daraja (exactly once) and answer the
ledger's query requests. It reports what happened; only the ledger decides states."""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Protocol

import psycopg
from prometheus_client import Counter

from services.channels.vault import VaultError
from services.common.callback_token import callback_url
from services.common.payment import event_problem
from services.common.kafka import ConsumedEvent, EventProducer, PublishError, Transient, new_event_fields
from services.common.text import untrusted
from services.common.topics import STK_PUSH_RESULT, STK_QUERY_RESULT
from services.daraja.errors import DarajaError, ErrorKind
from services.daraja.models import QueryStatus, StkPushRequest
from services.stk_worker import claims
from services.stk_worker.channels import ChannelAccess
from services.stk_worker.claims import PushOutcome
from services.stk_worker.throttle import ShortcodeThrottle

log = logging.getLogger(__name__)
PUSHES = Counter("stk_pushes_total", "STK push outcomes", ["outcome"])
QUERIES = Counter("stk_queries_total", "STK query outcomes", ["status"])
SPIKE_ARREST = "500.003.02"


class Channels(Protocol):
    async def current(self, channel_id: str) -> ChannelAccess | None: ...

    async def at_version(self, channel_id: str, version: int) -> ChannelAccess | None: ...


def is_transient(exc: Exception) -> bool:
    return isinstance(exc, (Transient, PublishError, psycopg.OperationalError))


@dataclass
class PushSettings:
    public_base_url: str
    token_secret: bytes
    max_attempts: int = 4
    backoff_s: float = 0.5


class Pusher:
    def __init__(self, pool, daraja, channels: Channels, producer: EventProducer, throttle: ShortcodeThrottle,
                 settings: PushSettings):
        self.pool, self.daraja, self.channels, self.producer = pool, daraja, channels, producer
        self.throttle, self.settings = throttle, settings

    async def handle(self, event: ConsumedEvent) -> None:
        v = event.value
        outcome = await self._decide(v)
        PUSHES.labels(outcome.status).inc()
        await self._publish(v, outcome)

    async def _decide(self, v: dict) -> PushOutcome:
        problem = event_problem(v)
        if problem:
            return PushOutcome("invalid", error_code="INVALID_REQUEST", error_message=problem)
        try:
            channel = await self.channels.current(v["channel_id"])
        except VaultError as exc:  # nothing was pushed: the payment fails instead of waiting forever
            return PushOutcome("invalid", error_code="CREDENTIALS_UNREADABLE", error_message=untrusted(str(exc)))
        refusal = _channel_refusal(channel, v["amount"])
        if refusal:
            return refusal
        earlier = await claims.claim(self.pool, v["payment_id"], v["channel_id"], channel.version)
        if earlier is not None:  # redelivered: report what happened, never push again
            return earlier
        outcome = await self._push(channel, v)
        await claims.finish(self.pool, v["payment_id"], outcome)
        return outcome

    async def _push(self, channel: ChannelAccess, v: dict) -> PushOutcome:
        try:
            request = StkPushRequest(
                amount=v["amount"], phone=v["phone"], account_reference=v["account_reference"],
                description=v["description"] or v["account_reference"][:13],
                callback_url=callback_url(self.settings.public_base_url, self.settings.token_secret,
                                          v["channel_id"], v["payment_id"]))
        except ValueError as exc:
            return PushOutcome("invalid", error_code="INVALID_REQUEST", error_message=untrusted(str(exc)))
        code = channel.shortcode.business_shortcode
        for attempt in range(1, self.settings.max_attempts + 1):
            await self.throttle.acquire(code, channel.pushes_per_second)
            try:
                accepted = await self.daraja.push(channel.app, channel.shortcode, request)
                return PushOutcome("accepted", accepted.merchant_request_id, accepted.checkout_request_id,
                                   attempts=attempt)
            except DarajaError as exc:
                if exc.error_code == SPIKE_ARREST:
                    self.throttle.spike_arrested(code)
                if exc.kind is ErrorKind.OUTCOME_UNKNOWN:
                    return PushOutcome("unknown", error_code=exc.error_code, error_message=untrusted(str(exc)),
                                       attempts=attempt)
                if exc.kind is ErrorKind.PERMANENT or attempt == self.settings.max_attempts:
                    return PushOutcome("refused", error_code=exc.error_code or exc.kind.value,
                                       error_message=untrusted(str(exc)), attempts=attempt)
                # Retryable: Daraja did not act on it, so sending it again cannot prompt twice.
                await asyncio.sleep(exc.retry_after_s or self.settings.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    async def _publish(self, v: dict, o: PushOutcome) -> None:
        outcome = {"accepted": "ACCEPTED", "refused": "REFUSED", "unknown": "OUTCOME_UNKNOWN", "invalid": "INVALID"}
        await self.producer.publish(STK_PUSH_RESULT, {
            **new_event_fields(v["channel_id"], v["payment_id"]), "outcome": outcome[o.status],
            "merchant_request_id": o.merchant_request_id, "checkout_request_id": o.checkout_request_id,
            "error_code": o.error_code, "error_message": o.error_message, "attempts": max(o.attempts, 1)})


def _channel_refusal(channel: ChannelAccess | None, amount: int) -> PushOutcome | None:
    if channel is None:
        return PushOutcome("invalid", error_code="CHANNEL_UNKNOWN", error_message="no such channel with credentials")
    if not channel.active:
        return PushOutcome("invalid", error_code="CHANNEL_SUSPENDED", error_message="channel is not active")
    if channel.max_amount is not None and amount > channel.max_amount:
        return PushOutcome("invalid", error_code="AMOUNT_ABOVE_CHANNEL_LIMIT",
                           error_message=f"amount is above the channel's limit of {channel.max_amount}")
    return None


class Querier:
    STATUS = {QueryStatus.FINAL_SUCCESS: "SUCCESS", QueryStatus.FINAL_FAILURE: "FAILED",
              QueryStatus.STILL_PROCESSING: "PROCESSING"}

    def __init__(self, pool, daraja, channels: Channels, producer: EventProducer, throttle: ShortcodeThrottle):
        self.pool, self.daraja, self.channels, self.producer, self.throttle = pool, daraja, channels, producer, throttle

    async def handle(self, event: ConsumedEvent) -> None:
        v = event.value
        status, code, desc = await self._query(v)
        QUERIES.labels(status).inc()
        await self.producer.publish(STK_QUERY_RESULT, {
            **new_event_fields(v["channel_id"], v["payment_id"]), "checkout_request_id": v["checkout_request_id"],
            "status": status, "result_code": code, "result_desc": desc, "attempt": v["attempt"]})

    async def _query(self, v: dict) -> tuple[str, str | None, str | None]:
        version = await claims.credential_version(self.pool, v["payment_id"])
        channel = await (self.channels.at_version(v["channel_id"], version) if version
                         else self.channels.current(v["channel_id"]))  # the app that made the push
        if channel is None or not v["checkout_request_id"]:
            return "ERROR", None, "nothing to query with" if channel else "unknown channel"
        await self.throttle.acquire(channel.shortcode.business_shortcode)
        try:
            result = await self.daraja.query(channel.app, channel.shortcode, v["checkout_request_id"])
        except DarajaError as exc:
            if exc.error_code == SPIKE_ARREST:
                self.throttle.spike_arrested(channel.shortcode.business_shortcode)
            return "ERROR", exc.error_code, untrusted(str(exc))
        return self.STATUS[result.status], result.result_code, result.result_desc
