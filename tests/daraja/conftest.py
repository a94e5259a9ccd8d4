"""Fixtures for the Daraja client and sandbox tests: the sandbox in-process on a free loopback port,
a callback receiver that records every callback byte for byte, and fresh clients per test.

Nothing here needs Kafka or PostgreSQL.
"""
from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web

from services.daraja.client import DarajaClient, DarajaTimeouts
from services.daraja.models import AppCredentials, Shortcode, StkPushRequest
from services.daraja_sandbox.app import create_app
from services.daraja_sandbox.keys import SANDBOX, SENDER
from services.daraja_sandbox.settings import (
    DEMO_CONSUMER_KEY,
    DEMO_CONSUMER_SECRET,
    SANDBOX_PASSKEY,
    SANDBOX_SHORTCODE,
    AppConfig,
    SandboxSettings,
)
from services.daraja_sandbox.state import Sandbox

TILL_KEY, TILL_SECRET, TILL_PASSKEY = "till-app-key", "till-app-secret", "till-passkey-0123456789"
TILL_STORE, TILL_NUMBER = "600100", "600200"
NO_PRODUCT_KEY, NO_PRODUCT_SECRET = "no-product-key", "no-product-secret"
# Fast settings for tests: outcomes exist at once, callbacks go out at once.
TEST_SETTINGS = SandboxSettings(callback_delay_ms=0, latency_ms=0, callback_timeout_s=5.0)
ADMIN_TOKEN = secrets.token_urlsafe(32)


@dataclass
class ReceivedCallback:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class CallbackReceiver:
    """Answers every callback 200 and keeps it, so tests can compare what Daraja would have sent."""

    base_url: str = ""
    received: list[ReceivedCallback] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self.arrived:
            self.received.append(ReceivedCallback(request.path_qs, dict(request.headers), body))
            self.arrived.notify_all()
        return web.json_response({"ResultCode": 0, "ResultDesc": "Accepted"})

    def new_url(self) -> str:
        return f"{self.base_url}/callbacks/stk/{uuid.uuid4().hex}"

    def for_url(self, url: str) -> list[ReceivedCallback]:
        path = httpx.URL(url).raw_path.decode()
        return [c for c in self.received if c.path == path]

    async def wait_for(self, url: str, count: int = 1, timeout_s: float = 3.0) -> list[ReceivedCallback]:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.for_url(url)) >= count), timeout_s)
        return self.for_url(url)


@dataclass
class SandboxHandle:
    base_url: str
    app: web.Application

    @property
    def state(self) -> Sandbox:
        return self.app[SANDBOX]

    def accepted_pushes(self, **filters: str) -> list[dict]:
        return self.state.pushes_matching({"status": "accepted", **filters})

    def all_pushes(self, **filters: str) -> list[dict]:
        return self.state.pushes_matching(filters)


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest.fixture(scope="session")
async def sandbox_server():
    apps = [AppConfig(TILL_KEY, TILL_SECRET, TILL_STORE, TILL_PASSKEY, "till", TILL_NUMBER),
            AppConfig(NO_PRODUCT_KEY, NO_PRODUCT_SECRET, products_enabled=False)]
    runner, base_url = await _serve(create_app(TEST_SETTINGS, apps, admin_token=ADMIN_TOKEN))
    yield SandboxHandle(base_url, runner.app)
    await runner.cleanup()


@pytest.fixture
async def sandbox(sandbox_server: SandboxHandle) -> SandboxHandle:
    sandbox_server.app[SENDER].cancel_pending()
    sandbox_server.state.reset()
    return sandbox_server


@pytest.fixture(scope="session")
async def receiver():
    callback_receiver = CallbackReceiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", callback_receiver.handle)
    runner, callback_receiver.base_url = await _serve(app)
    yield callback_receiver
    await runner.cleanup()


@pytest.fixture
async def client(sandbox: SandboxHandle):
    daraja = DarajaClient(sandbox.base_url, timeouts=DarajaTimeouts(connect_s=2, read_s=5, write_s=2, pool_s=2))
    yield daraja
    await daraja.aclose()


@pytest.fixture
async def raw_http():
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        yield http


@pytest.fixture
async def admin_http():
    """A client of the sandbox's admin API: every request carries the admin token."""
    async with httpx.AsyncClient(timeout=5, trust_env=False,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        yield http


@pytest.fixture
def app_credentials() -> AppCredentials:
    return AppCredentials(DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY)


@pytest.fixture
def paybill() -> Shortcode:
    return Shortcode(SANDBOX_SHORTCODE)


def new_phone() -> str:
    """A random Safaricom number outside the sandbox's scenario selectors (25470000…, 254708374149)."""
    return f"25471{random.randrange(10_000_000):07d}"


def push_request(callback_url: str, *, phone: str | None = None, amount: int = 1,
                 reference: str = "ORDER1") -> StkPushRequest:
    return StkPushRequest(amount=amount, phone=phone or new_phone(), account_reference=reference,
                          description="Payment", callback_url=callback_url)
