"""`python -m services.privacy` as `make run` starts it: it logs in as the privacy role, pseudonymises
what is due on its own schedule, says so on /metrics and in one log line without the phone, and is
ready only with its database."""
from __future__ import annotations

import urllib.request

from tests.conftest import PSEUDONYM_KEY_FILE, eventually, free_port, service_env, start_service
from tests.privacy.test_retention import PAYER, final_days_ago, new_channel, payer_data, settled


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except OSError as error:
        return getattr(error, "code", 0), ""


async def test_the_privacy_service_pseudonymises_what_is_due_and_reports_it(infra, ledger, pool, unique):
    channel = f"ch-{unique}"
    await new_channel(pool, channel, retention_days=1)
    due = await settled(ledger, channel, f"P{unique[:9]}".upper())
    await final_days_ago(pool, due, 2)
    port = free_port()
    proc = start_service("services.privacy", service_env(
        infra, PRIVACY_METRICS_PORT=port, PRIVACY_RETENTION_INTERVAL_S=0.5, PSEUDONYM_KEY_FILE=PSEUDONYM_KEY_FILE))
    try:
        async def pseudonymised() -> bool:
            return (await payer_data(pool, due))["payer_data"] == "pseudonymised"
        await eventually(pseudonymised, timeout=60)

        async def reported() -> str | None:
            status, body = _get(f"http://127.0.0.1:{port}/metrics")
            return body if status == 200 and 'privacy_retention_runs_total{result="done"}' in body else None
        metrics = await eventually(reported, timeout=30)
        assert "privacy_payments_pseudonymised_total" in metrics and "privacy_retention_oldest_due_seconds" in metrics
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    finally:
        proc.terminate()
        proc.wait(30)
    output = proc.output()
    assert proc.returncode == 0, output[-2000:]
    assert "payer-data retention:" in output and "payments pseudonymised" in output
    assert PAYER not in output and PAYER[3:] not in output
