"""The review desk: payments searched and shown as the onboarding database role, and an operator's
instruction sent to the ledger as an OperatorCommand event, whose verdict is then read back from the
audit trail.

The desk changes no payment itself: the ledger is the one writer (docs/review-desk.md). What the desk
refuses before publishing (an unknown payment, one not in Review, a receipt proving another payment)
is only the quick, clear answer; the ledger checks again under its lock and its verdict is the truth.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from confluent_kafka import KafkaException
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.common.avro import open_codec
from services.common.config import ConfigError
from services.common.kafka import EventProducer, PublishError, new_event_fields
from services.common.runtime import StartupRefused
from services.common.topics import OPERATOR_COMMAND
from services.operations.model import (
    DETAIL_COLUMNS,
    SUMMARY_COLUMNS,
    Cursor,
    DeskError,
    Instruction,
    NotFound,
    Refused,
    Search,
    Unavailable,
    audit_entry,
    callback_entry,
    history_entry,
    payment_detail,
    payment_summary,
    refusal,
    shown,
)

log = logging.getLogger(__name__)

VERDICT_WAIT_S = 10.0
VERDICT_POLL_S = 0.2
POOL_WAIT_S = 5.0  # for a connection: the database away is answered 503 after this
STATEMENT_TIMEOUT_MS = 5000  # a search the indexes cannot serve is cut, not left to load the database
AUDIT_ROWS_SHOWN = 500  # a payment flooded with hostile callbacks has a long trail; the newest are shown
CALLBACKS_SHOWN = 50  # raw bodies are up to 64 KiB each


class CommandSender(Protocol):
    async def send(self, record: dict[str, Any]) -> None:
        """Returns once Kafka acknowledged the OperatorCommand; raises DeskError otherwise."""


class KafkaCommands:
    """Publishes OperatorCommand events as the `onboarding-api` principal, keyed by channel id.

    The codec and producer are opened at the first instruction, not at start: the admin API's channel
    routes must keep working while Kafka or the schema registry is away, and an instruction then
    gets a 503 instead."""

    def __init__(self, bootstrap: str, registry_url: str, *, delivery_timeout_ms: int = 10_000,
                 registry_wait_s: float = 5.0):
        self._bootstrap, self._registry_url = bootstrap, registry_url
        self._delivery_timeout_ms, self._registry_wait_s = delivery_timeout_ms, registry_wait_s
        self._producer: EventProducer | None = None
        self._opening = asyncio.Lock()

    async def send(self, record: dict[str, Any]) -> None:
        producer = await self._open()
        try:
            await producer.publish(OPERATOR_COMMAND, record)
        except PublishError:
            raise Unavailable(f"Kafka did not acknowledge instruction {record['event_id']} in time: it may or may "
                              "not reach the ledger; show the payment before sending it again") from None

    async def _open(self) -> EventProducer:
        async with self._opening:
            if self._producer is None:
                try:
                    codec = await open_codec(self._registry_url, [OPERATOR_COMMAND], self._registry_wait_s)
                except StartupRefused as exc:
                    raise Unavailable(f"cannot send instructions now: {exc}") from None
                try:
                    self._producer = EventProducer(self._bootstrap, codec, client_id="onboarding-api",
                                                   delivery_timeout_ms=self._delivery_timeout_ms)
                except (KafkaException, ConfigError) as exc:  # e.g. a KAFKA_CLIENT_* setting librdkafka refuses
                    await codec.close()
                    log.error("cannot make the operator command producer: %s", exc)
                    raise Unavailable("cannot send instructions now: the Kafka client is misconfigured "
                                      "(see the API's log)") from None
            return self._producer

    async def close(self) -> None:
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close)
            await self._producer.codec.close()
            self._producer = None


@dataclass(frozen=True)
class Outcome:
    """What became of an instruction: "applied" (the payment as now), "rejected" (the ledger's
    reason), or "accepted" (published; the ledger had not decided it within the wait)."""

    status: str
    event_id: str
    detail: str = ""
    payment: dict[str, Any] | None = None

    def view(self) -> dict[str, Any]:
        view: dict[str, Any] = {"eventId": self.event_id, "status": self.status}
        if self.detail:
            view["detail"] = self.detail
        if self.payment is not None:
            view["payment"] = self.payment
        return view


class ReviewDesk:
    def __init__(self, pool: AsyncConnectionPool, commands: CommandSender | None, *,
                 verdict_wait_s: float = VERDICT_WAIT_S, poll_interval_s: float = VERDICT_POLL_S,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self._pool, self._commands = pool, commands
        self._verdict_wait_s, self._poll_interval_s, self._sleep = verdict_wait_s, poll_interval_s, sleep

    async def search(self, search: Search) -> dict[str, Any]:
        """A page of payments, newest first, and the cursor of the next page (None at the end)."""
        where, params = _conditions(search)
        sql = (f"SELECT {', '.join(SUMMARY_COLUMNS)} FROM payments"
               f"{' WHERE ' + ' AND '.join(where) if where else ''}"
               " ORDER BY requested_at DESC, payment_id DESC LIMIT %(limit)s")
        rows = await self._read(sql, {**params, "limit": search.limit + 1})
        page = rows[:search.limit]
        more = len(rows) > search.limit
        next_cursor = Cursor(page[-1]["requested_at"], page[-1]["payment_id"]).encode() if more else None
        return {"payments": [payment_summary(r) for r in page], "nextCursor": next_cursor}

    async def payment(self, payment_id: str) -> dict[str, Any]:
        """One payment with its history, audit entries and raw callbacks."""
        async with self._connection() as conn:
            row = await _one(conn, f"SELECT {', '.join(DETAIL_COLUMNS)} FROM payments WHERE payment_id = %s",
                             (payment_id,))
            if row is None:
                raise NotFound("no such payment")
            history = await _all(conn, "SELECT at, state, previous, reason, event_id FROM payment_history"
                                       " WHERE payment_id = %s ORDER BY id", (payment_id,))
            audit = await _all(conn, "SELECT seq, at, fact, verdict, from_state, to_state, detail, actor, event_id"
                                     " FROM audit_log WHERE payment_id = %s ORDER BY seq DESC LIMIT %s",
                               (payment_id, AUDIT_ROWS_SHOWN + 1))
            callbacks = await _all(conn, "SELECT event_id, received_at, verdict, body, count(*) OVER () AS total"
                                         " FROM callback_bodies WHERE payment_id = %s"
                                         " ORDER BY received_at DESC LIMIT %s", (payment_id, CALLBACKS_SHOWN))
        return {**payment_detail(row), "history": [history_entry(h) for h in history],
                "audit": [audit_entry(a) for a in reversed(audit[:AUDIT_ROWS_SHOWN])],
                "auditTruncated": len(audit) > AUDIT_ROWS_SHOWN,
                "callbacks": [callback_entry(c) for c in reversed(callbacks)],
                "callbacksTotal": callbacks[0]["total"] if callbacks else 0}

    async def instruct(self, payment_id: str, instruction: Instruction, actor: str) -> Outcome:
        """Refuses at once what would surely fail; otherwise publishes the OperatorCommand and waits
        (bounded) for the ledger's verdict."""
        async with self._connection() as conn:
            row = await _one(conn, "SELECT channel_id, state, checkout_request_id, candidate_checkout_request_id"
                                   " FROM payments WHERE payment_id = %s", (payment_id,))
            if row is None:
                raise NotFound("no such payment")
            owner = await _receipt_owner(conn, instruction.receipt, payment_id) if instruction.receipt else None
        why = refusal(instruction, row, owner)
        if why:
            raise Refused(why + "; nothing was sent to the ledger")
        if self._commands is None:
            raise Unavailable("this process has no Kafka producer: instructions cannot be sent")
        record = {**new_event_fields(row["channel_id"], payment_id), "action": instruction.action.value,
                  "actor": actor, "reason": instruction.reason, "mpesa_receipt": instruction.receipt}
        await self._commands.send(record)
        log.info("operator instruction %s (%s) sent for payment %s by %s", record["event_id"],
                 instruction.action.value, payment_id, instruction.operator)
        return await self._outcome(payment_id, record["event_id"])

    async def _outcome(self, payment_id: str, event_id: str) -> Outcome:
        deadline = asyncio.get_running_loop().time() + self._verdict_wait_s
        while True:
            verdict = await self.verdict(payment_id, event_id)
            if verdict is not None:
                break
            if asyncio.get_running_loop().time() >= deadline:
                return Outcome("accepted", event_id, "accepted, the ledger has not applied it yet")
            await self._sleep(self._poll_interval_s)
        detail = shown(verdict["detail"])  # it quotes the operator's reason, which may hold a number
        if verdict["verdict"] == "rejected":
            return Outcome("rejected", event_id, detail)
        return Outcome("applied", event_id, detail, await self.payment(payment_id))

    async def verdict(self, payment_id: str, event_id: str) -> dict[str, Any] | None:
        """The ledger's audit entry for an instruction (payment_id first: the audit trail's index)."""
        async with self._connection() as conn:
            return await _one(conn, "SELECT verdict, detail, to_state FROM audit_log"
                                    " WHERE payment_id = %s AND event_id = %s ORDER BY seq LIMIT 1",
                              (payment_id, event_id))

    async def _read(self, sql: str, params: Any) -> list[dict[str, Any]]:
        async with self._connection() as conn:
            return await _all(conn, sql, params)

    def _connection(self):
        return _reading(self._pool)


@asynccontextmanager
async def _reading(pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncConnection]:
    """A pooled connection in a read-only transaction whose statements are cut at STATEMENT_TIMEOUT_MS;
    the database being away or slow is a 503, never a 500."""
    try:
        async with pool.connection(timeout=POOL_WAIT_S) as conn, conn.transaction():
            await conn.execute("SET TRANSACTION READ ONLY")
            await conn.execute(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
            yield conn
    except psycopg.errors.QueryCanceled:
        raise Unavailable("the search took too long; narrow it (a channel, a time range)") from None
    except (psycopg.Error, OSError):  # psycopg_pool's PoolTimeout is a psycopg.OperationalError
        raise Unavailable("the database is not answering; try again shortly") from None


async def _one(conn: psycopg.AsyncConnection, sql: str, params: Any) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return await cur.fetchone()


async def _all(conn: psycopg.AsyncConnection, sql: str, params: Any) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return await cur.fetchall()


async def _receipt_owner(conn: psycopg.AsyncConnection, receipt: str, payment_id: str) -> str | None:
    """The other payment a receipt already proves, whichever column holds it (one receipt, one payment)."""
    row = await _one(conn, "SELECT payment_id FROM payments WHERE (mpesa_receipt = %(r)s OR candidate_receipt = %(r)s"
                           " OR late_receipt = %(r)s) AND payment_id <> %(p)s LIMIT 1", {"r": receipt, "p": payment_id})
    return None if row is None else row["payment_id"]


def _conditions(search: Search) -> tuple[list[str], dict[str, Any]]:
    """The WHERE terms of a search and their parameters; values only ever travel as parameters."""
    where: list[str] = []
    params: dict[str, Any] = {}

    def term(sql: str, **values: Any) -> None:
        where.append(sql)
        params.update(values)

    if search.channel_id is not None:
        term("channel_id = %(channel)s", channel=search.channel_id)
    if search.state is not None:
        term("state = %(state)s", state=search.state.value)
    if search.requested_from is not None:
        term("requested_at >= %(from)s", **{"from": search.requested_from})
    if search.requested_to is not None:
        term("requested_at < %(to)s", to=search.requested_to)
    if search.order_reference is not None:
        term("order_reference = %(order)s", order=search.order_reference)
    if search.receipt is not None:
        term("(mpesa_receipt = %(receipt)s OR late_receipt = %(receipt)s OR candidate_receipt = %(receipt)s)",
             receipt=search.receipt)
    if search.checkout_request_id is not None:
        term("(checkout_request_id = %(checkout)s OR candidate_checkout_request_id = %(checkout)s)",
             checkout=search.checkout_request_id)
    if search.phone is not None:
        term("phone = %(phone)s", phone=search.phone)
    if search.cursor is not None:
        term("(requested_at, payment_id) < (%(after_at)s, %(after_id)s)",
             after_at=search.cursor.requested_at, after_id=search.cursor.payment_id)
    return where, params


__all__ = ["DeskError", "KafkaCommands", "Outcome", "ReviewDesk"]
