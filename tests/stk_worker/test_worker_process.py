"""`python -m services.stk_worker` as a process, on the real broker, database and Daraja sandbox:
SIGTERM stops it while a push waits out Daraja's "unable to lock subscriber" minute."""
from __future__ import annotations

import subprocess
import sys
import uuid

import httpx

from services.common.kafka import new_event_fields
from services.common.topics import PAYMENT_REQUESTED, STK_QUERY_REQUESTED
from services.daraja_sandbox.settings import ADMIN_TOKEN_ENV
from tests.conftest import ROOT, ServiceProcess, eventually
from tests.e2e.stack import Stack, wait_for
from tests.platform.kafka_helpers import start_group_at_end


async def test_sigterm_releases_a_push_waiting_for_a_locked_subscriber(infra, tmp_path, pool, onboarding_pool,
                                                                       producer):
    """Two payments to one phone: the first prompt locks the subscriber (its callback is two minutes
    away), so Daraja refuses the second push and asks for a minute's wait. SIGTERM during that wait
    stops the worker at once; the waiting push is released for the next owner, the first one stays
    recorded."""
    unique = uuid.uuid4().hex[:10]
    stack = Stack(infra, tmp_path, unique)
    bootstrap = infra["KAFKA_BOOTSTRAP_SERVERS"]
    start_group_at_end(bootstrap, f"stk-worker-{unique}", [PAYMENT_REQUESTED.name])
    start_group_at_end(bootstrap, f"stk-worker-{unique}-queries", [STK_QUERY_REQUESTED.name])
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "services.daraja_sandbox", "--port", str(stack.ports["sandbox"]),
         "--callback-delay-ms", "120000"], cwd=ROOT,
        env={**stack.env, ADMIN_TOKEN_ENV: stack.sandbox_admin_token},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"{stack.sandbox_url}/sandbox/health")
        channel_id = f"sigterm-{unique}"
        await stack.onboard(onboarding_pool, channel_id)
        stack.start_one("worker", "services.stk_worker")
        wait_for(f"http://127.0.0.1:{stack.ports['worker']}/healthz")
        phone = f"254711{uuid.uuid4().int % 10**6:06d}"
        payments = [str(uuid.uuid4()) for _ in range(2)]
        for i, payment_id in enumerate(payments):
            await producer.publish(PAYMENT_REQUESTED, {
                **new_event_fields(channel_id, payment_id), "amount": 10, "phone": phone,
                "account_reference": f"SIG{i}", "description": None, "order_reference": None,
                "idempotency_key": None, "metadata": {}, "source": "TOPIC"})

        async def both_pushes_reached_daraja() -> list:
            async with httpx.AsyncClient(headers=stack.sandbox_admin_headers) as http:
                answer = await http.get(f"{stack.sandbox_url}/sandbox/pushes", params={"PhoneNumber": phone})
            pushes = answer.json()["pushes"]
            return pushes if len(pushes) == 2 else []
        pushes = await eventually(both_pushes_reached_daraja, timeout=60)

        stack.procs["worker"].terminate()
        # The locked push waits a minute before its next try: the worker must not.
        assert stack.procs["worker"].wait(timeout=30) == 0
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT status FROM stk_push_claims WHERE payment_id = ANY(%s)", (payments,))
            statuses = sorted(row[0] for row in await cur.fetchall())
        assert statuses == ["accepted", "released"], (statuses, pushes)
    finally:
        for proc in (stack.procs.get("worker"), sandbox):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        worker = stack.procs.get("worker")
        if isinstance(worker, ServiceProcess):
            (tmp_path / "worker.log").write_text(worker.output())
        sandbox.wait(10)
