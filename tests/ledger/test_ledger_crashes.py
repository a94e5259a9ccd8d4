"""The ledger service killed with SIGKILL mid-stream, and PostgreSQL restarted under it: every
payment still ends Settled, and no fact is applied twice (history and audit show each once)."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid

from services.common.topics import ACCESS, CALLBACK_RAW, PAYMENT_REQUESTED, STK_PUSH_RESULT
from tests.conftest import ROOT, eventually, free_port, service_env, start_service
from tests.ledger.callbacks import success
from tests.ledger.test_ledger_db import accepted, callback, receipt, requested
from tests.platform.kafka_helpers import start_group_at_end

PAYMENTS = 2000


async def publish_payments(producer, channel: str, unique: str) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(PAYMENTS)]
    topics = {"payment_requested": PAYMENT_REQUESTED, "stk_push_result": STK_PUSH_RESULT, "callback_raw": CALLBACK_RAW}
    events = []
    for i, pid in enumerate(ids):
        checkout = f"ws_CO_{unique}{i}"
        events += [requested(channel, pid), accepted(channel, pid, checkout),
                   callback(channel, pid, success(checkout, receipt=f"{receipt(unique)[:6]}{i:04d}"))]
    await asyncio.gather(*(producer.publish(topics[e.schema], e.value) for e in events))
    return ids


async def settled_count(pool, channel: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM payments WHERE channel_id = %s AND state = 'Settled'",
                                 (channel,))
        return (await cur.fetchone())[0]


async def assert_each_fact_applied_once(pool, channel: str) -> None:
    async with pool.connection() as conn:
        # A callback may overtake its push result (another topic), so Pending can be skipped; but no
        # state is ever entered twice.
        history = await (await conn.execute(
            "SELECT h.payment_id, count(*) - count(DISTINCT h.state) FROM payment_history h"
            " JOIN payments p USING (payment_id) WHERE p.channel_id = %s GROUP BY 1", (channel,))).fetchall()
        # Each of the three facts is applied exactly once (an early one is also audited when parked).
        audit = await (await conn.execute(
            "SELECT a.payment_id, count(DISTINCT a.event_id) * 10 + count(*) FROM audit_log a"
            " JOIN payments p USING (payment_id) WHERE p.channel_id = %s AND a.verdict <> 'parked' GROUP BY 1",
            (channel,))).fetchall()
    assert len(history) == PAYMENTS and {repeats for _, repeats in history} == {0}
    assert len(audit) == PAYMENTS and {n for _, n in audit} == {33}  # 3 distinct events, 3 entries


def ledger(infra, group: str, new_group: bool = True):
    if new_group:
        start_group_at_end(infra["KAFKA_BOOTSTRAP_SERVERS"], group, [t.name for t in ACCESS["ledger"].reads])
    return start_service("services.ledger", service_env(infra, LEDGER_GROUP_ID=group, LEDGER_METRICS_PORT=free_port()))


async def test_a_ledger_killed_mid_stream_loses_nothing_and_applies_nothing_twice(infra, producer, pool, unique):
    channel, group = f"crash-{unique}", f"ledger-crash-{unique}"
    first = ledger(infra, group)
    try:
        await publish_payments(producer, channel, unique)
        await eventually(lambda: _at_least(pool, channel, 1), timeout=60, interval=0.01)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    done_before_restart = await settled_count(pool, channel)

    second = ledger(infra, group, new_group=False)
    try:
        await eventually(lambda: _at_least(pool, channel, PAYMENTS), timeout=90)
        await eventually(lambda: all_facts_applied(pool, channel), timeout=60)
    finally:
        second.terminate()
        second.wait(30)
    assert done_before_restart < PAYMENTS  # the kill really happened mid-stream
    await assert_each_fact_applied_once(pool, channel)


async def test_postgresql_restarted_mid_stream_loses_nothing(infra, producer, pool, unique):
    channel, group = f"pgrestart-{unique}", f"ledger-pg-{unique}"
    service = ledger(infra, group)
    try:
        await publish_payments(producer, channel, unique)
        await eventually(lambda: _at_least(pool, channel, 1), timeout=60, interval=0.01)
        subprocess.run(["bash", "infra/postgres.sh", "stop"], cwd=ROOT, check=True, capture_output=True)
        await asyncio.sleep(2)
        subprocess.run(["bash", "infra/postgres.sh", "start"], cwd=ROOT, check=True, capture_output=True)
        await eventually(lambda: _at_least(pool, channel, PAYMENTS), timeout=120, interval=0.5)
        await eventually(lambda: all_facts_applied(pool, channel), timeout=60, interval=0.5)
        assert service.poll() is None  # it rode out the outage instead of crashing
    finally:
        service.terminate()
        service.wait(30)
    await assert_each_fact_applied_once(pool, channel)


async def all_facts_applied(pool, channel: str) -> bool:
    """Settled is not the end: a push result on another topic may still be on its way."""
    try:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(DISTINCT a.event_id) FROM audit_log a JOIN payments p USING"
                                     " (payment_id) WHERE p.channel_id = %s AND a.verdict <> 'parked'", (channel,))
            return (await cur.fetchone())[0] >= 3 * PAYMENTS
    except Exception:  # PostgreSQL is restarting
        return False


async def _at_least(pool, channel: str, n: int) -> bool:
    try:
        return await settled_count(pool, channel) >= n
    except Exception:  # PostgreSQL is restarting
        return False
