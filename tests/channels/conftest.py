"""Fixtures for the channel tests: a key file per test, the onboarding operations, a running Daraja
sandbox with a freshly registered app, and credentials made of random strings that are easy to
search for in logs, responses and table bytes."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.channels.onboarding import Onboarding, daraja_credential_check
from services.channels.vault import LocalKeyFileProvider, public_key_path
from services.daraja.models import AppCredentials
from tests.conftest import ROOT, free_port

SANDBOX_ADMIN_TOKEN = secrets.token_urlsafe(32)  # the sandbox's admin API (POST /sandbox/apps) needs it


@dataclass(frozen=True)
class Secrets:
    consumer_key: str
    consumer_secret: str
    passkey: str

    @property
    def body(self) -> dict:
        return {"consumerKey": self.consumer_key, "consumerSecret": self.consumer_secret, "passkey": self.passkey}

    @property
    def app(self) -> AppCredentials:
        return AppCredentials(self.consumer_key, self.consumer_secret, self.passkey)

    @property
    def values(self) -> tuple[str, str, str]:
        return self.consumer_key, self.consumer_secret, self.passkey


def new_secrets() -> Secrets:
    return Secrets("ck" + secrets.token_hex(12), "cs" + secrets.token_hex(12), secrets.token_hex(32))


def assert_no_secret(text: str | bytes, *values: str) -> None:
    """Fails naming which secret leaked (by position, never by value)."""
    haystack = text if isinstance(text, bytes) else text.encode()
    for position, value in enumerate(values):
        for form in (value.encode(), value.encode().hex().encode()):
            assert form not in haystack, f"secret #{position} appears in the scanned text"


def paybill_body(channel_id: str, **extra) -> dict:
    return {"channelId": channel_id, "displayName": "Duka La Mama", "shortcodeType": "paybill",
            "businessShortcode": "174379", "environment": "sandbox", "consentReference": "AGR-2024-001",
            "consentDate": "2024-05-01", **AGREEMENT, **extra}


# A signed processing agreement: what activation needs besides consent and credentials.
AGREEMENT = {"agreementReference": "DPA-2024-017", "agreementVersion": "2.1", "agreementSignedOn": "2024-05-01",
             "lawfulBasis": "contract"}


@pytest.fixture
def key_file(tmp_path) -> Path:
    return tmp_path / "vault" / "kek.json"


@pytest.fixture
def provider(key_file) -> LocalKeyFileProvider:
    return LocalKeyFileProvider.open(key_file, create=True)


@pytest.fixture
def creds() -> Secrets:
    return new_secrets()


@pytest.fixture(scope="session")
def daraja_sandbox() -> Iterator[str]:
    """A Daraja sandbox subprocess (`python -m services.daraja_sandbox`); its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.daraja_sandbox", "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "DARAJA_SANDBOX_ADMIN_TOKEN": SANDBOX_ADMIN_TOKEN},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base_url)
        yield base_url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_healthy(base_url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + "/sandbox/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the Daraja sandbox did not start")


@pytest.fixture
def registered_app(daraja_sandbox, creds) -> Secrets:
    """`creds` registered with the sandbox as a Daraja app (shortcode 174379 and its own passkey)."""
    response = httpx.post(daraja_sandbox + "/sandbox/apps", json={
        "consumer_key": creds.consumer_key, "consumer_secret": creds.consumer_secret},
        headers={"Authorization": f"Bearer {SANDBOX_ADMIN_TOKEN}"})
    assert response.status_code == 201, response.text
    return creds


@pytest.fixture
def onboarding(onboarding_pool, provider, key_file, daraja_sandbox) -> Onboarding:
    return Onboarding(onboarding_pool, public_key_file=public_key_path(key_file),
                      credential_check=daraja_credential_check(daraja_sandbox))



async def onboard(onboarding: Onboarding, channel_id: str, creds: Secrets, **extra) -> str:
    """A channel with consent and its first credentials."""
    await onboarding.create_channel(paybill_body(channel_id, **extra), "tests")
    await onboarding.set_credentials(channel_id, creds.body, "tests")
    return channel_id


async def audit_of(pool, channel_id: str) -> list[tuple]:
    """(action, version, actor, kek_id, detail) for a channel, oldest first."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT action, version, actor, kek_id, detail FROM credential_audit"
                                 " WHERE channel_id = %s ORDER BY id", (channel_id,))
        return await cur.fetchall()


async def table_bytes(pool, table: str, column: str, value: str) -> bytes:
    """Every byte PostgreSQL returns for the matching rows: the row as text and each bytea column raw."""
    async with pool.connection() as conn:
        cur = await conn.execute(f"SELECT convert_to(t::text, 'UTF8'), t.* FROM {table} t WHERE {column} = %s",
                                 (value,))
        rows = await cur.fetchall()
    assert rows, f"no {table} rows for {value}"
    return b"".join(bytes(v) if isinstance(v, (bytes, memoryview)) else str(v).encode() for row in rows for v in row)


# Webhook endpoints

LOOPBACK_NETWORKS = "127.0.0.0/8,::1/128"  # the tests' receivers live on this machine


@pytest.fixture
def webhook_key_file(tmp_path) -> Path:
    """The notifier's key file: only the tests open secrets with it; management sees its public half."""
    return tmp_path / "notifier-vault" / "webhooks-kek.json"


@pytest.fixture
def webhook_provider(webhook_key_file) -> LocalKeyFileProvider:
    return LocalKeyFileProvider.open(webhook_key_file, create=True)


def status_event(channel_id: str, status: str = "Settled", **changes) -> dict:
    """A decoded payment_status record (schemas/payment_status.avsc) with fresh ids."""
    from datetime import datetime, timezone
    event = {"event_id": str(uuid.uuid4()), "occurred_at": datetime.now(timezone.utc), "channel_id": channel_id,
             "payment_id": str(uuid.uuid4()), "schema_version": 2, "status": status, "previous_status": "Pending",
             "amount": 1500, "phone_masked": "*********149", "order_reference": "ord-98765",
             "checkout_request_id": "ws_CO_1007202409152617172396192", "mpesa_receipt": "NLJ7RT61SV",
             "transaction_time": datetime.now(timezone.utc), "result_code": "0", "reason": "processed",
             "metadata": {"cart": "42"}, "late_mpesa_receipt": None}
    return {**event, **changes}


async def insert_delivery(pool, endpoint_id: str, channel_id: str, *, state: str = "delivered", attempts: int = 1,
                          occurred_at=None, leased: bool = False, **event_changes) -> dict:
    """A delivery row as the notifier writes it (E1's process is not needed to test the log); its
    id, event id and webhook id."""
    from services.notifier.events import event_type_of, webhook_body, webhook_id_of
    event = status_event(channel_id, **({"occurred_at": occurred_at} if occurred_at else {}), **event_changes)
    finished = state != "pending"
    async with pool.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO webhook_deliveries (webhook_id, event_id, endpoint_id, channel_id, payment_id, event_type,"
            " occurred_at, body, state, attempts, next_attempt_at, finished_at, last_http_status, leased_by,"
            " leased_until) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now() + interval '1 hour',"
            " CASE WHEN %s THEN now() END, %s, %s, CASE WHEN %s THEN now() + interval '5 minutes' END) RETURNING id",
            (webhook_id_of(event["event_id"]), event["event_id"], endpoint_id, channel_id, event["payment_id"],
             event_type_of(event["status"]), event["occurred_at"], webhook_body(event), state, attempts, finished,
             204 if state == "delivered" else 500, "notifier-test" if leased else None, leased))
        row = await cur.fetchone()
    return {"id": row[0], "event_id": event["event_id"], "webhook_id": webhook_id_of(event["event_id"])}
