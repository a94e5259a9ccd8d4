"""The audit anchoring, run as a process: alive on /healthz and ready on /readyz once its database
answers (its one dependency), with pipeline_ready saying the same on /metrics. It signs with the
session's anchor key: an anchor by any other key in the shared database would fail every later
verification of the whole trail (tests/platform/test_db_roles.py)."""
from __future__ import annotations

import httpx

from tests.conftest import ANCHOR_KEY_FILE, eventually, free_port, service_env, start_service


async def _ready(http: httpx.AsyncClient):
    try:
        answer = await http.get("/readyz")
    except httpx.TransportError:
        return None
    return answer if answer.status_code == 200 else None


async def test_the_anchoring_process_is_alive_and_ready_once_its_database_answers(infra):
    port = free_port()
    service = start_service("services.ledger.anchors", service_env(
        infra, AUDIT_ANCHOR_KEY_FILE=ANCHOR_KEY_FILE, AUDIT_ANCHOR_METRICS_PORT=port, AUDIT_ANCHOR_INTERVAL_S=3600))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            ready = await eventually(lambda: _ready(http), timeout=60)
            assert ready.json() == {"status": "ok", "failing": []}
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            assert 'pipeline_ready{check="database"} 1.0' in (await http.get("/metrics")).text
    finally:
        service.terminate()
        output = service.communicate(timeout=30)[0]
    assert service.returncode == 0, output
