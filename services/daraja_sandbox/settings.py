"""The sandbox's knobs: fixed at start from the command line, the tunable ones editable at run time
through `PATCH /sandbox/settings`."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from services.common import config

# The public sandbox shortcode and its published passkey (docs/daraja.md §6 "Sandbox facts").
SANDBOX_SHORTCODE = "174379"
SANDBOX_PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
# An app present unless --no-default-app, so `make run` works without registering one.
DEMO_CONSUMER_KEY = "sandbox-demo-consumer-key"
DEMO_CONSUMER_SECRET = "sandbox-demo-consumer-secret"
DEFAULT_PORT = 8089
PENDING_QUERY_STYLES = ("4999", "being_processed", "empty", "mixed")
# The admin API's bearer token comes from the environment only (never the command line, where `ps`
# shows it). Unset, the admin API is closed.
ADMIN_TOKEN_ENV = "DARAJA_SANDBOX_ADMIN_TOKEN"
ADMIN_TOKEN_MIN_CHARS = 32

# The environment the sandbox reads at start; the command line (`--port`, `--log-level`) wins over it.
PORT = config.Setting("DARAJA_SANDBOX_PORT", config.port, DEFAULT_PORT, help="port to listen on, unless --port")
ADMIN_TOKEN = config.Setting(ADMIN_TOKEN_ENV, str, None, secret=True,
                             help=f"bearer token of the admin API under /sandbox/, >= {ADMIN_TOKEN_MIN_CHARS} "
                                  "characters; unset, the admin API is closed")
SETTINGS = [PORT, ADMIN_TOKEN, config.LOG_LEVEL]


@dataclass(frozen=True)
class SandboxEnvironment:
    """SETTINGS, read once at start (config.load_into)."""

    daraja_sandbox_port: int
    daraja_sandbox_admin_token: str | None = field(repr=False)  # a secret
    log_level: str


def environment_from(environ: Mapping[str, str]) -> SandboxEnvironment:
    """SETTINGS from `environ`: config.ConfigError names a bad variable, ValueError (never quoting
    it) a weak admin token."""
    env = config.load_into(SandboxEnvironment, SETTINGS, environ)
    token = env.daraja_sandbox_admin_token
    if token is not None and (len(token) < ADMIN_TOKEN_MIN_CHARS or not token.isascii() or not token.isprintable()
                              or token != token.strip() or " " in token):
        raise ValueError(f"{ADMIN_TOKEN_ENV} must be at least {ADMIN_TOKEN_MIN_CHARS} printable ASCII characters "
                         "without spaces (value hidden: it is a secret)")
    return env


@dataclass(frozen=True)
class AppConfig:
    """An app to register: OAuth key pair, optionally with its own shortcode and passkey."""

    consumer_key: str
    consumer_secret: str
    shortcode: str | None = None
    passkey: str | None = None
    shortcode_type: str = "paybill"
    till_number: str | None = None
    products_enabled: bool = True  # False: every API call answers 401.003.01

    def __post_init__(self) -> None:
        if not _non_empty(self.consumer_key) or ":" in self.consumer_key or not _non_empty(self.consumer_secret):
            raise ValueError("consumer_key and consumer_secret must be non-empty strings (no ':' in the key)")
        if self.shortcode is None:
            return
        if not re.fullmatch(r"\d{5,7}", self.shortcode) or not _non_empty(self.passkey):
            raise ValueError("shortcode must be 5-7 digits and come with a passkey")
        if self.shortcode_type not in ("paybill", "till"):
            raise ValueError("shortcode_type must be paybill or till")
        if (self.shortcode_type == "till") != (self.till_number is not None):
            raise ValueError("a till needs till_number; a paybill has none")
        if self.till_number is not None and not re.fullmatch(r"\d{5,7}", self.till_number):
            raise ValueError("till_number must be 5-7 digits")

    @classmethod
    def from_json(cls, value: Any) -> AppConfig:
        if not isinstance(value, dict):
            raise ValueError("an app must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown app fields: {sorted(unknown)}")
        return cls(**value)


@dataclass(frozen=True)
class SandboxSettings:
    latency_ms: int = 0  # every answer (OAuth, push, query) waits this long
    callback_delay_ms: int = 2000  # push to outcome: the query says "still processing" until then
    rate_limit_per_s: float = 0.0  # push + query requests per second; 0 = unlimited
    rate_limit_burst: int = 0  # 0 = a tenth of a second's worth, at least 1
    subscriber_lock: bool = True  # one open prompt per phone (500.001.1001 Unable to lock subscriber)
    reject_localhost: bool = False  # real Daraja refuses "localhost" callback hosts (docs/daraja.md §5)
    token_ttl_s: int = 3599
    invalidate_previous_tokens: bool = True  # each new token kills the app's previous one (docs/daraja.md §1)
    pending_query_style: str = "mixed"  # 4999 | being_processed | empty | mixed (rotates)
    timestamp_tolerance_s: int = 900  # how far Timestamp may be from Nairobi time
    max_amount: int = 250_000
    callback_concurrency: int = 64  # callbacks in flight at once (fixed at start)
    callback_timeout_s: float = 10.0  # fixed at start
    max_transactions: int = 200_000  # oldest pushes and transactions are forgotten beyond this

    def updated(self, changes: dict[str, Any]) -> SandboxSettings:
        """These settings with `changes` applied; ValueError names the first bad one."""
        fixed = {"callback_concurrency", "callback_timeout_s", "max_transactions"}
        current = asdict(self)
        for name, value in changes.items():
            if name not in current or name in fixed:
                raise ValueError(f"{name} is not a setting that can be changed at run time")
            if not _same_type(current[name], value):
                raise ValueError(f"{name} must be of type {type(current[name]).__name__}")
        typed: dict[str, Any] = {k: float(v) if isinstance(current[k], float) else v for k, v in changes.items()}
        new = replace(self, **typed)
        new.check()
        return new

    def check(self) -> None:
        numbers = ("latency_ms", "callback_delay_ms", "rate_limit_per_s", "rate_limit_burst", "timestamp_tolerance_s")
        for name in numbers:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("token_ttl_s", "max_amount", "callback_concurrency", "callback_timeout_s", "max_transactions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.pending_query_style not in PENDING_QUERY_STYLES:
            raise ValueError(f"pending_query_style must be one of {', '.join(PENDING_QUERY_STYLES)}")

    @property
    def effective_burst(self) -> int:
        return self.rate_limit_burst or max(1, int(self.rate_limit_per_s / 10))


def _same_type(current: Any, value: Any) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(current))


def _non_empty(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
