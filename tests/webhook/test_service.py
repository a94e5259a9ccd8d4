"""The gateway as it is deployed: `python -m services.webhook_consumer`, configured by environment."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from services.common import config
from services.common.topics import CALLBACK_RAW
from services.webhook_consumer.settings import SETTINGS, GatewaySettings
from tests.conftest import ROOT, eventually, free_port, service_env, start_service
from tests.webhook.conftest import ACCEPTED_BODY, DARAJA_CONTENT_TYPE, PREVIOUS_SECRET, SECRET, callback_path, count

SECRETS_ENV = f"{SECRET.decode()},{PREVIOUS_SECRET.decode()}"


async def test_the_service_accepts_a_callback_refuses_a_forgery_and_stops_cleanly(infra, tail, unique):
    port = free_port()
    env = service_env(infra, WEBHOOK_PORT=port, WEBHOOK_TOKEN_SECRETS=SECRETS_ENV,
                      WEBHOOK_ALLOWED_SOURCES="127.0.0.1,196.201.212.69", WEBHOOK_KAFKA_TIMEOUT_MS=3000)
    raw = tail(CALLBACK_RAW)
    channel = f"shop-{unique}"
    gateway = start_service("services.webhook_consumer", env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            await eventually(lambda: _healthy(http))
            headers = {"Content-Type": DARAJA_CONTENT_TYPE}

            accepted = await http.post(callback_path(channel, "p1"), content=b'{"Body": {}}', headers=headers)
            forged = await http.post(f"/api/webhooks/mpesa/{channel}/p2/{'A' * 32}", content=b"{}", headers=headers)
            metrics = (await http.get("/metrics")).text

        assert accepted.status_code == 200 and accepted.content == ACCEPTED_BODY
        assert forged.status_code == 403
        assert "webhook_callbacks_accepted_total 1.0" in metrics
        assert 'webhook_callbacks_rejected_total{reason="bad_token"} 1.0' in metrics
        [seen] = await raw.collect(channel, until=count(1))
        assert seen.record["payment_id"] == "p1" and seen.record["body"] == b'{"Body": {}}'
    finally:
        gateway.terminate()
        output = gateway.communicate(timeout=30)[0]
    assert gateway.returncode == 0, output
    assert SECRET.decode() not in output and PREVIOUS_SECRET.decode() not in output


def test_the_service_refuses_to_start_without_token_secrets(infra):
    env = service_env(infra, WEBHOOK_PORT=free_port())
    result = subprocess.run([sys.executable, "-m", "services.webhook_consumer"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "WEBHOOK_TOKEN_SECRETS is required" in result.stderr


class TestSettings:
    def test_defaults(self):
        cfg = config.load(SETTINGS, {"WEBHOOK_TOKEN_SECRETS": SECRETS_ENV})
        settings = GatewaySettings.from_config(cfg)
        assert (cfg["WEBHOOK_HOST"], cfg["WEBHOOK_PORT"]) == ("127.0.0.1", 8081)
        assert settings.token_secrets == (SECRET, PREVIOUS_SECRET)
        assert settings.allowed_sources == () and settings.trusted_proxies == ()
        assert settings.kafka_timeout_ms == 5000
        assert SECRET not in repr(settings).encode()

    def test_a_short_secret_is_refused_without_showing_it(self):
        with pytest.raises(config.ConfigError) as error:
            config.load(SETTINGS, {"WEBHOOK_TOKEN_SECRETS": f"{SECRET.decode()},tooshort"})
        assert "WEBHOOK_TOKEN_SECRETS" in str(error.value) and "tooshort" not in str(error.value)

    def test_a_bad_allow_list_names_the_variable_and_the_entry(self):
        with pytest.raises(config.ConfigError, match=r"WEBHOOK_ALLOWED_SOURCES=.*'196\.201\.212\.69/24'"):
            config.load(SETTINGS, {"WEBHOOK_TOKEN_SECRETS": SECRETS_ENV,
                                   "WEBHOOK_ALLOWED_SOURCES": "196.201.212.69/24"})

    def test_the_secrets_are_masked_when_the_configuration_is_described(self):
        cfg = config.load(SETTINGS, {"WEBHOOK_TOKEN_SECRETS": SECRETS_ENV})
        assert SECRET.decode() not in config.describe(SETTINGS, cfg)


async def _healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False
