"""The STK worker against the real broker, database and the Daraja simulator: one push per payment."""
from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import uuid

import httpx
import pytest

from services.common.kafka import ConsumedEvent
from services.common.topics import PAYMENT_REQUESTED, STK_PUSH_RESULT
from services.daraja.client import DarajaClient
from services.daraja.models import AppCredentials, Shortcode
from services.daraja_sandbox.settings import DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY
from services.stk_worker.throttle import ShortcodeThrottle
from services.channels.vault import DecryptionFailed
from services.stk_worker.channels import ChannelAccess
from services.stk_worker.worker import Pusher, PushSettings
from tests.conftest import ROOT, free_port
from tests.platform.kafka_helpers import end_offsets, read_all, sample_request

SECRET = b"x" * 32
SANDBOX_ADMIN_TOKEN = secrets.token_urlsafe(32)
SANDBOX_ADMIN = {"Authorization": f"Bearer {SANDBOX_ADMIN_TOKEN}"}  # the sandbox's push log needs it


@pytest.fixture(scope="module")
def sandbox():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.daraja_sandbox", "--port", str(port),
                             "--callback-delay-ms", "0", "--no-subscriber-lock"], cwd=ROOT,
                            env={**os.environ, "DARAJA_SANDBOX_ADMIN_TOKEN": SANDBOX_ADMIN_TOKEN})
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{base}/sandbox/health").status_code == 200:
                break
        except httpx.TransportError:
            import time
            time.sleep(0.1)
    yield base
    proc.terminate()
    proc.wait(10)


class SandboxChannels:
    """Every channel is the public sandbox app (174379), except ids starting 'gone' (unknown)."""

    async def current(self, channel_id: str):
        if channel_id.startswith("gone"):
            return None
        if channel_id.startswith("locked"):
            raise DecryptionFailed("credentials of channel 'locked' version 1 cannot be decrypted")
        return ChannelAccess(channel_id, True, Shortcode("174379"),
                             AppCredentials(DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY), 1, 5000)

    async def at_version(self, channel_id: str, version: int):
        return await self.current(channel_id)


def pusher_for(sandbox: str, pool, producer) -> Pusher:
    return Pusher(pool, DarajaClient(sandbox), SandboxChannels(), producer, ShortcodeThrottle(200, 50),
                  PushSettings("http://127.0.0.1:9", SECRET, backoff_s=0.01))


def as_event(value: dict) -> ConsumedEvent:
    return ConsumedEvent(PAYMENT_REQUESTED.name, 0, 0, value["channel_id"].encode(), "payment_requested", value)


def pushes_for(sandbox: str, reference: str) -> list:
    return httpx.get(f"{sandbox}/sandbox/pushes", params={"AccountReference": reference},
                     headers=SANDBOX_ADMIN).json()["pushes"]


@pytest.fixture
def mark(kafka_bootstrap):
    return end_offsets(kafka_bootstrap, STK_PUSH_RESULT.name)


def results_for(kafka_bootstrap, codec, payment_id: str, expected: int, since) -> list[dict]:
    found = read_all(kafka_bootstrap, STK_PUSH_RESULT.name,
                     lambda m: codec.decode(m.value())[1]["payment_id"] == payment_id, expected, since=since)
    return [codec.decode(m.value())[1] for m in found]


async def test_a_request_is_pushed_once_even_when_delivered_twice(sandbox, pool, producer, codec, kafka_bootstrap,
                                                                 unique, mark):
    request = {**sample_request(f"ch-{unique}", str(uuid.uuid4())), "account_reference": unique[:12].upper()}
    pusher = pusher_for(sandbox, pool, producer)
    await pusher.handle(as_event(request))
    await pusher.handle(as_event(request))  # redelivery
    await asyncio.gather(pusher.handle(as_event(request)), pusher.handle(as_event(request)))  # concurrent duplicates

    assert len(pushes_for(sandbox, unique[:12].upper())) == 1
    results = results_for(kafka_bootstrap, codec, request["payment_id"], expected=4, since=mark)
    assert {r["outcome"] for r in results} == {"ACCEPTED"}
    assert len({r["checkout_request_id"] for r in results}) == 1


async def test_a_claim_left_by_a_dead_worker_is_never_pushed_again(sandbox, pool, producer, codec,
                                                                  kafka_bootstrap, unique, mark):
    request = {**sample_request(f"ch-{unique}", str(uuid.uuid4())), "account_reference": unique[:12].upper()}
    async with pool.connection() as conn:  # as if a worker claimed it and died before Daraja answered
        await conn.execute("INSERT INTO stk_push_claims (payment_id, channel_id, status) VALUES (%s, %s, 'claimed')",
                           (request["payment_id"], request["channel_id"]))
    await pusher_for(sandbox, pool, producer).handle(as_event(request))
    assert pushes_for(sandbox, unique[:12].upper()) == []
    [result] = results_for(kafka_bootstrap, codec, request["payment_id"], expected=1, since=mark)
    assert result["outcome"] == "OUTCOME_UNKNOWN"


@pytest.mark.parametrize("change, code", [
    ({"amount": 0}, "INVALID_REQUEST"),
    ({"phone": "0712345678"}, "INVALID_REQUEST"),
    ({"channel_id": "gone-channel"}, "CHANNEL_UNKNOWN"),
    ({"channel_id": "locked-channel"}, "CREDENTIALS_UNREADABLE"),
    ({"amount": 5001}, "AMOUNT_ABOVE_CHANNEL_LIMIT"),
])
async def test_bad_requests_from_the_topic_are_never_pushed(sandbox, pool, producer, codec, kafka_bootstrap,
                                                           unique, change, code, mark):
    request = {**sample_request(f"ch-{unique}", str(uuid.uuid4())), "account_reference": unique[:12].upper(),
               **change}
    await pusher_for(sandbox, pool, producer).handle(as_event(request))
    assert pushes_for(sandbox, unique[:12].upper()) == []
    [result] = results_for(kafka_bootstrap, codec, request["payment_id"], expected=1, since=mark)
    assert (result["outcome"], result["error_code"]) == ("INVALID", code)
