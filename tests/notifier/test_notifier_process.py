"""`python -m services.notifier` as a process, as its own database role and Kafka principal: killed
with SIGKILL while deliveries are in flight and started again, it loses no event, and what it sends
twice carries the same webhook-id."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid

import httpx

from services.common.topics import PAYMENT_STATUS
from tests.conftest import ROOT, ServiceProcess, eventually, free_port, kafka_login, service_env, start_service
from tests.notifier.conftest import Behaviour, channel_with_endpoint, delivery_rows, publish_payments
from tests.notifier.fakes import met
from tests.platform.kafka_helpers import start_group_at_end


def notifier_env(infra, key_file, group: str, metrics_port: int) -> dict[str, str]:
    return service_env(infra, **kafka_login(infra, "notifier"), NOTIFIER_GROUP_ID=group,
                       NOTIFIER_METRICS_PORT=metrics_port, NOTIFIER_VAULT_KEY_FILE=key_file,
                       WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8", NOTIFIER_LEASE_S=2, NOTIFIER_POLL_INTERVAL_S=0.2,
                       NOTIFIER_FIRST_BACKOFF_S=0.2, NOTIFIER_MAX_BACKOFF_S=0.5, NOTIFIER_READ_TIMEOUT_S=30)


async def healthy(port: int) -> bool:
    try:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


async def test_a_notifier_killed_mid_delivery_loses_no_event_and_repeats_with_the_same_webhook_id(
        infra, pool, receiver, key_file, producer, tmp_path):
    """The receiver holds every request until the notifier is killed, so deliveries are in flight at
    the kill; a second process takes them over once their leases expire."""
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "killed")
    gate = asyncio.Event()
    receiver.behaviours[channel] = Behaviour(gate=gate)
    group = f"notifier-{uuid.uuid4().hex[:10]}"
    start_group_at_end(infra["KAFKA_BOOTSTRAP_SERVERS"], group, [PAYMENT_STATUS.name])
    procs: list[ServiceProcess] = []
    try:
        first_port = free_port()
        procs.append(start_service("services.notifier", notifier_env(infra, key_file, group, first_port)))
        await eventually(lambda: healthy(first_port), timeout=60)
        published = await publish_payments(producer, channel, 12)
        await eventually(lambda: met(len(receiver.at(channel)) >= 8), timeout=60)  # its 8 slots in flight
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(30)
        in_flight_at_kill = {a.webhook_id for a in receiver.at(channel)}
        receiver.behaviours[channel] = Behaviour()
        gate.set()

        second_port = free_port()
        procs.append(start_service("services.notifier", notifier_env(infra, key_file, group, second_port)))
        expected = {e for ids in published.values() for e in ids}
        await eventually(lambda: met({a.webhook_id for a in receiver.at(channel)} >= expected), timeout=120)
        await eventually(lambda: healthy(second_port), timeout=30)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{second_port}/metrics")).text
        assert 'webhook_deliveries_total{endpoint="' in metrics and 'outcome="delivered"' in metrics
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        for i, proc in enumerate(procs):
            (tmp_path / f"notifier-{i}.log").write_text(proc.output())
    arrivals = receiver.at(channel)
    assert {a.webhook_id for a in arrivals} == expected and all(a.verified for a in arrivals)
    # The ones in flight at the kill came again, with the same id and body.
    again = [a.webhook_id for a in arrivals[len(in_flight_at_kill):] if a.webhook_id in in_flight_at_kill]
    assert set(again) == in_flight_at_kill
    bodies: dict[str, dict] = {}
    for a in arrivals:
        assert bodies.setdefault(a.webhook_id, a.body) == a.body
    # In order: each payment's Settled first arrived after its Pending did.
    first_seen: dict[str, int] = {}
    for i, a in enumerate(arrivals):
        first_seen.setdefault(a.webhook_id, i)
    assert all(first_seen[pending] < first_seen[settled] for pending, settled in published.values())
    rows = await delivery_rows(pool, sorted(expected))
    assert {r["state"] for r in rows} == {"delivered"} and len(rows) == len(expected)
    assert procs[1].returncode == 0, procs[1].output()[-2000:]


def test_a_notifier_without_its_key_file_refuses_to_start_and_says_which(infra, tmp_path):
    missing = tmp_path / "nowhere" / "webhooks-kek.json"
    proc = start_service("services.notifier", notifier_env(infra, missing, f"notifier-{uuid.uuid4().hex[:10]}",
                                                           free_port()))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, output[-2000:]
    assert "notifier: cannot start: the webhook signing secrets' key" in output and str(missing) in output
    assert not missing.exists()  # not made behind the operator's back


async def test_the_notifier_rides_out_a_postgresql_restart_and_delivers_everything(
        infra, pool, receiver, key_file, producer, tmp_path):
    """PostgreSQL stops while deliveries are in flight and status events keep coming: the notifier
    neither crashes nor loses any of them; /healthz is ok again once it is back."""
    channel, _ = await channel_with_endpoint(pool, key_file, receiver, "pgrestart")
    gate = asyncio.Event()
    receiver.behaviours[channel] = Behaviour(gate=gate)
    group = f"notifier-{uuid.uuid4().hex[:10]}"
    start_group_at_end(infra["KAFKA_BOOTSTRAP_SERVERS"], group, [PAYMENT_STATUS.name])
    port = free_port()
    proc = start_service("services.notifier", notifier_env(infra, key_file, group, port))
    try:
        await eventually(lambda: healthy(port), timeout=60)
        before = await publish_payments(producer, channel, 4, ("Pending",))
        await eventually(lambda: met(len(receiver.at(channel)) == 4), timeout=60)  # in flight, answers held
        subprocess.run(["bash", "infra/postgres.sh", "stop"], cwd=ROOT, check=True, capture_output=True)
        try:
            gate.set()  # their results cannot be written now
            during = await publish_payments(producer, channel, 4, ("Pending",))  # cannot be enqueued now
            await asyncio.sleep(2)
        finally:
            subprocess.run(["bash", "infra/postgres.sh", "start"], cwd=ROOT, check=True, capture_output=True)
        await pool.check()  # the tests' own pool lost its connections too
        expected = {ids[0] for ids in (*before.values(), *during.values())}
        await eventually(lambda: met({a.webhook_id for a in receiver.at(channel)} == expected), timeout=120)

        async def all_delivered() -> bool:
            rows = await delivery_rows(pool, sorted(expected))
            return len(rows) == 8 and {r["state"] for r in rows} == {"delivered"}
        await eventually(all_delivered, timeout=60)
        await eventually(lambda: healthy(port), timeout=60)
        assert proc.poll() is None  # it rode out the outage
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        (tmp_path / "notifier.log").write_text(proc.output())
    assert proc.returncode == 0, proc.output()[-2000:]
