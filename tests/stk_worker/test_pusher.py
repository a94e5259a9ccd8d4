"""The STK worker against the real broker, database and the Daraja simulator: one push per payment."""
from __future__ import annotations

import asyncio
import functools
import os
import secrets
import subprocess
import sys
import uuid

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from services.channels.vault import DecryptionFailed
from services.common import config
from services.common.db import open_pool
from services.common.kafka import ConsumedEvent, PublishError, Transient, per_event
from services.common.topics import PAYMENT_REQUESTED, STK_PUSH_RESULT, Topic
from services.daraja.client import DarajaClient
from services.daraja.models import AppCredentials, PushAccepted, Shortcode, StkPushRequest
from services.daraja_sandbox.settings import DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY
from services.stk_worker.bootstrap import SETTINGS, Worker, WorkerSettings, build
from services.stk_worker.channels import ChannelAccess
from services.stk_worker.claims import PostgresClaims
from services.stk_worker.errors import is_transient
from services.stk_worker.throttle import ShortcodeThrottle
from services.stk_worker.worker import Pusher, PushSettings
from tests.conftest import ROOT, database_url_of, eventually, free_port
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


WORKER_SETTINGS = config.load_into(WorkerSettings, SETTINGS, {"WEBHOOK_TOKEN_SECRETS": SECRET.decode()})


async def worker_for(sandbox: str, pool, producer, *, daraja=None, **push) -> Worker:
    """The worker built as `python -m services.stk_worker` builds it, on the sandbox and the test's pool."""
    return await build(WORKER_SETTINGS, claims=PostgresClaims(pool, f"test-{uuid.uuid4().hex[:8]}"),
                       daraja=daraja or DarajaClient(sandbox), channels=SandboxChannels(), publisher=producer,
                       throttle=ShortcodeThrottle(200, 50),
                       push_settings=PushSettings("http://127.0.0.1:9", SECRET, backoff_s=0.01, **push))


async def pusher_for(sandbox: str, pool, producer, *, daraja=None) -> Pusher:
    return (await worker_for(sandbox, pool, producer, daraja=daraja)).pusher


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
    pusher = await pusher_for(sandbox, pool, producer)
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
    await (await pusher_for(sandbox, pool, producer)).handle(as_event(request))
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
    await (await pusher_for(sandbox, pool, producer)).handle(as_event(request))
    assert pushes_for(sandbox, unique[:12].upper()) == []
    [result] = results_for(kafka_bootstrap, codec, request["payment_id"], expected=1, since=mark)
    assert (result["outcome"], result["error_code"]) == ("INVALID", code)


def claim_row(pool):
    async def read(payment_id: str):
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT status, checkout_request_id, owner FROM stk_push_claims"
                                     " WHERE payment_id = %s", (payment_id,))
            return await cur.fetchone()
    return read


class AfterTheAnswer:
    """The sandbox's Daraja, with `then()` run once Daraja answered a push and before the worker
    records the answer: the moment a failing database used to make the worker forget it."""

    def __init__(self, sandbox: str, then):
        self.client, self.then = DarajaClient(sandbox), then

    async def push(self, app: AppCredentials, shortcode: Shortcode, request: StkPushRequest) -> PushAccepted:
        answer = await self.client.push(app, shortcode, request)
        await self.then()
        return answer

    async def query(self, app, shortcode, checkout_request_id):
        return await self.client.query(app, shortcode, checkout_request_id)


async def test_daraja_s_answer_is_recorded_across_a_postgresql_restart(sandbox, infra, pool, producer, codec,
                                                                       kafka_bootstrap, unique, mark):
    """PostgreSQL stops right after Daraja accepted the push and comes back two seconds later: the
    worker holds the answer, records it once the database is back, and never pushes again."""
    request = {**sample_request(f"ch-{unique}", str(uuid.uuid4())), "account_reference": unique[:12].upper()}
    # The worker's own pool, as its bootstrap opens one: no connection check, so the restart's dead
    # connections surface as errors on the recording itself.
    worker_pool = await open_pool(database_url_of(infra, "stk_worker"), max_size=4, autocommit=True)
    run = functools.partial(subprocess.run, cwd=ROOT, check=True, capture_output=True)
    restarts: list[asyncio.Task] = []

    async def start_in_two_seconds() -> None:
        await asyncio.sleep(2)
        await asyncio.to_thread(run, ["bash", "infra/postgres.sh", "start"])

    async def stop_postgresql_for_two_seconds() -> None:
        await asyncio.to_thread(run, ["bash", "infra/postgres.sh", "stop"])
        restarts.append(asyncio.get_running_loop().create_task(start_in_two_seconds()))

    try:
        pusher = await pusher_for(sandbox, worker_pool, producer,
                                  daraja=AfterTheAnswer(sandbox, stop_postgresql_for_two_seconds))
        await asyncio.wait_for(pusher.handle(as_event(request)), 120)
        assert restarts and restarts[0].done()  # the answer was recorded only after the restart
    finally:
        await asyncio.gather(*restarts)  # PostgreSQL runs again whatever happened
        await worker_pool.close()
    [push] = pushes_for(sandbox, unique[:12].upper())
    status, checkout_request_id, _ = await claim_row(pool)(request["payment_id"])
    assert (status, checkout_request_id) == ("accepted", push["CheckoutRequestID"])
    [result] = results_for(kafka_bootstrap, codec, request["payment_id"], expected=1, since=mark)
    assert (result["outcome"], result["checkout_request_id"]) == ("ACCEPTED", push["CheckoutRequestID"])


async def doomed_pool(infra, name: str) -> AsyncConnectionPool:
    """A pool of the worker's role whose connections `terminate(name)` kills."""
    pool = AsyncConnectionPool(database_url_of(infra, "stk_worker"), min_size=4, max_size=4, open=False,
                               kwargs={"autocommit": True, "application_name": name})
    await pool.open(wait=True, timeout=30)
    return pool


def terminator(infra, name: str, terminated: list[int]):
    async def terminate() -> None:
        async with await psycopg.AsyncConnection.connect(database_url_of(infra, "stk_worker"),
                                                         autocommit=True) as conn:  # the same role may signal
            cur = await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                     " WHERE application_name = %s", (name,))
            terminated.extend(row[0] for row in await cur.fetchall())
    return terminate


async def test_daraja_s_answer_is_recorded_when_its_connections_are_terminated(sandbox, infra, pool, producer,
                                                                               unique):
    """Every connection of the worker's pool is terminated (pg_terminate_backend) after Daraja
    answered: the recording fails on a closed connection, is tried again and lands."""
    request = {**sample_request(f"ch-{unique}", str(uuid.uuid4())), "account_reference": unique[:12].upper()}
    worker_pool = await doomed_pool(infra, f"doomed-{unique}")
    terminated: list[int] = []
    try:
        pusher = await pusher_for(sandbox, worker_pool, producer,
                                  daraja=AfterTheAnswer(sandbox, terminator(infra, f"doomed-{unique}", terminated)))
        await asyncio.wait_for(pusher.handle(as_event(request)), 60)
    finally:
        await worker_pool.close()
    assert len(terminated) == 4
    [push] = pushes_for(sandbox, unique[:12].upper())
    status, checkout_request_id, _ = await claim_row(pool)(request["payment_id"])
    assert (status, checkout_request_id) == ("accepted", push["CheckoutRequestID"])


class RefusesUntilAllowed:
    """The producer, refusing every result until the test allows it (Kafka did not acknowledge them)."""

    def __init__(self, producer):
        self.producer, self.allowed = producer, False

    async def publish(self, topic: Topic, record: dict) -> None:
        if not self.allowed:
            raise PublishError("the broker did not acknowledge the result")
        await self.producer.publish(topic, record)


async def test_a_batch_retried_by_the_same_process_reports_its_answers_not_unknown(sandbox, infra, pool, producer,
                                                                                 codec, kafka_bootstrap, unique, mark):
    """The worker's connections are terminated after Daraja answered the first push of a batch, and
    the results are not acknowledged, so the batch is retried by the same worker: every payment is
    reported with Daraja's answer, none pushed twice, none unknown (its own claim, found 'claimed'
    by the retry, used to be marked unknown)."""
    requests = [{**sample_request(f"ch-{unique}", str(uuid.uuid4())), "account_reference": f"{unique[:10]}{i}".upper()}
                for i in range(3)]
    worker_pool = await doomed_pool(infra, f"doomed-{unique}")
    terminated: list[int] = []
    terminate = terminator(infra, f"doomed-{unique}", terminated)

    async def terminate_once() -> None:
        if not terminated:
            await terminate()
    try:
        refusing = RefusesUntilAllowed(producer)
        pusher = await pusher_for(sandbox, worker_pool, refusing, daraja=AfterTheAnswer(sandbox, terminate_once))
        handle_batch = per_event(pusher.handle, is_transient)
        events = [as_event(r) for r in requests]
        with pytest.raises(Transient):  # the consumer loop retries the batch
            await handle_batch(events)
        refusing.allowed = True
        assert await handle_batch(events) == []
    finally:
        await worker_pool.close()
    assert terminated
    for r in requests:
        [push] = pushes_for(sandbox, r["account_reference"])
        results = results_for(kafka_bootstrap, codec, r["payment_id"], expected=1, since=mark)
        assert {(x["outcome"], x["checkout_request_id"]) for x in results} == {("ACCEPTED", push["CheckoutRequestID"])}
        assert (await claim_row(pool)(r["payment_id"]))[:2] == ("accepted", push["CheckoutRequestID"])


class Slow:
    """The sandbox's Daraja, answering a push only after `delay_s`."""

    def __init__(self, sandbox: str, delay_s: float):
        self.client, self.delay_s = DarajaClient(sandbox), delay_s

    async def push(self, app: AppCredentials, shortcode: Shortcode, request: StkPushRequest) -> PushAccepted:
        await asyncio.sleep(self.delay_s)
        return await self.client.push(app, shortcode, request)

    async def query(self, app, shortcode, checkout_request_id):
        return await self.client.query(app, shortcode, checkout_request_id)


async def test_a_push_in_flight_at_another_live_worker_is_reported_not_marked_unknown(sandbox, pool, producer, codec,
                                                                                     kafka_bootstrap, unique, mark):
    """A rebalance hands the event to worker B while worker A's push is in flight (Daraja answers A
    after 3 s): B waits while A's heartbeat moves and reports A's answer; one push, nothing unknown."""
    request = {**sample_request(f"ch-{unique}", str(uuid.uuid4())), "account_reference": unique[:12].upper()}
    a = await worker_for(sandbox, pool, producer, daraja=Slow(sandbox, 3.0))
    b = await worker_for(sandbox, pool, producer, owner_silent_s=1.0, owner_poll_s=0.1)
    a_done = asyncio.Event()
    heartbeat = asyncio.create_task(a.beat_until(a_done, interval_s=0.2))
    try:
        a_push = asyncio.create_task(a.pusher.handle(as_event(request)))
        await eventually(lambda: claim_row(pool)(request["payment_id"]))  # A claimed it and is calling Daraja
        await b.pusher.handle(as_event(request))
        await a_push
    finally:
        a_done.set()
        await heartbeat
    [push] = pushes_for(sandbox, unique[:12].upper())
    results = results_for(kafka_bootstrap, codec, request["payment_id"], expected=2, since=mark)
    assert [(r["outcome"], r["checkout_request_id"]) for r in results] == [("ACCEPTED", push["CheckoutRequestID"])] * 2


async def test_a_claim_whose_worker_stopped_beating_is_an_unknown_outcome(sandbox, pool, producer, codec,
                                                                         kafka_bootstrap, unique, mark):
    """A worker claimed a payment and died (its heartbeat row stays, unmoving): the next worker waits
    until it has seen the heartbeat stand still, then reports the push as unknown and never pushes."""
    request = {**sample_request(f"ch-{unique}", str(uuid.uuid4())), "account_reference": unique[:12].upper()}
    dead = PostgresClaims(pool, f"dead-{unique}")
    await dead.beat()
    assert await dead.claim(request["payment_id"], request["channel_id"], 1) is None
    pusher = (await worker_for(sandbox, pool, producer, owner_silent_s=1.0, owner_poll_s=0.1)).pusher
    await pusher.handle(as_event(request))
    assert pushes_for(sandbox, unique[:12].upper()) == []
    [result] = results_for(kafka_bootstrap, codec, request["payment_id"], expected=1, since=mark)
    assert result["outcome"] == "OUTCOME_UNKNOWN"
    assert (await claim_row(pool)(request["payment_id"]))[0] == "unknown"


async def test_a_heartbeat_after_the_database_restarted_is_not_lost_to_the_pool_s_broken_connections(infra):
    """Every idle connection of the pool is broken (as a PostgreSQL restart leaves them): the next
    beat still lands, instead of failing once per broken connection, 2 s apart, for long enough
    that other workers judge a live worker gone."""
    name = f"doomed-{uuid.uuid4().hex[:8]}"
    worker_pool = await doomed_pool(infra, name)
    terminated: list[int] = []
    try:
        claims = PostgresClaims(worker_pool, f"beating-{name}")
        await claims.beat()
        before = await claims.heartbeat_of(f"beating-{name}")
        await terminator(infra, name, terminated)()
        assert len(terminated) == 4 and before is not None
        await claims.beat()  # the first beat after the restart
        assert await claims.heartbeat_of(f"beating-{name}") == before + 1
    finally:
        await worker_pool.close()
