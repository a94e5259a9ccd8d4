"""The parts /readyz is made of: the database check (cheap under scraping, quick to say no), a
producer's readiness after a delivery fails, the pipeline_ready and build_info gauges."""
from __future__ import annotations

import asyncio
import platform
import socket
import uuid
from importlib import metadata

from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool

from services.common.kafka import EventProducer, ensure_topics
from services.common.observability import DatabaseCheck, Health, record_build_info
from services.common.topics import Topic
from tests.conftest import eventually
from tests.platform.kafka_helpers import sample_request


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


async def _true(value) -> bool:
    return bool(value)


async def test_the_database_check_passes_and_many_scrapes_share_one_query(pool):
    now = [0.0]
    check = DatabaseCheck(pool, cache_s=2.0, clock=lambda: now[0])
    before = pool.get_stats().get("requests_num", 0)

    assert await asyncio.gather(*(check() for _ in range(20))) == [True] * 20
    now[0] = 1.9
    assert await check()

    assert pool.get_stats().get("requests_num", 0) - before == 1  # one connection taken for 21 answers
    now[0] = 2.1  # the answer is older than cache_s: asked again
    assert await check()
    assert pool.get_stats().get("requests_num", 0) - before == 2


async def test_the_database_check_fails_quickly_when_postgresql_does_not_answer():
    pool = AsyncConnectionPool(f"postgresql://nobody@127.0.0.1:{closed_port()}/mpesa", min_size=1, open=False)
    await pool.open(wait=False)
    try:
        health = Health()
        health.add("database", DatabaseCheck(pool, timeout_s=1.0))
        assert await asyncio.wait_for(health.failing(), 5) == ["database"]
        assert REGISTRY.get_sample_value("pipeline_ready", {"check": "database"}) == 0
    finally:
        await pool.close(timeout=1)


async def test_a_check_that_raises_is_failing_and_the_others_are_still_asked():
    def broken() -> bool:
        raise RuntimeError("cannot tell")

    health = Health()
    health.add("broken", broken)
    health.add(f"fine-{uuid.uuid4().hex[:6]}", lambda: True)
    assert await health.failing() == ["broken"]


async def test_a_producer_is_not_ready_after_a_delivery_failed_until_one_succeeds(kafka_bootstrap, codec, unique):
    """Goal: a broker that stays connected but refuses deliveries makes the producer not ready.
    Method: publish to a topic that does not exist (the broker creates none), then to one that does."""
    real = Topic(f"test.ready.{unique}", "payment_requested")
    missing = Topic(f"test.ready.missing.{unique}", "payment_requested")
    ensure_topics(kafka_bootstrap, [real], 1)
    await codec.prepare([real, missing])
    producer = EventProducer(kafka_bootstrap, codec, client_id=f"ready-{unique}", delivery_timeout_ms=2000)
    try:
        await eventually(lambda: _true(producer.ready()), timeout=30)  # statistics every 5 s say a broker is up
        try:
            await producer.publish(missing, sample_request(f"ch-{unique}", str(uuid.uuid4())))
        except Exception:  # PublishError: not acknowledged within the delivery timeout
            pass
        assert producer.reachability.connected() and not producer.ready()

        await producer.publish(real, sample_request(f"ch-{unique}", str(uuid.uuid4())))
        assert producer.ready()
    finally:
        producer.close()


async def test_a_producer_that_sends_nothing_after_a_failed_delivery_is_ready_again_once_the_failure_is_old(
        kafka_bootstrap, codec, unique):
    """Goal: a process taken out of rotation for a failed delivery (the ingress, the webhook
    gateway: a load balancer stops sending it requests, so it produces nothing) is not kept out for
    ever once the broker takes the topic again. Method: fail a delivery to a topic that does not
    exist, create it, publish nothing: ready again when the failure is older than the producer
    remembers one; a later failure would turn it back."""
    late = Topic(f"test.ready.late.{unique}", "payment_requested")
    await codec.prepare([late])
    producer = EventProducer(kafka_bootstrap, codec, client_id=f"ready-late-{unique}", delivery_timeout_ms=2000,
                             failure_remembered_s=3.0)
    try:
        await eventually(lambda: _true(producer.ready()), timeout=30)
        try:
            await producer.publish(late, sample_request(f"ch-{unique}", str(uuid.uuid4())))
        except Exception:  # PublishError: the topic does not exist yet
            pass
        assert producer.reachability.connected() and not producer.ready()
        ensure_topics(kafka_bootstrap, [late], 1)
        await eventually(lambda: _true(producer.ready()), timeout=30)
    finally:
        producer.close()


def test_build_info_names_the_installed_release_and_python():
    record_build_info()
    labels = {"version": metadata.version("mpesa-pipeline"), "python": platform.python_version()}
    assert REGISTRY.get_sample_value("mpesa_pipeline_build_info", labels) == 1
