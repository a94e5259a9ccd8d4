"""The webhook gateway's configuration: environment variables, read once at start."""
from __future__ import annotations

from dataclasses import dataclass, field

from services.common import config
from services.common.callback_token import parse_secrets
from services.webhook_consumer.sources import ANY_SOURCE, Network, parse_networks, parse_trusted_proxies

# The list circulated as Safaricom's published callback addresses (docs/callback-edge.md; confidence
# medium: not on the Daraja 3.0 pages themselves). Recommended WEBHOOK_ALLOWED_SOURCES in production; some
# lists add 196.201.212.128 and 196.201.212.132. Sandbox callbacks were seen from 196.201.212.69.
SAFARICOM_CALLBACK_SOURCES = ("196.201.214.200,196.201.214.206,196.201.213.114,196.201.214.207,196.201.214.208,"
                              "196.201.213.44,196.201.212.127,196.201.212.138,196.201.212.129,196.201.212.136,"
                              "196.201.212.74,196.201.212.69")

MAX_BODY_BYTES = 64 * 1024
ENVIRONMENTS = ("sandbox", "production")
OPEN_TO_ANY_SOURCE = "any"


def parse_allowed_sources(raw: str) -> tuple[Network, ...]:
    """parse_networks, or ANY_SOURCE for the word `any`: the explicit way to accept every address.

    (`any` rather than `*`: an unquoted * opens an alias in YAML, as in compose.yaml.)
    """
    if raw.strip().lower() == OPEN_TO_ANY_SOURCE:
        return ANY_SOURCE
    try:
        return parse_networks(raw)
    except ValueError as exc:
        raise ValueError(f"{exc}; write {OPEN_TO_ANY_SOURCE!r} alone to allow every source") from None


# Production is the default so that an operator who forgets the variable gets the strict behaviour;
# `make run`, the tests and the benchmarks say sandbox.
ENVIRONMENT = config.Setting(
    "MPESA_ENVIRONMENT", lambda raw: config.choice(raw.strip().lower(), *ENVIRONMENTS), "production",
    help="sandbox or production; in production an unset WEBHOOK_ALLOWED_SOURCES refuses to start")
HOST = config.Setting("WEBHOOK_HOST", str, "127.0.0.1", help="address to listen on")
PORT = config.Setting("WEBHOOK_PORT", config.port, 8081, help="port to listen on")
REUSE_PORT = config.Setting("WEBHOOK_REUSE_PORT", config.boolean, False,
                            help="listen with SO_REUSEPORT, so that several gateways on one host share WEBHOOK_PORT")
METRICS_PORT = config.Setting("WEBHOOK_METRICS_PORT", config.port, None,
                              help="also serve /metrics, /healthz and /readyz on this port, this process's own")
TOKEN_SECRETS = config.Setting(
    "WEBHOOK_TOKEN_SECRETS", lambda raw: tuple(parse_secrets(raw)), secret=True,
    help="HMAC secrets of the callback URL token, comma-separated, current first, each >= 32 characters")
ALLOWED_SOURCES = config.Setting(
    "WEBHOOK_ALLOWED_SOURCES", parse_allowed_sources, (),
    help="client IPs/CIDRs allowed to post callbacks, comma-separated, or 'any'; "
         "unset allows all in sandbox and refuses to start in production")
TRUSTED_PROXIES = config.Setting(
    "WEBHOOK_TRUSTED_PROXIES", parse_trusted_proxies, (),
    help="proxy IPs/CIDRs whose X-Forwarded-For is believed, comma-separated; at most /8 (IPv4), /28 (IPv6) wide")
RATE_PER_SOURCE = config.Setting("WEBHOOK_RATE_PER_SOURCE", config.positive_float, 100.0,
                                 help="callbacks per second per client address (token bucket refill)")
RATE_BURST = config.Setting("WEBHOOK_RATE_BURST", config.positive_int, 200,
                            help="callbacks a client address may send at once (token bucket size)")


def _milliseconds(low: int, high: int):
    def parse(raw: str) -> int:
        value = config.whole_number(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high} (milliseconds)")
        return value
    return parse


# The ranges keep the delivery timeout above the linger, as librdkafka requires.
KAFKA_TIMEOUT_MS = config.Setting("WEBHOOK_KAFKA_TIMEOUT_MS", _milliseconds(200, 300_000), 5000,
                                  help="how long to wait for Kafka's ack before answering 503")
KAFKA_LINGER_MS = config.Setting("WEBHOOK_KAFKA_LINGER_MS", _milliseconds(0, 100), 5,
                                 help="how long the producer gathers callbacks into one batch (latency for CPU)")

SETTINGS = [config.KAFKA_BOOTSTRAP, config.SCHEMA_REGISTRY, config.TOPIC_PARTITIONS, config.TOPIC_REPLICATION_FACTOR,
            config.TOPIC_CONFIGS, ENVIRONMENT, HOST, PORT, REUSE_PORT, METRICS_PORT, TOKEN_SECRETS, ALLOWED_SOURCES,
            TRUSTED_PROXIES, RATE_PER_SOURCE, RATE_BURST, KAFKA_TIMEOUT_MS, KAFKA_LINGER_MS]


@dataclass(frozen=True)
class WebhookSettings:
    """SETTINGS as read at start (config.load_into); GatewaySettings.from_config derives what the app enforces."""

    kafka_bootstrap_servers: str
    schema_registry_url: str
    kafka_topic_partitions: int
    kafka_topic_replication_factor: int | None
    kafka_topic_configs: dict[str, dict[str, str]]
    mpesa_environment: str
    webhook_host: str
    webhook_port: int
    webhook_reuse_port: bool
    webhook_metrics_port: int | None
    webhook_token_secrets: tuple[bytes, ...] = field(repr=False)
    webhook_allowed_sources: tuple[Network, ...]
    webhook_trusted_proxies: tuple[Network, ...]
    webhook_rate_per_source: float
    webhook_rate_burst: int
    webhook_kafka_timeout_ms: int
    webhook_kafka_linger_ms: int


@dataclass(frozen=True)
class GatewaySettings:
    token_secrets: tuple[bytes, ...] = field(repr=False)
    allowed_sources: tuple[Network, ...] = ()  # empty allows nobody; ANY_SOURCE allows all
    trusted_proxies: tuple[Network, ...] = ()
    rate_per_source_s: float = 100.0
    rate_burst: int = 200
    kafka_timeout_ms: int = 5000
    kafka_linger_ms: int = 5

    @classmethod
    def from_config(cls, cfg: WebhookSettings) -> GatewaySettings:
        return cls(token_secrets=cfg.webhook_token_secrets, allowed_sources=effective_allowed_sources(cfg),
                   trusted_proxies=cfg.webhook_trusted_proxies, rate_per_source_s=cfg.webhook_rate_per_source,
                   rate_burst=cfg.webhook_rate_burst, kafka_timeout_ms=cfg.webhook_kafka_timeout_ms,
                   kafka_linger_ms=cfg.webhook_kafka_linger_ms)


def effective_allowed_sources(cfg: WebhookSettings) -> tuple[Network, ...]:
    """The allow-list to enforce. Unset means every source in the sandbox environment; in production
    it is a configuration error, since Daraja signs nothing and the list is one of the few checks
    left to a callback whose URL leaked."""
    allowed = cfg.webhook_allowed_sources
    if allowed:
        return allowed
    if cfg.mpesa_environment == "sandbox":
        return ANY_SOURCE
    raise config.ConfigError(
        f"{ALLOWED_SOURCES.env} is required when {ENVIRONMENT.env}=production (the default): list Daraja's "
        f"callback addresses, or write {OPEN_TO_ANY_SOURCE!r} to accept callbacks from anywhere")
