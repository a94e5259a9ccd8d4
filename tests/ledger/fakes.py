"""In-memory stand-ins for the ledger's ports (services/ledger/ports.py): a clock the test moves,
and a unit of work over dictionaries. tests/ledger/test_unit_of_work_contract.py runs one suite
against this and the PostgreSQL adapter, so the fast tests stand on the same behaviour."""
from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from services.common.pseudonyms import Pseudonyms
from services.ledger.ports import Opened, OutboxRow, UnitOfWork, Writes
from services.ledger.record import CHECKOUT_COLUMNS, RECEIPT_COLUMNS, PaymentRecord

PSEUDONYMS = Pseudonyms(bytes(range(32)))  # a fixed test key: the in-memory tests need no key file


class FakeClock:
    def __init__(self, start: datetime | None = None):
        self.at = start or datetime.now(timezone.utc)

    def now(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


class DuplicateCheckoutRequestId(Exception):
    """What PostgreSQL's unique index on checkout_request_id refuses."""


@dataclass
class Tables:
    payments: dict[str, PaymentRecord] = field(default_factory=dict)
    processed: dict[str, str] = field(default_factory=dict)           # event_id -> source
    # event_id -> (payment_id, topic, payload), in the order parked
    parked: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    history: list[tuple[str, str, str | None, str | None, str | None]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    confirm_by_query: dict[str, bool] = field(default_factory=dict)  # channel_id -> setting
    metadata_keys: dict[str, frozenset[str]] = field(default_factory=dict)  # channel_id -> analytics keys
    callback_bodies: dict[str, tuple[str, str, datetime, str, str]] = field(default_factory=dict)  # event_id -> row


class InMemoryUnitOfWork:
    def __init__(self, tables: Tables):
        self.tables = tables

    async def open(self, events: list[tuple[str, str]], payment_ids: list[str], receipts: list[str],
                   checkout_ids: list[str]) -> Opened:
        fresh = set()
        for event_id, source in events:
            if event_id not in self.tables.processed:
                self.tables.processed[event_id] = source
                fresh.add(event_id)
        wanted = set(payment_ids)
        parked: dict[str, list[tuple[str, str, bytes]]] = {}
        for event_id, (payment_id, topic, payload) in self.tables.parked.items():
            if payment_id in wanted:
                parked.setdefault(payment_id, []).append((event_id, topic, payload))
        held, pushed = await self.owners(receipts, checkout_ids)
        return Opened(fresh, {p: self.tables.payments[p] for p in wanted if p in self.tables.payments}, parked,
                      held, pushed)

    async def owners(self, receipts: list[str], checkout_ids: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        wanted_receipts, wanted_checkouts = set(receipts), set(checkout_ids)
        held, pushed = {}, {}
        for p in self.tables.payments.values():
            for column in RECEIPT_COLUMNS:
                if (value := getattr(p, column)) in wanted_receipts:
                    held[value] = p.payment_id
            for column in CHECKOUT_COLUMNS:
                if (value := getattr(p, column)) in wanted_checkouts:
                    pushed[value] = p.payment_id
        return held, pushed

    async def confirm_by_query(self, channel_id: str) -> bool:
        return self.tables.confirm_by_query.get(channel_id, False)

    async def analytics_metadata_keys(self, channel_id: str) -> frozenset[str]:
        return self.tables.metadata_keys.get(channel_id, frozenset())

    async def write(self, writes: Writes) -> list[OutboxRow]:
        for record in writes.payments:
            if record.checkout_request_id is not None and any(
                    p.checkout_request_id == record.checkout_request_id and p.payment_id != record.payment_id
                    for p in self.tables.payments.values()):
                raise DuplicateCheckoutRequestId(record.checkout_request_id)
            self.tables.payments[record.payment_id] = record
        for event_id in writes.unparked:
            self.tables.parked.pop(event_id, None)
        self.tables.history += writes.history
        for event_id, payment_id, topic, payload in writes.parked:
            assert event_id not in self.tables.parked, "an event is parked once"
            self.tables.parked[event_id] = (payment_id, topic, payload)
        first = len(self.tables.outbox) + 1
        rows = [(first + n, *message) for n, message in enumerate(writes.outbox)]
        self.tables.outbox += rows
        self.tables.audit += writes.audit
        for row in writes.callback_bodies:
            self.tables.callback_bodies.setdefault(row[0], row)  # the first kept, as ON CONFLICT DO NOTHING
        return rows


class InMemoryLedgerStore:
    """The tables, and units of work over them: one at a time (as the payment locks would make two
    batches of the same payments), committed on a normal exit, rolled back when the block raises."""

    def __init__(self) -> None:
        self.tables = Tables()
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[UnitOfWork]:
        async with self._lock:
            staged = copy.deepcopy(self.tables)
            yield InMemoryUnitOfWork(staged)
            self.tables = staged  # reached only when the block did not raise: commit
