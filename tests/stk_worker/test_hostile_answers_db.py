"""Daraja's answers are foreign text: what the worker records of them must be storable by PostgreSQL,
or the claim's finish fails on every retry and the push, its batch and its partition wait for good."""
from __future__ import annotations

import asyncio
import uuid

import pytest
from psycopg_pool import AsyncConnectionPool

from services.common.kafka import ConsumedEvent
from services.common.topics import PAYMENT_REQUESTED, STK_PUSH_RESULT
from services.daraja.errors import ErrorKind
from services.daraja.models import PushAccepted
from services.stk_worker.bootstrap import build
from services.stk_worker.claims import ClaimStatus, PostgresClaims, PushOutcome
from services.stk_worker.throttle import ShortcodeThrottle
from services.stk_worker.worker import PushSettings
from tests.platform.kafka_helpers import sample_request
from tests.stk_worker.fakes import FakeChannels, FakeClock, RecordingPublisher, ScriptedDaraja, daraja_error
from tests.stk_worker.test_push_path import WORKER_SETTINGS

NUL_CHECKOUT = PushAccepted("mr-\x00", "ws_CO_\x001", "0", "Success. Request accepted for processing")


@pytest.mark.parametrize("answer, outcome, checkout", [
    (NUL_CHECKOUT, "OUTCOME_UNKNOWN", None),
    (PushAccepted("mr-\ud800", "ws_CO_2", "0", "ok"), "ACCEPTED", "ws_CO_2"),
    (daraja_error(ErrorKind.PERMANENT, code="400.\x00"), "REFUSED", None),
    (daraja_error(ErrorKind.OUTCOME_UNKNOWN, code="\ud800"), "OUTCOME_UNKNOWN", None),
])
async def test_an_answer_with_text_postgresql_cannot_store_is_recorded_at_once(
        pool: AsyncConnectionPool, answer: PushAccepted | Exception, outcome: str, checkout: str | None) -> None:
    claims = PostgresClaims(pool, f"hostile-{uuid.uuid4().hex[:8]}")
    daraja, clock, stop, publisher = ScriptedDaraja([answer]), FakeClock(), asyncio.Event(), RecordingPublisher()
    daraja.during_push = stop.set  # without a stop, a finish PostgreSQL refuses would be retried for ever
    channels = FakeChannels()
    channels.add("shop")
    worker = await build(WORKER_SETTINGS, claims=claims, daraja=daraja, publisher=publisher, channels=channels,
                         throttle=ShortcodeThrottle(1000.0, burst=1000, clock=clock.monotonic), clock=clock,
                         stop=stop, push_settings=PushSettings("https://gw.example", b"s" * 32, stop_grace_s=5.0))
    request = sample_request("shop", str(uuid.uuid4()))
    await worker.pusher.handle(ConsumedEvent(PAYMENT_REQUESTED.name, 0, 0, b"shop", "r", request))
    result = publisher.records(STK_PUSH_RESULT)[-1]
    assert (result["outcome"], result["checkout_request_id"]) == (outcome, checkout)
    recorded = await PostgresClaims(pool, "another-worker").claim(request["payment_id"], "shop", 1)
    assert isinstance(recorded, PushOutcome) and recorded.status is not ClaimStatus.CLAIMED
    assert all("\x00" not in (text or "") for text in (recorded.error_code, recorded.merchant_request_id))
    assert len(daraja.pushes) == 1
