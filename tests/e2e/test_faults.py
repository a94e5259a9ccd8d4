"""An operator's bad day, small enough for CI: a few hundred payments through the real stack (each
service its own process, the Daraja sandbox deciding outcomes) while a second STK worker joins and
leaves (two rebalances), PostgreSQL is stopped as a crash would stop it and started again, and the
first STK worker is killed with SIGKILL and restarted.

The sandbox is the witness: it logs every push it received, when, the CheckoutRequestID it answered
and the outcome it chose. Against it the test checks that each payment was pushed at most once, that
no accepted push's CheckoutRequestID was lost (neither its claim nor a push result holds it) unless
the push was in flight in the killed worker, and that every payment ends in the state its outcome
calls for, none in Review when Daraja answered: an eighth of the payments get no callback at all, so
only the ledger's STK query, which needs the CheckoutRequestID, can settle them.
"""
from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from services.common.avro import open_codec
from services.common.topics import STK_PUSH_RESULT
from tests.conftest import ROOT, ServiceProcess, eventually, free_port, kafka_login, start_service
from tests.e2e.stack import Stack, new_reference
from tests.platform.kafka_helpers import end_offsets, read_all

PAYMENTS = 300
RATE_PER_S = 20
LATENCY_S = 1.5  # every Daraja answer waits this long: pushes are in flight when a fault lands
CANCELLED_AMOUNT = 11  # the sandbox answers this amount with ResultCode 1032; any other with success
SILENT_AMOUNT = 12  # paid, but the sandbox never calls back: only the ledger's STK query can tell
FINAL = ("Settled", "Cancelled", "Failed", "Review")
EXPECTED = {0: "Settled", 1032: "Cancelled"}  # the sandbox's ResultCode -> the payment's final state


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    s = Stack(infra, tmp_path_factory.mktemp("faults"), uuid.uuid4().hex[:10],
              sandbox_args=["--latency-ms", str(int(LATENCY_S * 1000))],
              # A payment whose push never reached Daraja goes to Review within the test's time (one
              # whose callback never comes is queried 1 s after it is Pending: the stack's setting).
              extra_env={"LEDGER_REVIEW_AFTER_S": "60"})
    try:
        s.start()  # inside: a service that did not come up is stopped with the others
        yield s
    finally:
        for name, output in s.stop().items():
            print(f"----- {name}\n" + "\n".join(line for line in output.splitlines()[-30:] if not line.startswith("%")))


async def test_payments_through_a_database_restart_a_worker_kill_and_two_rebalances(stack, pool):
    # Payments go in at a steady rate while the faults land, each at its moment.
    faults = Faults(stack)
    outcome = await pay_through(stack, pool, faults, [
        (1, faults.second_worker_joins), (3, faults.restart_postgresql), (2, faults.kill_and_restart_the_worker),
        (4, faults.second_worker_leaves)])
    assert "assigned [('mpesa.payment.requested.v1'" in stack.procs["worker2"].output()  # it took a share
    assert outcome.pushed_twice == []  # never a second prompt
    assert outcome.lost_answers == [], (f"{len(outcome.lost_answers)} payments reported outcome unknown though Daraja "
                                        f"answered them: {faults.when(outcome.lost_answers)}")
    assert outcome.wrong_claims == {}
    assert outcome.wrong_states == {}, f"{len(outcome.wrong_states)} payments not in the state the sandbox's " \
                                       f"outcome calls for: {list(outcome.wrong_states.values())[:5]}"


class Faults:
    """The faults of the day, each noting when it landed (wall-clock time, like the sandbox's push log)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.landed: dict[str, float] = {}
        self._second: ServiceProcess | None = None

    async def second_worker_joins(self) -> None:
        self._second = start_service("services.stk_worker", {
            **self.stack.env, **kafka_login(self.stack.infra, "stk-worker"),
            "STK_WORKER_METRICS_PORT": str(free_port())})
        self.stack.procs["worker2"] = self._second  # its log is kept with the others'
        # Joined once it holds partitions: a worker still starting when the next fault (the database
        # restart) lands cannot check the schema and exits, as a service should, and took no share.
        second = self._second

        async def assigned() -> bool:
            return "assigned [('mpesa.payment.requested.v1'" in second.output()
        await eventually(assigned, timeout=60, interval=0.2)
        self.landed["second worker joined"] = time.time()

    async def second_worker_leaves(self) -> None:
        self.landed["second worker left"] = time.time()
        assert self._second is not None, "the second worker leaves after it joined"
        self._second.terminate()  # leaves the group: its partitions move back
        await asyncio.to_thread(self._second.wait, 60)

    async def restart_postgresql(self, down_s: float = 3) -> None:
        """Stopped the way a crash stops it (no checkpoint, connections cut), then started again."""
        self.landed["postgresql stopped"] = time.time()
        await asyncio.to_thread(subprocess.run, ["bash", "infra/postgres.sh", "stop"], cwd=ROOT, check=True,
                                capture_output=True, env={**os.environ, "PG_STOP_MODE": "immediate"})
        await asyncio.sleep(down_s)
        await asyncio.to_thread(subprocess.run, ["bash", "infra/postgres.sh", "start"], cwd=ROOT, check=True,
                                capture_output=True)

    async def kill_and_restart_the_worker(self) -> None:
        self.landed["worker killed"] = time.time()
        self.stack.kill("worker")
        self.stack.procs["worker-killed"] = self.stack.procs["worker"]  # its log is kept too
        self.stack.start_one("worker", "services.stk_worker")

    def in_flight_at_the_kill(self, push: dict) -> bool:
        """Received by Daraja too late for its answer to reach the killed worker and be recorded:
        only such a push may have lost Daraja's answer."""
        killed_at = self.landed.get("worker killed")
        return killed_at is not None and killed_at - LATENCY_S - 1.0 <= push["receivedAt"] <= killed_at

    def when(self, pushes: list[dict], limit: int | None = 10) -> list[str]:
        """Each push's receipt relative to the nearest fault, for a failure message."""
        def nearest(t: float) -> str:
            name, at = min(self.landed.items(), key=lambda item: abs(t - item[1]))
            return f"{t - at:+.1f}s from '{name}'"
        return [nearest(p["receivedAt"]) for p in pushes[:limit]]


@dataclass
class Outcome:
    pushed_twice: list[str]
    lost_answers: list[dict]  # accepted pushes whose CheckoutRequestID nothing durable holds, not in flight at a kill
    wrong_claims: dict[str, tuple]
    wrong_states: dict[str, tuple]


async def pay_through(stack: Stack, pool, faults: Faults,
                      schedule: list[tuple[float, Callable[[], Awaitable[None]]]]) -> Outcome:
    """Sends PAYMENTS payments while running `schedule` (seconds to wait, then one of `faults`), waits
    until every payment is final, and compares what the pipeline recorded with the sandbox's push log."""
    channel_id = f"faults-{uuid.uuid4().hex[:10]}"
    api_key = await stack.onboard(pool, channel_id)
    async with httpx.AsyncClient(headers=stack.sandbox_admin_headers) as http:
        for amount, scenario in ((CANCELLED_AMOUNT, "cancelled"), (SILENT_AMOUNT, "no_callback")):
            answer = await http.post(f"{stack.sandbox_url}/sandbox/scenarios",
                                     json={"amount": amount, "scenario": scenario})
            assert answer.status_code < 300, answer.text
    bootstrap = stack.infra["KAFKA_BOOTSTRAP_SERVERS"]
    mark = await asyncio.to_thread(end_offsets, bootstrap, STK_PUSH_RESULT.name)
    sending = asyncio.create_task(_send_payments(stack, channel_id, api_key))
    for delay_s, fault in schedule:
        await asyncio.sleep(delay_s)
        await fault()
    paid = await sending

    states = await eventually(lambda: _all_final(pool, channel_id, len(paid)), timeout=120, interval=1)
    claims = await _claims(pool, channel_id)
    # A claim's row may be overwritten later by the worker that still held the push: the results
    # published tell every outcome that was reported.
    results = collections.defaultdict(list)
    published = await asyncio.to_thread(_push_results, bootstrap, channel_id, mark)
    codec = await open_codec(stack.infra.get("SCHEMA_REGISTRY_URL", ""), ())  # learns the worker's ids
    try:
        await codec.learn(published)
        for r in (codec.decode(value)[1] for value in published):
            results[r["payment_id"]].append(r)
    finally:
        await codec.close()
    accepted = collections.defaultdict(list)
    for p in await _sandbox_pushes(stack):
        if p["status"] == "accepted" and p["AccountReference"] in paid.values():
            accepted[p["AccountReference"]].append(p)

    unknown = [pid for pid in paid if claims.get(pid, {}).get("status") == "unknown"
               or any(r["outcome"] == "OUTCOME_UNKNOWN" for r in results[pid])]
    # Daraja's answer is lost when nothing durable carries its CheckoutRequestID: neither the claim
    # nor a push result on Kafka (a worker that cannot record an answer reports it at once).
    known = {pid for pid in paid if claims.get(pid, {}).get("checkout_request_id")
             or any(r["outcome"] == "ACCEPTED" for r in results[pid])}
    lost = [accepted[paid[pid]][0] for pid in unknown if pid not in known
            and accepted[paid[pid]] and not faults.in_flight_at_the_kill(accepted[paid[pid]][0])]
    answered = {ref: pushes[0]["CheckoutRequestID"] for ref, pushes in accepted.items() if pushes}
    recorded = [(pid, claims[pid]["checkout_request_id"]) for pid in paid if claims[pid]["status"] == "accepted"]
    recorded += [(pid, r["checkout_request_id"]) for pid in paid for r in results[pid] if r["outcome"] == "ACCEPTED"]
    wrong_claims = {pid: (checkout_id, answered.get(paid[pid])) for pid, checkout_id in recorded
                    if checkout_id != answered.get(paid[pid])}
    # Pushed: the state the sandbox's outcome calls for (its query can confirm it, so never Review).
    # Never pushed (claimed when its worker was killed, before the request left): Review. So is a
    # payment whose answer died with the killed worker and that gets no callback: nothing can tell.
    answer_died = {pid for pid in unknown if pid not in known}
    silent = {pid for pid, ref in paid.items() if accepted[ref] and accepted[ref][0]["scenario"] == "no_callback"}
    wrong_states = {pid: (states[pid], [p["ResultCode"] for p in accepted[ref]]) for pid, ref in paid.items()
                    if states[pid] != _expected_state(accepted[ref], silent=pid in answer_died and pid in silent)}
    reviews = sum(s == "Review" for s in states.values())
    reported_twice = sum(len(rs) > 1 for rs in results.values())
    near = collections.Counter(w.split("'")[1] for w in faults.when([accepted[paid[pid]][0] for pid in unknown
                                                                     if accepted[paid[pid]]], limit=None))
    print(f"{len(paid)} payments, {sum(map(len, accepted.values()))} pushes accepted; "
          f"outcome unknown (claim or push result): "
          f"{len(unknown)} (Daraja's answer lost: {len(lost)}; nearest fault: {dict(near)}); in Review: {reviews}; "
          f"push results published more than once: {reported_twice}")
    return Outcome([ref for ref in paid.values() if len(accepted[ref]) > 1], lost, wrong_claims, wrong_states)


def _expected_state(pushes: list[dict], silent: bool) -> str:
    if not pushes or silent:
        return "Review"
    return EXPECTED[pushes[0]["ResultCode"]]


async def _send_payments(stack: Stack, channel_id: str, api_key: str) -> dict[str, str]:
    """payment id -> account reference, for PAYMENTS payments sent at RATE_PER_S."""
    async with httpx.AsyncClient(timeout=10) as http:
        async def one(n: int) -> tuple[str, str]:
            await asyncio.sleep(n / RATE_PER_S)
            amount = CANCELLED_AMOUNT if n % 4 == 3 else SILENT_AMOUNT if n % 8 == 1 else 10
            return await _pay(http, stack, channel_id, api_key, f"2547119{n:05d}", amount)
        return dict(await asyncio.gather(*(one(n) for n in range(PAYMENTS))))


async def _pay(http: httpx.AsyncClient, stack: Stack, channel_id: str, api_key: str, phone: str,
               amount: int) -> tuple[str, str]:
    """Sends one payment request and, as a client should, the same again (same key) while the answer
    is 503 (the database restarting) or lost."""
    key, reference = str(uuid.uuid4()), new_reference()
    deadline = time.monotonic() + 60
    while True:
        try:
            response = await http.post(f"{stack.ingress_url}/api/payments", headers={
                "Authorization": f"Bearer {api_key}", "Idempotency-Key": key}, json={
                "channelId": channel_id, "amount": amount, "phone": phone, "accountReference": reference})
            if response.status_code == 202:
                return response.json()["paymentId"], reference
            assert response.status_code == 503, response.text
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the ingress did not accept the payment within 60 s"
        await asyncio.sleep(0.5)


async def _all_final(pool, channel_id: str, expected: int) -> dict[str, str] | None:
    rows = await _rows(pool, "SELECT payment_id, state FROM payments WHERE channel_id = %s", channel_id)
    states = {r["payment_id"]: r["state"] for r in rows}
    return states if len(states) == expected and all(s in FINAL for s in states.values()) else None


async def _claims(pool, channel_id: str) -> dict[str, dict]:
    rows = await _rows(pool, "SELECT payment_id, status, checkout_request_id FROM stk_push_claims"
                             " WHERE channel_id = %s", channel_id)
    return {r["payment_id"]: r for r in rows}


async def _rows(pool, query: str, *args: object) -> list[dict]:
    """The tests' pool still holds connections the restart cut: each fails once and is replaced."""
    for _ in range(10):
        try:
            async with pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(query, args)
                return await cur.fetchall()
        except psycopg.OperationalError:
            await asyncio.sleep(0.5)
    raise AssertionError("the database did not come back")


def _push_results(bootstrap: str, channel_id: str, since: dict[int, int]) -> list[bytes]:
    messages = read_all(bootstrap, STK_PUSH_RESULT.name, lambda m: m.key() == channel_id.encode(),
                        expected=10**9, since=since, timeout_polls=8)  # all there is: it reads until idle
    return [m.value() for m in messages]


async def _sandbox_pushes(stack: Stack) -> list[dict]:
    async with httpx.AsyncClient(headers=stack.sandbox_admin_headers, timeout=30) as http:
        answer = await http.get(f"{stack.sandbox_url}/sandbox/pushes")
    pushes = answer.json()["pushes"]
    for p in pushes:  # rendered as ISO text by the admin API; compared with time.time() here
        p["receivedAt"] = datetime.fromisoformat(p["receivedAt"]).timestamp()
    return pushes
