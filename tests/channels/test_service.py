"""`python -m services.channels` as its own process: it refuses to start without an admin
credential, and once up it guards /admin/ and serves /healthz and /metrics openly."""
from __future__ import annotations

import hashlib
import secrets
import subprocess
import sys

import httpx

from tests.conftest import ROOT, eventually, free_port, service_env, start_service


def test_it_will_not_start_without_an_admin_credential(infra):
    env = {k: v for k, v in service_env(infra).items() if not k.startswith("ADMIN_TOKEN")}
    result = subprocess.run([sys.executable, "-m", "services.channels"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "channels: configuration error: ADMIN_TOKEN_SHA256 or ADMIN_TOKEN is required "
        "(`mpesa-pipeline admin-token` makes one)"]


def test_a_short_admin_token_is_refused_without_printing_it(infra):
    env = {**service_env(infra), "ADMIN_TOKEN": "hunter2hunter2"}
    env.pop("ADMIN_TOKEN_SHA256", None)
    result = subprocess.run([sys.executable, "-m", "services.channels"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "too short" in result.stderr and "hunter2" not in result.stderr


async def test_the_running_service_guards_admin_routes(infra, tmp_path):
    token, port = secrets.token_urlsafe(32), free_port()
    env = service_env(infra, ADMIN_PORT=port, ADMIN_TOKEN_SHA256=hashlib.sha256(token.encode()).hexdigest(),
                      VAULT_PUBLIC_KEY_FILE=tmp_path / "absent.pub.json")
    env.pop("ADMIN_TOKEN", None)
    service = start_service("services.channels", env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            await eventually(lambda: _healthy(http))
            assert (await http.get("/admin/channels")).status_code == 401
            assert (await http.get("/admin/channels", headers={"Authorization": "Bearer nope"})).status_code == 403
            listed = await http.get("/admin/channels", headers={"Authorization": f"Bearer {token}"})
            assert listed.status_code == 200 and "channels" in listed.json()
            metrics = (await http.get("/metrics")).text
            assert "admin_auth_refusals_total" in metrics
            # Ready: its one dependency, the database, answers (and pipeline_ready says so too).
            assert (await http.get("/readyz")).json() == {"status": "ok", "failing": []}
            assert 'pipeline_ready{check="database"} 1.0' in metrics
    finally:
        service.terminate()
        output = service.communicate(timeout=30)[0]
        assert service.returncode == 0, output
    assert token not in output and "no vault public key" in output


async def _healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False
