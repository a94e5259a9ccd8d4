"""`python -m services.ingress` as deployed: configuration, migrations, serving, graceful stop."""
from __future__ import annotations

import subprocess
import sys

import httpx

from tests.conftest import ROOT, eventually, free_port, service_env, start_service
from tests.ingress.conftest import new_key, payment_body


async def test_the_service_accepts_and_shows_a_payment_then_stops_cleanly(infra, shop):
    channel_id, api_key = shop
    port = free_port()
    proc = start_service("services.ingress", service_env(infra, INGRESS_PORT=port))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                     headers={"Authorization": f"Bearer {api_key}"}) as http:
            await eventually(lambda: _healthy(http), timeout=30)
            created = await http.post("/api/payments", json=payment_body(channel_id),
                                      headers={"Idempotency-Key": new_key()})
            assert created.status_code == 202, created.text
            shown = await http.get(created.headers["Location"])
            assert shown.status_code == 200 and shown.json()["paymentId"] == created.json()["paymentId"]
            metrics = (await http.get("/metrics")).text
            assert 'ingress_payments_accepted_total{replayed="false"} 1.0' in metrics
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert api_key not in output  # the caller's secret is never logged


def test_a_bad_setting_stops_the_service_at_start_naming_it(infra):
    env = service_env(infra, INGRESS_MAX_BODY_BYTES="lots")
    result = subprocess.run([sys.executable, "-m", "services.ingress"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert "INGRESS_MAX_BODY_BYTES" in result.stderr


async def _healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False
