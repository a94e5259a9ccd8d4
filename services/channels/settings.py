"""Settings of the onboarding API, the channel commands and the vault, declared once."""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path

from services.common import config
from services.daraja.settings import SETTINGS as DARAJA_SETTINGS
from services.notifier.destinations import IPNetwork
from services.notifier.settings import WEBHOOK_ALLOWED_NETWORKS, WEBHOOK_VAULT_PUBLIC_KEY_FILE
from services.operations.settings import DESK_SETTINGS

ADMIN_TOKEN_MIN_CHARS = 32


def sha256_hex(raw: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", raw.strip()):
        raise ValueError("must be 64 hexadecimal digits (the SHA-256 of the admin token)")
    return raw.strip().lower()


ADMIN_HOST = config.Setting("ADMIN_HOST", str, "127.0.0.1", help="address of the onboarding API")
ADMIN_PORT = config.Setting("ADMIN_PORT", config.port, 8082, help="port of the onboarding API")
ADMIN_TOKEN = config.Setting("ADMIN_TOKEN", str, None, secret=True,
                             help="the admin bearer token itself (or give ADMIN_TOKEN_SHA256)")
ADMIN_TOKEN_SHA256 = config.Setting("ADMIN_TOKEN_SHA256", sha256_hex, None,
                                    help="SHA-256 (hex) of the admin bearer token; preferred over ADMIN_TOKEN")
VAULT_KEY_FILE = config.Setting("VAULT_KEY_FILE", Path, Path(".local/vault/kek.json"),
                                help="the key-encryption key file (private; only the STK worker's host)")
VAULT_PUBLIC_KEY_FILE = config.Setting("VAULT_PUBLIC_KEY_FILE", Path, Path(".local/vault/kek.pub.json"),
                                       help="public half of the key-encryption key, to seal new credentials")
CREDENTIALS_TTL_S = config.Setting("CHANNEL_CREDENTIALS_TTL_S", config.positive_float, 30.0,
                                   help="how long the STK worker trusts its cached channel and version")


# What onboarding needs, as the onboarding API and the `channels`/`keys`/`webhooks` commands share
# it: the onboarding role's database, the vault's public half to seal credentials, Daraja to check
# them; for webhook endpoints, the notifier's public key to seal signing secrets and the networks a
# webhook may reach besides public addresses (the same rule as the notifier's, checked at creation).
ONBOARDING_SETTINGS = [config.database_url("onboarding"), VAULT_PUBLIC_KEY_FILE, *DARAJA_SETTINGS,
                       WEBHOOK_VAULT_PUBLIC_KEY_FILE, WEBHOOK_ALLOWED_NETWORKS]
# The API also hosts the review desk, which sends operators' instructions to the ledger over Kafka.
API_SETTINGS = [*ONBOARDING_SETTINGS, ADMIN_HOST, ADMIN_PORT, ADMIN_TOKEN, ADMIN_TOKEN_SHA256, *DESK_SETTINGS]


@dataclass(frozen=True)
class OnboardingSettings:
    """ONBOARDING_SETTINGS, read once (config.load_into)."""

    database_url: str
    vault_public_key_file: Path
    daraja_base_url: str
    daraja_connect_timeout_s: float
    daraja_read_timeout_s: float
    daraja_token_refresh_margin_s: float
    daraja_max_connections: int
    webhook_vault_public_key_file: Path
    webhook_allowed_networks: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class ApiSettings(OnboardingSettings):
    """API_SETTINGS: the onboarding API's, read once at start."""

    admin_host: str
    admin_port: int
    admin_token: str | None = field(repr=False)  # a secret
    admin_token_sha256: str | None
    kafka_bootstrap_servers: str
    schema_registry_url: str
    operator_verdict_wait_s: float


class AdminToken:
    """The admin credential, held only as its SHA-256 and compared in constant time."""

    def __init__(self, sha256_digest: bytes):
        self._digest = sha256_digest

    @classmethod
    def from_config(cls, cfg: ApiSettings) -> AdminToken:
        """From ADMIN_TOKEN_SHA256, else ADMIN_TOKEN; config.ConfigError when neither is usable."""
        if cfg.admin_token_sha256:
            return cls(bytes.fromhex(cfg.admin_token_sha256))
        token = cfg.admin_token
        if not token:
            raise config.ConfigError("ADMIN_TOKEN_SHA256 or ADMIN_TOKEN is required "
                                     "(`mpesa-pipeline admin-token` makes one)")
        if len(token) < ADMIN_TOKEN_MIN_CHARS:
            raise config.ConfigError(f"ADMIN_TOKEN is too short (value hidden: it is a secret); use at least "
                                     f"{ADMIN_TOKEN_MIN_CHARS} random characters")
        return cls(hashlib.sha256(token.encode()).digest())

    def matches(self, presented: str) -> bool:
        # Hashing first makes the comparison independent of the presented length.
        return hmac.compare_digest(hashlib.sha256(presented.encode(errors="replace")).digest(), self._digest)

    def __repr__(self) -> str:
        return "AdminToken(****)"
