"""Configuration from environment variables, checked once at start.

A service declares its settings; `load` reads them all and raises ConfigError naming the first
variable that is missing or bad, and `load_into` returns them as the service's own frozen, typed
settings class (field `database_url` holds DATABASE_URL). `describe` prints them with secrets masked.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from services.common.topic_config import parse_topic_configs

_MISSING = object()
T = TypeVar("T")


class ConfigError(Exception):
    """One line naming the variable and what is wrong with it."""


@dataclass(frozen=True)
class Setting:
    env: str
    parse: Callable[[str], Any] = str
    default: Any = _MISSING
    secret: bool = False
    help: str = ""


def load(settings: list[Setting], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    values = {}
    for s in settings:
        raw = environ.get(s.env)
        if raw is None or raw == "":
            if s.default is _MISSING:
                raise ConfigError(f"{s.env} is required but not set" + (f" ({s.help})" if s.help else ""))
            values[s.env] = s.default
            continue
        try:
            values[s.env] = s.parse(raw)
        except (ValueError, TypeError) as exc:
            if s.secret:  # even the parser's message might quote the value
                raise ConfigError(f"{s.env} is invalid (value hidden: it is a secret)") from None
            raise ConfigError(f"{s.env}={raw!r} is invalid: {exc}") from None
    return values


def field_name(setting: Setting) -> str:
    """The settings-class field that holds a variable: KAFKA_BOOTSTRAP_SERVERS -> kafka_bootstrap_servers."""
    return setting.env.lower()


def load_into(cls: type[T], settings: list[Setting], environ: Mapping[str, str] | None = None) -> T:
    """The settings as an instance of `cls`, a frozen dataclass with one field per setting. A field
    without a setting, or a setting without a field, is a programming error raised here, at start,
    so the class and the list (which the README's table documents) cannot drift apart."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} must be a frozen dataclass")
    fields = {f.name for f in dataclasses.fields(cls)}
    declared = {field_name(s) for s in settings}
    if fields != declared:
        raise TypeError(f"{cls.__name__} and its settings differ: fields without a setting "
                        f"{sorted(fields - declared)}, settings without a field {sorted(declared - fields)}")
    values = load(settings, environ)
    return cls(**{field_name(s): values[s.env] for s in settings})


def describe(settings: list[Setting], values: Mapping[str, Any]) -> str:
    return "\n".join(f"{s.env}={'****' if s.secret else mask_url(str(values[s.env]))}" for s in settings)


def mask_url(value: str) -> str:
    """Hides a password embedded in a URL (postgresql://user:pw@host/db)."""
    parts = urlsplit(value)
    if parts.password:
        return value.replace(f":{parts.password}@", ":****@", 1)
    return value


# Parsers: each raises ValueError with a message fit to follow the variable's name.

def whole_number(raw: str) -> int:
    # Plain ASCII digits only: int() also takes "1_000", " 7 " and other scripts' digits ("٥").
    if not re.fullmatch(r"-?[0-9]+", raw):
        raise ValueError("must be a whole number")
    return int(raw)


def port(raw: str) -> int:
    value = whole_number(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port between 1 and 65535")
    return value


def positive_int(raw: str) -> int:
    value = whole_number(raw)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def linger_ms(raw: str) -> int:
    """How long a consumer waits for more after a batch's first event. Bounded: a negative wait is
    an endless one to librdkafka's consume, and a batch held for minutes is a stalled pipeline."""
    value = whole_number(raw)
    if not 0 <= value <= LINGER_MS_MAX:
        raise ValueError(f"must be a whole number of milliseconds from 0 to {LINGER_MS_MAX}")
    return value


LINGER_MS_MAX = 1_000  # a second: more is a stalled hop, and a stop that waits as long


def positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(value) or value <= 0:  # float() takes "nan" and "inf": neither is a duration
        raise ValueError("must be a positive number")
    return value


def http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host")
    return raw.rstrip("/")


def postgres_url(raw: str) -> str:
    if urlsplit(raw).scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql:// URL")
    return raw


def host_ports(raw: str) -> str:
    for item in raw.split(","):
        host, sep, p = item.strip().rpartition(":")
        if not sep or not host:
            raise ValueError("must be host:port[,host:port...]")
        port(p)
    return raw


def boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def choice(raw: str, *options: str) -> str:
    if raw not in options:
        raise ValueError(f"must be one of {', '.join(options)}")
    return raw


# Settings several services share, declared once.
KAFKA_BOOTSTRAP = Setting("KAFKA_BOOTSTRAP_SERVERS", host_ports, "127.0.0.1:9092", help="Kafka brokers")
SCHEMA_REGISTRY = Setting("SCHEMA_REGISTRY_URL", http_url, "",
                          help="Confluent-compatible schema registry API; messages are written in the Confluent "
                               "wire format with it, in Avro single-object encoding without (empty)")


def database_url(role: str) -> Setting:
    """DATABASE_URL of a process logging in as `role` (infra/postgres.sh's login roles; the password
    comes from the URL or libpq's PGPASSFILE)."""
    return Setting("DATABASE_URL", postgres_url, f"postgresql://{role}@127.0.0.1:5433/mpesa", secret=False,
                   help=f"PostgreSQL connection URL, as the {role} role; its password is masked")


DATABASE_URL = database_url("mpesa")  # the schema's owner: migrations
TOPIC_PARTITIONS = Setting("KAFKA_TOPIC_PARTITIONS", positive_int, 6, help="partitions per topic at creation")
TOPIC_REPLICATION_FACTOR = Setting("KAFKA_TOPIC_REPLICATION_FACTOR", positive_int, None,
                                   help="replicas per partition at creation; unset: the broker's default")
TOPIC_CONFIGS = Setting("KAFKA_TOPIC_CONFIGS", parse_topic_configs, {},
                        help="topic settings over the defaults, topic:key=value,...;... (* for every topic)")
METRICS_HOST = Setting("METRICS_HOST", str, "127.0.0.1", help="address of /metrics, /healthz and /readyz for workers")
LOG_LEVEL = Setting("LOG_LEVEL", lambda v: choice(v.upper(), "DEBUG", "INFO", "WARNING", "ERROR"), "INFO")


# Kafka client settings (librdkafka's own names) pass through the environment as a family of
# variables rather than one Setting each: any of librdkafka's properties can be set without a code
# change (TLS, SASL, timeouts...). docs/kafka-security.md lists the ones the local broker needs.
# Values are never printed: errors name the variable (and a file's path), never what it holds.
KAFKA_CLIENT_PREFIX = "KAFKA_CLIENT_"
FROM_FILE_SUFFIX = "_FILE"


def client_property(env_name: str) -> str:
    """KAFKA_CLIENT_SASL_USERNAME -> sasl.username (librdkafka's names are lower case with dots)."""
    return env_name[len(KAFKA_CLIENT_PREFIX):].lower().replace("_", ".")


def client_variable(prop: str) -> str:
    return KAFKA_CLIENT_PREFIX + prop.upper().replace(".", "_")


def kafka_client_config(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The librdkafka settings every Kafka client of a process shares, from KAFKA_CLIENT_<NAME>:
    NAME is the property in capitals with underscores for dots (KAFKA_CLIENT_SECURITY_PROTOCOL=SASL_SSL
    sets security.protocol). KAFKA_CLIENT_<NAME>_FILE reads the value from a file instead (one
    trailing newline dropped), so a password need not sit in the environment; giving both is an
    error. Empty variables count as unset, as everywhere else."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(KAFKA_CLIENT_PREFIX) or raw == "":
            continue
        if name.endswith(FROM_FILE_SUFFIX):
            direct = name[:-len(FROM_FILE_SUFFIX)]
            if environ.get(direct):
                raise ConfigError(f"{direct} and {name} are both set; give one")
            values[client_property(direct)] = _read_value_file(name, raw)
        else:
            values[client_property(name)] = raw
    return values


def _read_value_file(name: str, path: str) -> str:
    try:
        value = Path(path).read_text()
    except OSError as exc:  # the path is not a secret; the file's content never goes in a message
        raise ConfigError(f"{name}={path!r} cannot be read: {exc.strerror}") from None
    value = value[:-1] if value.endswith("\n") else value
    if not value or "\n" in value:
        raise ConfigError(f"{name}={path!r} must hold one non-empty line")
    return value

