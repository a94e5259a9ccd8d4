"""Shared fixtures: a real Kafka broker and a real PostgreSQL.

Endpoints come from KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL (the migration role's) when set; otherwise
the project's own scripts (infra/up.sh) start local ones, which is idempotent and fast when they
already run. The migrations run as that role; each service and each service's building blocks run
as the service's own role (infra/postgres.sh's login roles, passwords from PGPASSFILE), as in
`make run`. `pool` is the migration role's, for setting up and inspecting.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool

from services.common import pseudonyms
from services.common.avro import open_codec
from services.common.config import KAFKA_CLIENT_PREFIX
from services.common.db import migrate, open_pool
from services.common.kafka import EventProducer, ensure_topics
from services.common.topics import ALL_TOPICS
from services.devstack import role_url
from services.ledger.anchors import create_key

ANCHOR_KEY_FILE = Path(__file__).resolve().parents[1] / ".local" / "audit" / "anchor-key.pem"
# The session's pseudonym key, `make run`'s too; services started by tests get it through the environment.
PSEUDONYM_KEY_FILE = Path(__file__).resolve().parents[1] / ".local" / "secrets" / "pseudonym.key"

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 3


ENDPOINTS = ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "SCHEMA_REGISTRY_URL")


def _wanted(name: str) -> bool:
    return name in ENDPOINTS or name.startswith(KAFKA_CLIENT_PREFIX)


def _start_local_infra() -> dict[str, str]:
    out = subprocess.run(["bash", str(ROOT / "infra" / "up.sh")], check=True, capture_output=True, text=True)
    env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if env.get("PGPASSFILE"):  # this process and every service it starts log in with it
        os.environ.setdefault("PGPASSFILE", env["PGPASSFILE"])
    return {k: v for k, v in env.items() if _wanted(k)}


_MIGRATION_URLS: set[str] = set()  # the tests' DATABASE_URL, once the infra fixture ran
# The login role each service runs as (infra/postgres.sh), by module.
SERVICE_ROLES = {"services.ingress": "ingress", "services.ledger": "ledger", "services.stk_worker": "stk_worker",
                 "services.channels": "onboarding", "services.ledger.anchors": "auditor",
                 "services.notifier": "notifier", "services.privacy": "privacy"}


# Every fixture that reaches the broker or the database depends on `infra`, so a test needs them exactly
# when `infra` is in its fixture closure. Those are marked `integration`; `make check` runs the rest
# (`-m "not integration"`) with CHECK_ONLY set, and then `infra` refuses to start anything.
INFRA_FIXTURE = "infra"
CHECK_ONLY = "CHECK_ONLY"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INFRA_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def infra() -> dict[str, str]:
    """Endpoints and the admin principal's Kafka login (TLS, SCRAM). In-process clients read the
    KAFKA_CLIENT_* variables from the environment as services do, so they are exported here."""
    if os.environ.get(CHECK_ONLY):
        pytest.fail(f"this test needs Kafka/PostgreSQL but was not marked integration ({CHECK_ONLY} is set): "
                    "name the fixture it needs as a parameter, not through request.getfixturevalue()", pytrace=False)
    given = {k: v for k, v in os.environ.items() if _wanted(k) and v}
    if not all(k in given for k in ENDPOINTS):
        given = {**_start_local_infra(), **given}
    # SCHEMA_REGISTRY_URL too: a service or helper started as a subprocess reads it as `make run`'s do.
    os.environ.update({k: v for k, v in given.items()
                       if k.startswith(KAFKA_CLIENT_PREFIX) or k == "SCHEMA_REGISTRY_URL"})
    migrate(given["DATABASE_URL"])
    _MIGRATION_URLS.add(given["DATABASE_URL"])
    ANCHOR_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
    create_key(ANCHOR_KEY_FILE)  # the same key as `make run`'s: both anchor the same local database
    pseudonyms.create_key(PSEUDONYM_KEY_FILE)
    os.environ["PSEUDONYM_KEY_FILE"] = str(PSEUDONYM_KEY_FILE)
    ensure_topics(given["KAFKA_BOOTSTRAP_SERVERS"], ALL_TOPICS, PARTITIONS)
    return given


@pytest.fixture(scope="session")
def kafka_bootstrap(infra) -> str:
    return infra["KAFKA_BOOTSTRAP_SERVERS"]


@pytest.fixture(scope="session")
def database_url(infra) -> str:
    return infra["DATABASE_URL"]


def database_url_of(infra: dict[str, str], role: str) -> str:
    """The URL of a service's login role on the tests' database."""
    return role_url(infra["DATABASE_URL"], role)


async def _role_pool(infra, role: str):
    # Checked before each use: a test restarts PostgreSQL (tests/ledger/test_ledger_crashes.py), and a
    # pool made before it would otherwise hand the next test a dead connection.
    p = AsyncConnectionPool(database_url_of(infra, role), min_size=1, max_size=4, open=False,
                            check=AsyncConnectionPool.check_connection)
    await p.open(wait=True, timeout=30)
    yield p
    await p.close()


def _role_pool_fixture(role: str):
    """A session-wide pool logged in as a service's own role: `<role>_pool`."""
    @pytest.fixture(scope="session", name=f"{role}_pool")
    async def role_pool(infra):
        async for p in _role_pool(infra, role):
            yield p
    return role_pool


ledger_pool = _role_pool_fixture("ledger")
ingress_pool = _role_pool_fixture("ingress")
stk_worker_pool = _role_pool_fixture("stk_worker")
onboarding_pool = _role_pool_fixture("onboarding")
auditor_pool = _role_pool_fixture("auditor")
privacy_pool = _role_pool_fixture("privacy")
notifier_pool = _role_pool_fixture("notifier")


@pytest.fixture(scope="session")
async def codec(infra):
    """The tests' codec, on the registry the services use (as `make run` configures them): it writes
    the Confluent framing, and knows the ids of the current schemas without learning them."""
    codec = await open_codec(infra.get("SCHEMA_REGISTRY_URL", ""), ALL_TOPICS)
    yield codec
    await codec.close()


@pytest.fixture(scope="session")
def producer(kafka_bootstrap, codec):
    p = EventProducer(kafka_bootstrap, codec, client_id="tests")
    yield p
    p.close()


@pytest.fixture(scope="session")
async def pool(database_url):
    p = await open_pool(database_url, max_size=4)
    yield p
    await p.close()


@pytest.fixture
def unique() -> str:
    """A short random suffix so tests never share topics, groups or channels. Never nine digits in a
    row: the ledger masks such runs (a phone number, perhaps) in the texts it keeps, and a test comparing
    a text that quotes a channel id failed about once in forty runs."""
    while re.search(r"[0-9]{9}", suffix := uuid.uuid4().hex[:10]):
        pass
    return suffix


# Ports handed to services are taken below Linux's ephemeral range (32768-60999): a port the kernel
# picked there could be picked again, for the next free_port or for any process's outgoing connection,
# before the service binds it (a ledger once found its metrics port taken by the gateway).
_LISTEN_PORTS = range(20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never handed out before by this test run."""
    while True:
        port = random.choice(_LISTEN_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def kafka_login(infra: dict[str, str], principal: str) -> dict[str, str]:
    """The variables that make a service process log in to Kafka as `principal` instead of admin:
    its password file sits beside the admin's (.local/secrets/kafka-<principal>.password)."""
    secrets_dir = Path(infra["KAFKA_CLIENT_SASL_PASSWORD_FILE"]).parent
    return {"KAFKA_CLIENT_SASL_USERNAME": principal,
            "KAFKA_CLIENT_SASL_PASSWORD_FILE": str(secrets_dir / f"kafka-{principal}.password")}


def service_env(infra: dict[str, str], **extra: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INGRESS_", "LEDGER_", "STK_", "WEBHOOK_"))}
    return {**env, **infra, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in extra.items()}}


class ServiceProcess(subprocess.Popen):
    """A service under test whose output is read as it comes. A pipe nobody reads fills at 64 KiB;
    the service's next log line then blocks, and with it the service's event loop. Most likely what
    stopped an e2e STK worker mid-suite on a development database full of other channels' payments."""

    def __init__(self, module: str, env: dict[str, str]):
        super().__init__([sys.executable, "-m", module], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._lines.extend, args=(self.stdout,), daemon=True)
        self._reader.start()

    def output(self) -> str:
        """What the service wrote so far (all of it once it exited)."""
        return "".join(self._lines)

    def communicate(self, input=None, timeout=None) -> tuple[str, None]:
        self.wait(timeout)
        self._reader.join()
        return self.output(), None


def start_service(module: str, env: dict[str, str]) -> ServiceProcess:
    """A service logs in as its own role, unless the test chose another URL than the tests' own."""
    url = env.get("DATABASE_URL")
    if module in SERVICE_ROLES and url is not None and url in _MIGRATION_URLS:
        env = {**env, "DATABASE_URL": role_url(url, SERVICE_ROLES[module])}
    return ServiceProcess(module, env)


async def eventually(check, timeout: float = 20.0, interval: float = 0.1):
    """Polls an async check until it returns a truthy value; returns it, or fails at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last result: {result!r})")
        await asyncio.sleep(interval)
