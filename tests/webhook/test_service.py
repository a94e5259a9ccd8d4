"""The gateway as it is deployed: `python -m services.webhook_consumer`, configured by environment."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from services.common import config
from services.common.topics import CALLBACK_RAW
from services.webhook_consumer.settings import SETTINGS, GatewaySettings, WebhookSettings
from services.webhook_consumer.sources import ANY_SOURCE, parse_networks
from tests.conftest import ROOT, eventually, free_port, service_env, start_service
from tests.e2e.stack import wait_for
from tests.webhook.conftest import ACCEPTED_BODY, DARAJA_CONTENT_TYPE, PREVIOUS_SECRET, SECRET, callback_path, count

SECRETS_ENV = f"{SECRET.decode()},{PREVIOUS_SECRET.decode()}"


async def test_the_service_accepts_a_callback_refuses_a_forgery_and_stops_cleanly(infra, tail, unique):
    port = free_port()
    env = service_env(infra, WEBHOOK_PORT=port, WEBHOOK_TOKEN_SECRETS=SECRETS_ENV, MPESA_ENVIRONMENT="production",
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


def test_in_production_the_service_refuses_to_start_without_an_allow_list(infra):
    env = service_env(infra, WEBHOOK_PORT=free_port(), WEBHOOK_TOKEN_SECRETS=SECRETS_ENV)
    env.pop("MPESA_ENVIRONMENT", None)  # production is the default
    result = subprocess.run([sys.executable, "-m", "services.webhook_consumer"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("webhook-gateway: configuration error: WEBHOOK_ALLOWED_SOURCES is required")
    assert "MPESA_ENVIRONMENT=production" in line and SECRET.decode() not in result.stderr


@pytest.mark.parametrize("extra, why", [
    ({"MPESA_ENVIRONMENT": "production", "WEBHOOK_ALLOWED_SOURCES": "any"}, "WEBHOOK_ALLOWED_SOURCES=any"),
    ({"MPESA_ENVIRONMENT": "sandbox"}, "WEBHOOK_ALLOWED_SOURCES is unset and MPESA_ENVIRONMENT=sandbox"),
])
async def test_a_gateway_open_to_any_source_says_so_when_it_starts(infra, unique, extra, why):
    port = free_port()
    gateway = start_service("services.webhook_consumer",
                            service_env(infra, WEBHOOK_PORT=port, WEBHOOK_TOKEN_SECRETS=SECRETS_ENV, **extra))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            await eventually(lambda: _healthy(http))
            accepted = await http.post(callback_path(f"shop-{unique}", "p1"), content=b"{}")
        assert accepted.status_code == 200
    finally:
        gateway.terminate()
        output = gateway.communicate(timeout=30)[0]
    assert gateway.returncode == 0, output
    assert f"callbacks are accepted from any address ({why})" in output


class TestSettings:
    def test_defaults(self):
        cfg = _load({"WEBHOOK_ALLOWED_SOURCES": "196.201.212.69"})
        settings = GatewaySettings.from_config(cfg)
        assert cfg.mpesa_environment == "production"
        assert (cfg.webhook_host, cfg.webhook_port) == ("127.0.0.1", 8081)
        assert SECRET not in repr(cfg).encode()
        assert settings.token_secrets == (SECRET, PREVIOUS_SECRET)
        assert settings.allowed_sources == parse_networks("196.201.212.69") and settings.trusted_proxies == ()
        assert settings.kafka_timeout_ms == 5000
        assert SECRET not in repr(settings).encode()

    @pytest.mark.parametrize("environ", [{}, {"MPESA_ENVIRONMENT": "production"}, {"MPESA_ENVIRONMENT": "Production"},
                                         {"WEBHOOK_ALLOWED_SOURCES": " , "}])
    def test_in_production_an_empty_allow_list_is_refused(self, environ):
        cfg = _load(environ)
        with pytest.raises(config.ConfigError, match=r"^WEBHOOK_ALLOWED_SOURCES is required when "
                                                     r"MPESA_ENVIRONMENT=production .*'any'"):
            GatewaySettings.from_config(cfg)

    @pytest.mark.parametrize("environ", [{"MPESA_ENVIRONMENT": "sandbox"},
                                         {"MPESA_ENVIRONMENT": "production", "WEBHOOK_ALLOWED_SOURCES": "any"},
                                         {"WEBHOOK_ALLOWED_SOURCES": " ANY "}])
    def test_any_source_is_allowed_in_sandbox_or_when_asked_for(self, environ):
        cfg = _load(environ)
        assert GatewaySettings.from_config(cfg).allowed_sources == ANY_SOURCE

    def test_a_listed_allow_list_is_kept_in_either_environment(self):
        for environment in ("sandbox", "production"):
            cfg = _load({"MPESA_ENVIRONMENT": environment, "WEBHOOK_ALLOWED_SOURCES": "127.0.0.1"})
            assert GatewaySettings.from_config(cfg).allowed_sources == parse_networks("127.0.0.1")

    @pytest.mark.parametrize("environ, message", [
        ({"MPESA_ENVIRONMENT": "staging"}, "MPESA_ENVIRONMENT='staging' is invalid: must be one of sandbox"),
        ({"WEBHOOK_ALLOWED_SOURCES": "*"}, r"WEBHOOK_ALLOWED_SOURCES='\*' is invalid: .*write 'any' alone"),
        ({"WEBHOOK_ALLOWED_SOURCES": "any,196.201.212.69"}, "WEBHOOK_ALLOWED_SOURCES='any,196.201.212.69' is invalid"),
        ({"WEBHOOK_TRUSTED_PROXIES": "10.0.0.1,0.0.0.0/0"},
         r"WEBHOOK_TRUSTED_PROXIES=.* 0\.0\.0\.0/0 is too wide to be trusted as a proxy \(IPv4 blocks must be /8"),
        ({"WEBHOOK_TRUSTED_PROXIES": "::/0"}, r"::/0 is too wide .*IPv6 blocks must be /28 or narrower"),
    ])
    def test_bad_environment_allow_list_or_proxies_name_the_variable(self, environ, message):
        with pytest.raises(config.ConfigError, match=message):
            _load(environ)

    def test_a_short_secret_is_refused_without_showing_it(self):
        with pytest.raises(config.ConfigError) as error:
            config.load(SETTINGS, {"WEBHOOK_TOKEN_SECRETS": f"{SECRET.decode()},tooshort"})
        assert "WEBHOOK_TOKEN_SECRETS" in str(error.value) and "tooshort" not in str(error.value)

    def test_a_bad_allow_list_names_the_variable_and_the_entry(self):
        with pytest.raises(config.ConfigError, match=r"WEBHOOK_ALLOWED_SOURCES=.*'196\.201\.212\.69/24'"):
            _load({"WEBHOOK_ALLOWED_SOURCES": "196.201.212.69/24"})

    def test_the_secrets_are_masked_when_the_configuration_is_described(self):
        cfg = config.load(SETTINGS, {"WEBHOOK_TOKEN_SECRETS": SECRETS_ENV})
        assert SECRET.decode() not in config.describe(SETTINGS, cfg)


def _load(environ: dict[str, str]) -> WebhookSettings:
    return config.load_into(WebhookSettings, SETTINGS, {"WEBHOOK_TOKEN_SECRETS": SECRETS_ENV, **environ})


async def _healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def _callbacks_accepted(port: int) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    return next(float(line.split()[1]) for line in metrics.splitlines()
                if line.startswith("webhook_callbacks_accepted_total "))


async def test_two_gateways_share_the_callback_port_and_each_answers_on_a_port_of_its_own(infra, unique):
    """As `make run GATEWAYS=2` starts them (docs/scaling.md §1): callbacks on new connections to the one
    port reach both, and each process's own port shows its own count."""
    port, own = free_port(), [free_port(), free_port()]
    gateways = [start_service("services.webhook_consumer", service_env(
        infra, WEBHOOK_PORT=port, WEBHOOK_REUSE_PORT="true", WEBHOOK_METRICS_PORT=mine,
        WEBHOOK_TOKEN_SECRETS=SECRETS_ENV, MPESA_ENVIRONMENT="sandbox")) for mine in own]
    try:
        for mine in own:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{mine}", timeout=10) as http:
                await eventually(lambda h=http: _healthy(h), timeout=60)
        for i in range(40):  # each on a connection of its own: the kernel picks a process per connection
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                answer = await http.post(callback_path(f"shop-{unique}", f"p{i}"), content=b'{"Body": {}}',
                                         headers={"Content-Type": DARAJA_CONTENT_TYPE})
            assert answer.status_code == 200
        counts = [await _callbacks_accepted(mine) for mine in own]
    finally:
        for gateway in gateways:
            gateway.terminate()
            gateway.communicate(timeout=30)
    assert sum(counts) == 40 and all(counts), counts


def test_a_gateway_not_asked_to_share_cannot_take_a_port_another_gateway_holds(infra):
    """SO_REUSEPORT is off by default: a forgotten second gateway fails to start, rather than take a
    share of the callbacks unnoticed."""
    port = free_port()
    env = service_env(infra, WEBHOOK_PORT=port, WEBHOOK_TOKEN_SECRETS=SECRETS_ENV, MPESA_ENVIRONMENT="sandbox")
    first = start_service("services.webhook_consumer", env)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        second = subprocess.run([sys.executable, "-m", "services.webhook_consumer"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    finally:
        first.terminate()
        first.communicate(timeout=30)
    assert second.returncode != 0
    assert "address already in use" in (second.stdout + second.stderr).lower()
