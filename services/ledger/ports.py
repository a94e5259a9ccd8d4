"""The ledger's ports: what the application service (services/ledger/application.py) needs from
the outside, as Protocols. The PostgreSQL adapters are in services/ledger/postgres.py; tests use
in-memory ones (tests/ledger/fakes.py), and one contract suite runs against both."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from services.ledger.record import PaymentRecord

OutboxMessage = tuple[str, bytes, bytes]          # (topic, key, payload)
OutboxRow = tuple[int, str, bytes, bytes]         # the same, with its outbox id (services/ledger/relay.py)
ParkedRow = tuple[str, str, bytes]                # (event_id, topic, payload) of a fact waiting for its payment
HistoryRow = tuple[str, str, str | None, str | None, str | None]  # (payment_id, state, previous, reason, event_id)


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)


@dataclass
class Opened:
    """What a unit of work read when it opened, for one batch."""
    fresh_events: set[str]                       # ids of the events not processed before
    payments: dict[str, PaymentRecord]           # the payments that exist, locked
    parked: dict[str, list[ParkedRow]]           # payment_id -> facts waiting for it, oldest first
    receipts: dict[str, str]                     # receipt -> the payment it already proves
    checkouts: dict[str, str]                    # CheckoutRequestID -> the payment whose push it is


@dataclass
class Writes:
    """Everything one batch writes, in one go, when it is done."""
    payments: list[PaymentRecord] = field(default_factory=list)
    unparked: list[str] = field(default_factory=list)  # event ids of parked facts now applied
    history: list[HistoryRow] = field(default_factory=list)
    parked: list[tuple[str, str, str, bytes]] = field(default_factory=list)  # (event_id, payment_id, topic, payload)
    outbox: list[OutboxMessage] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)  # each with its `at`, and `actor` when one acted
    # (event_id, payment_id, received_at, verdict, body) of each callback decided; a redelivered
    # callback decided again keeps its first row
    callback_bodies: list[tuple[str, str, datetime, str, str]] = field(default_factory=list)


class UnitOfWork(Protocol):
    """One transaction: what it reads is locked for it, what it writes is committed together with
    the processed-event marks, or nothing is (docs/design.md)."""

    async def open(self, events: list[tuple[str, str]], payment_ids: list[str], receipts: list[str],
                   checkout_ids: list[str]) -> Opened:
        """Marks these events (event_id, source) processed, locks these payments (existing or not)
        and reads them, their parked facts and the owners of these receipts and CheckoutRequestIDs."""
        ...

    async def owners(self, receipts: list[str], checkout_ids: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """Locks these receipts, then reads who holds them and these CheckoutRequestIDs (for facts not in
        the batch's first read)."""
        ...

    async def confirm_by_query(self, channel_id: str) -> bool:
        """Whether this channel wants every success confirmed by an STK query."""
        ...

    async def analytics_metadata_keys(self, channel_id: str) -> frozenset[str]:
        """The metadata keys this channel lets the status topic carry (none by default)."""
        ...

    async def write(self, writes: Writes) -> list[OutboxRow]:
        """Writes the batch; returns its outbox rows with their ids, in order."""
        ...


# Opens a unit of work: committed when the block exits normally, rolled back when it raises.
UnitOfWorkFactory = Callable[[], AbstractAsyncContextManager[UnitOfWork]]
