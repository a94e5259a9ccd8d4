"""Pointing the client at the embedded sandbox, Safaricom's sandbox or production (DARAJA_BASE_URL)."""
from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.daraja.client import DarajaClient
from services.daraja.settings import DarajaSettings
from services.daraja.transport import AiohttpSender


def test_defaults_point_at_the_embedded_sandbox():
    settings = DarajaSettings.from_env({})
    assert (settings.base_url, settings.read_timeout_s, settings.token_refresh_margin_s, settings.max_connections) == \
        ("http://127.0.0.1:8089", 30.0, 300.0, 100)


@pytest.mark.parametrize("url, expected", [
    ("https://sandbox.safaricom.co.ke", "https://sandbox.safaricom.co.ke"),
    ("https://api.safaricom.co.ke/", "https://api.safaricom.co.ke"),
    ("http://localhost:8089", "http://localhost:8089"), ("http://[::1]:8089", "http://[::1]:8089"),
])
def test_accepted_base_urls(url, expected):
    assert DarajaSettings.from_env({"DARAJA_BASE_URL": url}).base_url == expected


@pytest.mark.parametrize("url", ["http://sandbox.safaricom.co.ke", "sandbox.safaricom.co.ke",
                                 "https://sandbox.safaricom.co.ke?x=1", "ftp://x"])
def test_refused_base_urls(url):
    with pytest.raises(ConfigError, match="DARAJA_BASE_URL"):
        DarajaSettings.from_env({"DARAJA_BASE_URL": url})


def test_bad_numbers_are_named():
    with pytest.raises(ConfigError, match="DARAJA_READ_TIMEOUT_S"):
        DarajaSettings.from_env({"DARAJA_READ_TIMEOUT_S": "-1"})


async def test_client_from_settings_uses_the_base_url():
    client = DarajaClient.from_settings(DarajaSettings.from_env({"DARAJA_BASE_URL": "https://sandbox.safaricom.co.ke",
                                                                 "DARAJA_READ_TIMEOUT_S": "12"}))
    try:
        assert client._urls["/mpesa/stkpush/v1/processrequest"] == \
            "https://sandbox.safaricom.co.ke/mpesa/stkpush/v1/processrequest"
        assert isinstance(client._sender, AiohttpSender) and client._sender.timeout.sock_read == 12
    finally:
        await client.aclose()
