"""Two processes each of the webhook gateway, the STK worker and the ledger (`make run GATEWAYS=2
WORKERS=2 LEDGERS=2`) on the real broker, database and Daraja sandbox (docs/scaling.md).

A batch of payments on channels spread over every partition, settled, cancelled and settled with a
duplicated callback: each payment ends in its final state, the sandbox saw exactly one push per
payment, each fact was applied once (the history has each state once, the audit trail decided each
event once) and every process of each service took part. The status topic carries each transition
under one event id: a consumer deduplicating on event_id sees each transition once. Then the same
with one worker and one ledger killed (SIGKILL) in the middle of a batch: still never a second push,
every payment final, nothing applied twice.
"""
from __future__ import annotations

import asyncio
import collections
import uuid
import zlib

import httpx
import pytest

from services.common.topics import PAYMENT_REQUESTED, PAYMENT_STATUS
from tests.conftest import eventually
from tests.e2e.stack import Stack, new_reference, running
from tests.platform.kafka_helpers import end_offsets, read_all

SCALED = {"gateway": 2, "worker": 2, "ledger": 2}
PAYMENTS = 200
# The sandbox's amount selectors (services/daraja_sandbox/scenarios.py): 9SSSS picks scenario SSSS.
OUTCOMES = {10: "Settled", 91032: "Cancelled", 95002: "Settled"}  # 95002: the callback comes twice
FINAL = ("Settled", "Cancelled", "Failed", "Review")
REVIEW_AFTER_S = 45  # a push claimed by a killed worker has no known outcome: Review at this deadline


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    # Daraja answers each push after 300 ms (the benchmark's default), so a kill lands on pushes in flight.
    yield from running(infra, tmp_path_factory.mktemp("e2e-scaled"), instances=SCALED,
                       sandbox_args=["--latency-ms", "300"], extra_env={"LEDGER_REVIEW_AFTER_S": str(REVIEW_AFTER_S)})


async def _channels(stack: Stack, pool, kafka_bootstrap: str, prefix: str) -> list[tuple[str, str]]:
    """A channel on every partition of the requests topic (topics are keyed by channel id and
    librdkafka's default partitioner is CRC-32 of the key), so every process gets some of the work."""
    partitions = len(end_offsets(kafka_bootstrap, PAYMENT_REQUESTED.name))
    chosen: dict[int, str] = {}
    for i in range(1000):
        channel_id = f"{prefix}{i}-{stack.unique}"
        chosen.setdefault(zlib.crc32(channel_id.encode()) % partitions, channel_id)
        if len(chosen) == partitions:
            break
    return [(c, await stack.onboard(pool, c)) for c in chosen.values()]


async def _pay_batch(stack: Stack, channels, count: int) -> dict[str, tuple[str, int, str]]:
    """payment_id -> (channel_id, amount, reference), each to a number of its own (one open prompt per phone)."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as http:
        async def pay(i: int) -> tuple[str, tuple[str, int, str]]:
            channel_id, api_key = channels[i % len(channels)]
            amount, reference = list(OUTCOMES)[i % len(OUTCOMES)], new_reference()
            response = await http.post(f"{stack.ingress_url}/api/payments", headers={
                "Authorization": f"Bearer {api_key}", "Idempotency-Key": str(uuid.uuid4())}, json={
                "channelId": channel_id, "amount": amount, "phone": f"2547{uuid.uuid4().int % 10**8:08d}",
                "accountReference": reference})
            assert response.status_code == 202, response.text
            return response.json()["paymentId"], (channel_id, amount, reference)
        return dict(await asyncio.gather(*(pay(i) for i in range(count))))


async def _states(pool, payment_ids) -> dict[str, str]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT payment_id, state FROM payments WHERE payment_id = ANY(%s)",
                                 (list(payment_ids),))
        return dict(await cur.fetchall())


async def _all_final(pool, payment_ids) -> dict[str, str] | None:
    states = await _states(pool, payment_ids)
    return states if len(states) == len(payment_ids) and set(states.values()) <= set(FINAL) else None


def _accepted_pushes(stack: Stack) -> collections.Counter:
    pushes = httpx.get(f"{stack.sandbox_url}/sandbox/pushes", params={"status": "accepted"},
                       headers=stack.sandbox_admin_headers, timeout=30).json()["pushes"]
    return collections.Counter(p["AccountReference"] for p in pushes)


def _metric_sum(stack: Stack, name: str, metric: str, having: str = "") -> float:
    text = httpx.get(f"{stack.ops_url(name)}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((metric + "{", metric + " ")) and having in line)


async def _every_consumer_assigned(stack: Stack) -> bool:
    """Each worker and ledger reports the lag of partitions it was given: the groups have spread."""
    return all("pipeline_consumer_lag{" in httpx.get(f"{stack.ops_url(name)}/metrics", timeout=10).text
               for name in stack.names("worker") + stack.names("ledger"))


async def _applied_once(pool, payment_ids) -> None:
    """Each state once in each payment's history, and each event decided once in the audit trail (a
    fact parked for its payment is audited again when it applies)."""
    async with pool.connection() as conn:
        repeated_states = await (await conn.execute(
            "SELECT payment_id, state, count(*) FROM payment_history WHERE payment_id = ANY(%s)"
            " GROUP BY 1, 2 HAVING count(*) > 1", (list(payment_ids),))).fetchall()
        decided_twice = await (await conn.execute(
            "SELECT payment_id, event_id, count(*) FROM audit_log WHERE payment_id = ANY(%s) AND verdict <> 'parked'"
            " GROUP BY 1, 2 HAVING count(*) > 1", (list(payment_ids),))).fetchall()
    assert repeated_states == [] and decided_twice == []


async def _history(pool, payment_ids) -> dict[str, list[str]]:
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT payment_id, state FROM payment_history WHERE payment_id = ANY(%s)"
                                         " ORDER BY id", (list(payment_ids),))).fetchall()
    history: dict[str, list[str]] = collections.defaultdict(list)
    for payment_id, state in rows:
        history[payment_id].append(state)
    return history


async def test_two_of_each_settle_a_batch_with_one_push_and_one_application_per_payment(
        stack, pool, kafka_bootstrap, codec):
    channels = await _channels(stack, pool, kafka_bootstrap, "scaled")
    await eventually(lambda: _every_consumer_assigned(stack), timeout=60, interval=0.5)
    mark = end_offsets(kafka_bootstrap, PAYMENT_STATUS.name)
    paid = await _pay_batch(stack, channels, PAYMENTS)

    states = await eventually(lambda: _all_final(pool, paid), timeout=120, interval=1)
    assert {pid: states[pid] for pid in paid} == {pid: OUTCOMES[amount] for pid, (_, amount, _) in paid.items()}
    pushes = _accepted_pushes(stack)
    assert [pushes[reference] for _, _, reference in paid.values()] == [1] * PAYMENTS
    await _applied_once(pool, paid)
    # Every process of each service took part: the partitions and the callbacks were spread.
    for name in stack.names("worker"):
        assert _metric_sum(stack, name, "daraja_request_seconds_count", 'endpoint="stkpush"') > 0, name
    for name in stack.names("ledger"):
        assert _metric_sum(stack, name, "ledger_facts_total") > 0, name
    accepted = {name: _metric_sum(stack, name, "webhook_callbacks_accepted_total") for name in stack.names("gateway")}
    assert all(accepted.values()) and sum(accepted.values()) >= PAYMENTS, accepted

    # The status topic: each transition under one event id (a repeat is the same event), so a consumer
    # that deduplicates on event_id sees each payment's history once.
    history = await _history(pool, paid)
    transitions = sum(len(h) for h in history.values())
    keys = {c.encode() for c, _ in channels}
    messages = read_all(kafka_bootstrap, PAYMENT_STATUS.name, lambda m: m.key() in keys, expected=transitions,
                        since=mark)
    seen: dict[str, dict[str, set[str]]] = collections.defaultdict(lambda: collections.defaultdict(set))
    arrived: dict[str, list[str]] = collections.defaultdict(list)  # statuses in topic order, repeats left out
    for message in messages:  # a payment's events share its channel's partition: in offset order here
        record = codec.decode(message.value())[1]
        if record["event_id"] not in seen[record["payment_id"]][record["status"]]:
            arrived[record["payment_id"]].append(record["status"])
        seen[record["payment_id"]][record["status"]].add(record["event_id"])
    for payment_id, states_seen in seen.items():
        assert sorted(states_seen) == sorted(history[payment_id]), payment_id
        assert all(len(ids) == 1 for ids in states_seen.values()), (payment_id, states_seen)
    assert set(seen) == set(paid)
    overtaken = sum(arrived[pid] != history[pid] for pid in paid)  # allowed with several ledgers (docs/scaling.md §3)
    print(f"status events: {len(messages)} messages for {transitions} transitions; "
          f"{overtaken} payments' events arrived out of order")


async def test_a_worker_and_a_ledger_killed_mid_batch_never_push_twice_nor_apply_twice(stack, pool, kafka_bootstrap):
    channels = await _channels(stack, pool, kafka_bootstrap, "killed")
    await eventually(lambda: _every_consumer_assigned(stack), timeout=60, interval=0.5)
    paying = asyncio.create_task(_pay_batch(stack, channels, PAYMENTS))

    async def a_push_in_flight_on_every_channel() -> bool:
        """Then whichever worker is killed has pushes in flight. Waiting for a count of answered pushes
        instead, on a loaded machine the killed worker had sometimes answered all of its own by then."""
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(DISTINCT channel_id) FROM stk_push_claims WHERE status = 'claimed'"
                                     " AND channel_id = ANY(%s)", ([channel for channel, _ in channels],))
            return (await cur.fetchone())[0] == len(channels)
    await eventually(a_push_in_flight_on_every_channel, timeout=60, interval=0.01)
    stack.kill("worker")
    stack.kill("ledger")  # the others take their partitions over once their sessions expire (10 s)
    paid = await paying  # the requests still coming meanwhile go to the survivors

    states = await eventually(lambda: _all_final(pool, paid), timeout=REVIEW_AFTER_S + 120, interval=1)
    pushes = _accepted_pushes(stack)
    counts = {pid: pushes[reference] for pid, (_, _, reference) in paid.items()}
    assert max(counts.values()) == 1  # never a second prompt
    for payment_id, (_, amount, _) in paid.items():
        # Pushed: ended by its callback. Never pushed (claimed by the killed worker before the request
        # left): its outcome is unknown, so it goes to Review at its deadline, never re-pushed.
        assert states[payment_id] == (OUTCOMES[amount] if counts[payment_id] == 1 else "Review"), payment_id
    await _applied_once(pool, paid)
    async with pool.connection() as conn:
        claims = dict(await (await conn.execute(
            "SELECT status, count(*) FROM stk_push_claims WHERE payment_id = ANY(%s) GROUP BY 1",
            (list(paid),))).fetchall())
    assert claims.get("unknown", 0) >= 1, claims  # the kill really caught pushes in flight
    print(f"after the kills: claims {claims}; {list(counts.values()).count(0)} never pushed, in Review")
