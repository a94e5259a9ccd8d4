"""Where the Daraja client points and how patient it is, read once from the environment.

DARAJA_BASE_URL defaults to the embedded simulator (`python -m services.daraja_sandbox`);
set it to https://sandbox.safaricom.co.ke for Safaricom's sandbox or https://api.safaricom.co.ke
for production.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.common import config

SAFARICOM_SANDBOX_URL = "https://sandbox.safaricom.co.ke"
SAFARICOM_PRODUCTION_URL = "https://api.safaricom.co.ke"
EMBEDDED_SANDBOX_URL = "http://127.0.0.1:8089"


def daraja_base_url(raw: str) -> str:
    """An http(s) URL; plain http only to a loopback host, since it carries credentials."""
    url = config.http_url(raw)
    parts = urlsplit(url)
    if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
        raise ValueError("must use https unless it points at a loopback address (it carries credentials)")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query string or fragment")
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


SETTINGS = [
    config.Setting("DARAJA_BASE_URL", daraja_base_url, EMBEDDED_SANDBOX_URL,
                   help=f"Daraja API root, e.g. {SAFARICOM_SANDBOX_URL}"),
    config.Setting("DARAJA_CONNECT_TIMEOUT_S", config.positive_float, 5.0, help="TCP/TLS connect timeout"),
    config.Setting("DARAJA_READ_TIMEOUT_S", config.positive_float, 30.0,
                   help="wait for an answer; a push timing out here has an unknown outcome"),
    config.Setting("DARAJA_TOKEN_REFRESH_MARGIN_S", config.positive_float, 300.0,
                   help="refresh OAuth tokens this long before they expire"),
    config.Setting("DARAJA_MAX_CONNECTIONS", config.positive_int, 100, help="HTTP connection pool size"),
]


@dataclass(frozen=True)
class DarajaSettings:
    base_url: str
    connect_timeout_s: float
    read_timeout_s: float
    token_refresh_margin_s: float
    max_connections: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DarajaSettings:
        values = config.load(SETTINGS, environ)
        return cls(
            base_url=values["DARAJA_BASE_URL"],
            connect_timeout_s=values["DARAJA_CONNECT_TIMEOUT_S"],
            read_timeout_s=values["DARAJA_READ_TIMEOUT_S"],
            token_refresh_margin_s=values["DARAJA_TOKEN_REFRESH_MARGIN_S"],
            max_connections=values["DARAJA_MAX_CONNECTIONS"],
        )
