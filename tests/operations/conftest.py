"""Fixtures of the review desk's tests: payments sent to Review by a real contradiction, through the
ledger's own code and login role, and a stand-in for the ledger's verdict on an instruction."""
from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.channels.api import create_app
from services.channels.onboarding import Onboarding
from services.channels.settings import AdminToken
from services.ledger import store
from services.ledger.service import Ledger
from services.operations.desk import ReviewDesk
from tests.ledger.callbacks import failure, success
from tests.ledger.fakes import FakeClock
from tests.ledger.test_ledger_db import accepted, callback, requested

ADMIN_TOKEN = secrets.token_urlsafe(32)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass(frozen=True)
class Made:
    """A payment a test made, with what an operator would search it by."""

    payment_id: str
    channel_id: str
    phone: str
    order_reference: str
    checkout_request_id: str
    receipt: str


def new_phone() -> str:
    return "2547" + "".join(secrets.choice("0123456789") for _ in range(8))


def daraja_checkout_id(phone: str) -> str:
    """A CheckoutRequestID of Daraja's current form: a time to the millisecond, then the payer's number
    without 254 (docs/daraja.md §2)."""
    return f"ws_CO_{secrets.randbelow(10 ** 17):017d}{phone[3:]}"


def new_receipt() -> str:
    return "R" + secrets.token_hex(5).upper()[:9]


@pytest.fixture
def ledger(ledger_pool, codec) -> Ledger:
    return Ledger(ledger_pool, codec, clock=FakeClock())


async def make_payment(ledger: Ledger, channel: str, *, review: bool = True, phone: str | None = None,
                       order_reference: str | None = None) -> Made:
    """A payment cancelled by the customer whose success callback, with its receipt, came after:
    money moved, so the ledger keeps the receipt as late_receipt and sends the payment to Review.
    With review=False it stays Cancelled."""
    phone = phone or new_phone()
    made = Made(str(uuid.uuid4()), channel, phone, order_reference or f"ord-{uuid.uuid4().hex[:12]}",
                daraja_checkout_id(phone), new_receipt())
    await ledger.handle_batch([requested(channel, made.payment_id, phone=made.phone,
                                         order_reference=made.order_reference),
                               accepted(channel, made.payment_id, made.checkout_request_id)])
    await ledger.handle_batch([callback(channel, made.payment_id, failure(made.checkout_request_id, 1032))])
    if review:
        await ledger.handle_batch([callback(channel, made.payment_id, success(
            made.checkout_request_id, receipt=made.receipt, phone=int(made.phone)))])
    return made


@dataclass
class ScriptedLedger:
    """Stands in for Kafka and the ledger: keeps each OperatorCommand and writes the verdict the test
    chose into the audit trail, chained as the ledger chains it (services/ledger/store.py), so
    the trail still verifies. verdict None: the ledger never answers."""

    ledger_pool: Any
    verdict: str | None = "applied"
    detail: str = ""
    sent: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, record: dict[str, Any]) -> None:
        self.sent.append(record)
        if self.verdict is None:
            return
        async with self.ledger_pool.connection() as conn, conn.transaction():
            await store.append_audit(conn, [{
                "payment_id": record["payment_id"], "event_id": record["event_id"],
                "fact": f"operator_{record['action'].lower()}", "verdict": self.verdict, "from_state": "Review",
                "to_state": None, "detail": self.detail, "at": datetime.now(timezone.utc)}])


@pytest.fixture
def scripted(ledger_pool) -> ScriptedLedger:
    return ScriptedLedger(ledger_pool)


@pytest.fixture
def desk(onboarding_pool, scripted) -> ReviewDesk:
    return ReviewDesk(onboarding_pool, scripted, verdict_wait_s=2.0, poll_interval_s=0.05)


def admin_app(onboarding_pool, desk: ReviewDesk, tmp_path, **kwargs):
    onboarding = Onboarding(onboarding_pool, public_key_file=tmp_path / "absent.pub.json")
    return create_app(onboarding, AdminToken(hashlib.sha256(ADMIN_TOKEN.encode()).digest()), desk=desk, **kwargs)


@pytest.fixture
async def client(onboarding_pool, desk, tmp_path):
    async with TestClient(TestServer(admin_app(onboarding_pool, desk, tmp_path))) as test_client:
        yield test_client


async def payment_row(pool, payment_id: str) -> dict[str, Any]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT * FROM payments WHERE payment_id = %s", (payment_id,))
        row = await cur.fetchone()
        return dict(zip([c.name for c in cur.description], row, strict=True))


async def audit_rows(pool, payment_id: str) -> list[tuple]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT seq, event_id, verdict, to_state, detail FROM audit_log"
                                         " WHERE payment_id = %s ORDER BY seq", (payment_id,))).fetchall()
