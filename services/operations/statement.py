"""Merchant statements: every payment of one channel requested in a period, with totals by state
and the success rate, as CSV or JSON, for support and for the merchant's reconciliation against its
M-Pesa statement (docs/statements.md).

A statement is read in one snapshot (REPEATABLE READ, READ ONLY) as the onboarding role: the totals,
counted first, and the rows, streamed after them through a server-side cursor in slices, are the
same payments, and a period of any size is written in bounded memory. It carries no phone number
and no metadata: it goes to a merchant and its accountants.

Served by the admin API (`GET /admin/channels/{channelId}/statement`, mounted by
services/channels/api.py) and by `mpesa-pipeline reports statement` (services/cli.py).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from services.channels.onboarding import NotFound, OnboardingError
from services.common import config
from services.common.payment import NAIROBI, OPEN_STATES, PaymentState, validate_channel_id
from services.common.problems import problem
from services.common.text import untrusted

log = logging.getLogger(__name__)

FORMATS: Final = ("json", "csv")
PERIOD_DAYS_MAX: Final = 366  # a year, leap day included: the longest period one statement covers
SLICE_ROWS: Final = 1_000  # rows per FETCH from the server-side cursor, and per chunk written
# The statement's columns, in order: the CSV header and the keys of each JSON payment.
COLUMNS: Final = ("paymentId", "orderReference", "state", "amount", "mpesaReceipt", "lateMpesaReceipt",
                  "requestedAt", "finalAt", "resultCode")
DECIDED_STATES: Final = (PaymentState.SETTLED, PaymentState.CANCELLED, PaymentState.FAILED)

# RFC 3339 §5.6 date-time, with at most microseconds (what PostgreSQL keeps). datetime.fromisoformat
# alone also takes a date without a time, no offset, or the basic form (20261101T000000Z).
_RFC3339: Final = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII)
_MOMENT_TEXT_MAX: Final = 40
# A spreadsheet runs a cell that starts with one of these as a formula (docs/statements.md,
# "Formula injection"); order references are the merchant's customers' text, forwarded by its shop.
_FORMULA_TRIGGERS: Final = ("=", "+", "-", "@", "\t", "\r", "\n")


class StatementError(OnboardingError):
    """A statement refused before anything was written; becomes a 4xx problem or one CLI line."""


class BadPeriod(StatementError):
    status, title = 400, "Bad period"


class BadQuery(StatementError):
    status, title = 400, "Bad query"


class StatementInconsistent(Exception):
    """The rows streamed do not add up to the totals counted in the same snapshot: a bug, never an
    expected outcome. The statement is cut off rather than finished with totals that lie."""


# The period and the query (pure)

@dataclass(frozen=True)
class Period:
    """[start, end) on requested_at."""
    start: datetime
    end: datetime


def parse_moment(name: str, value: Any) -> datetime:
    message = (f"{name} must be an RFC 3339 date and time with its offset, e.g. 2026-11-01T00:00:00+03:00 "
               "(in a URL, + is written %2B)")
    if not isinstance(value, str) or len(value) > _MOMENT_TEXT_MAX or not _RFC3339.fullmatch(value):
        raise BadPeriod(message)
    try:
        # Converted now: year 1 at +01:00 is before datetime's range and would fail later.
        return datetime.fromisoformat(value.upper().replace("Z", "+00:00")).astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise BadPeriod(message) from None  # a 31 February, a 25th hour


def parse_period(start: Any, end: Any) -> Period:
    period = Period(parse_moment("from", start), parse_moment("to", end))
    if period.start >= period.end:
        raise BadPeriod("from must be before to (the period is [from, to))")
    if period.end - period.start > timedelta(days=PERIOD_DAYS_MAX):
        raise BadPeriod(f"the period is at most {PERIOD_DAYS_MAX} days; ask for several statements")
    return period


def parse_query(query: Any) -> tuple[Period, str]:
    """The API's query string (request.query, a MultiDictProxy): a name given twice is refused, not guessed."""
    unknown = sorted(n for n in set(query.keys()) if n not in ("from", "to", "format"))
    if unknown:
        raise BadQuery(f"unknown query parameter(s) {', '.join(repr(n[:40]) for n in unknown[:5])}; "
                       "give from, to and format")
    repeated = sorted(n for n in set(query.keys()) if len(query.getall(n)) > 1)
    if repeated:
        raise BadQuery(f"give {', '.join(repeated)} once")
    if "from" not in query or "to" not in query:
        raise BadPeriod("give the period as from=<RFC 3339> and to=<RFC 3339>")
    fmt = query.get("format", "json")
    if fmt not in FORMATS:
        raise BadQuery(f"format must be one of {', '.join(FORMATS)}")
    return parse_period(query["from"], query["to"]), fmt


# What a statement says (pure)

@dataclass(frozen=True)
class StateTotal:
    count: int = 0
    amount: int = 0


@dataclass
class Totals:
    """Count and amount per state; every state is present, zero when the period has none."""
    by_state: dict[str, StateTotal] = field(default_factory=lambda: {s.value: StateTotal() for s in PaymentState})

    def add(self, state: str, count: int, amount: int) -> None:
        before = self.by_state.get(state, StateTotal())  # a state unknown to this code still counts
        self.by_state[state] = StateTotal(before.count + count, before.amount + amount)

    @property
    def count(self) -> int:
        return sum(t.count for t in self.by_state.values())

    def count_of(self, states: Iterable[str]) -> int:
        return sum(self.by_state.get(s, StateTotal()).count for s in states)

    def success_rate(self) -> float | None:
        """Settled out of the decided payments (Settled, Cancelled, Failed), by count; None when the
        period has none decided. Open and Review payments have no outcome yet, so they count on
        neither side (docs/statements.md, "Success rate")."""
        decided = self.count_of(DECIDED_STATES)
        return round(self.count_of([PaymentState.SETTLED]) / decided, 4) if decided else None

    def view(self) -> dict[str, dict[str, int]]:
        return {state: {"count": t.count, "amount": t.amount} for state, t in self.by_state.items()}


# payment_id, order_reference, state, amount, mpesa_receipt, late_receipt, requested_at, final_at, result_code
Row = tuple[str, str | None, str, int, str | None, str | None, datetime, datetime | None, str | None]


def moment_text(moment: datetime | None) -> str | None:
    """RFC 3339 in Kenyan time (+03:00), the time an M-Pesa statement shows."""
    return moment.astimezone(NAIROBI).isoformat() if moment is not None else None


def payment_view(row: Row) -> dict[str, Any]:
    values = list(row)
    values[6], values[7] = moment_text(row[6]), moment_text(row[7])
    return dict(zip(COLUMNS, values, strict=True))


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula, prefixed with ' (shown as text, not run)."""
    if isinstance(value, str) and value.startswith(_FORMULA_TRIGGERS):
        return "'" + value
    return value


def csv_cells(row: Row) -> list[Any]:
    return [spreadsheet_safe(v) for v in payment_view(row).values()]


# Reading one statement (I/O)

Connect = Callable[[], AbstractAsyncContextManager[Any]]  # an AsyncConnection, in a transaction of its own

_CHANNEL_EXISTS = "SELECT now(), EXISTS (SELECT FROM channels WHERE channel_id = %s)"
_PERIOD = "channel_id = %s AND requested_at >= %s AND requested_at < %s"
_TOTALS = f"SELECT state, count(*), coalesce(sum(amount), 0)::bigint FROM payments WHERE {_PERIOD} GROUP BY state"
_ROWS = (f"SELECT payment_id, order_reference, state, amount, mpesa_receipt, late_receipt, requested_at, final_at,"
         f" result_code FROM payments WHERE {_PERIOD} ORDER BY requested_at, payment_id")


@dataclass
class StatementReader:
    """An open statement: its totals, counted when it opened, and its rows, in slices."""
    channel_id: str
    period: Period
    generated_at: datetime
    totals: Totals
    _conn: Any
    _slice_rows: int

    async def slices(self) -> AsyncIterator[list[Row]]:
        """The rows in requested_at order; raises StatementInconsistent at the end unless they add up
        to `totals` (they do, read in the same snapshot: this checks that they were)."""
        seen = Totals()
        async with self._conn.cursor(name="statement") as cursor:  # named: a server-side cursor
            await cursor.execute(_ROWS, (self.channel_id, self.period.start, self.period.end))
            while rows := await cursor.fetchmany(self._slice_rows):
                for row in rows:
                    seen.add(row[2], 1, row[3])
                yield rows
        if seen.by_state != self.totals.by_state:
            raise StatementInconsistent(f"statement of {self.channel_id}: the rows add up to {seen.view()}, "
                                        f"the snapshot's totals to {self.totals.view()}")


class Statements:
    """Opens statements on connections from `connect` (the onboarding role's pool's `connection`)."""

    def __init__(self, connect: Connect, *, slice_rows: int = SLICE_ROWS):
        self._connect = connect
        self._slice_rows = slice_rows

    @asynccontextmanager
    async def open(self, channel_id: str, period: Period) -> AsyncIterator[StatementReader]:
        """Raises NotFound for a channel that does not exist, before anything is written."""
        if validate_channel_id(channel_id):  # a NUL byte would make PostgreSQL fail the lookup
            raise NotFound(f"no channel {channel_id!r}")
        async with self._connect() as conn, conn.transaction():
            # Before any query: the snapshot is taken at the first one, and every later one sees it.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            generated_at, exists = await (await conn.execute(_CHANNEL_EXISTS, (channel_id,))).fetchone()
            if not exists:
                raise NotFound(f"no channel {channel_id!r}")
            totals = Totals()
            cursor = await conn.execute(_TOTALS, (channel_id, period.start, period.end))
            for state, count, amount in await cursor.fetchall():
                totals.add(state, count, amount)
            yield StatementReader(channel_id, period, generated_at, totals, conn, self._slice_rows)


# Rendering (the rows streamed; the rest from the reader)

Progress = Callable[[int, int], None]  # (rows written, rows in the statement)


async def render(reader: StatementReader, fmt: str, progress: Progress | None = None) -> AsyncIterator[str]:
    """The statement as text, a chunk per slice of rows."""
    rendered = _csv_slices(reader) if fmt == "csv" else _json_slices(reader)
    done, total = 0, reader.totals.count
    async for chunk, rows in rendered:
        yield chunk
        done += rows
        if progress is not None and rows:
            progress(done, total)


async def _csv_slices(reader: StatementReader) -> AsyncIterator[tuple[str, int]]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180: CRLF, fields quoted when needed
    writer.writerow(COLUMNS)
    yield _taken(buffer), 0
    async for rows in reader.slices():
        writer.writerows(csv_cells(row) for row in rows)
        yield _taken(buffer), len(rows)


def _taken(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


async def _json_slices(reader: StatementReader) -> AsyncIterator[tuple[str, int]]:
    head = {"channelId": reader.channel_id, "from": moment_text(reader.period.start),
            "to": moment_text(reader.period.end), "generatedAt": moment_text(reader.generated_at)}
    yield json.dumps(head, ensure_ascii=False)[:-1] + ', "payments": [', 0
    separator = "\n"
    async for rows in reader.slices():
        yield separator + ",\n".join(json.dumps(payment_view(r), ensure_ascii=False) for r in rows), len(rows)
        separator = ",\n"
    tail = {"totals": reader.totals.view(), "successRate": reader.totals.success_rate()}
    yield "\n], " + json.dumps(tail)[1:] + "\n", 0


# The admin API route (mounted by services/channels/api.py create_app)

STATEMENTS = web.AppKey("statements", Statements)
EXPORTS = web.AppKey("statement_exports", asyncio.Semaphore)
EXPORTS_AT_ONCE: Final = 2  # each holds a pooled connection for its whole export: the rest of the API keeps some
WRITE_TIMEOUT_S: Final = 60.0  # a client that stops reading releases its connection and snapshot after this


def add_statement_route(app: web.Application, statements: Statements) -> None:
    app[STATEMENTS] = statements
    app[EXPORTS] = asyncio.Semaphore(EXPORTS_AT_ONCE)
    app.router.add_get("/admin/channels/{channelId}/statement", show_statement)


async def show_statement(request: web.Request) -> web.StreamResponse:
    period, fmt = parse_query(request.query)
    exports = request.app[EXPORTS]
    if exports.locked():
        return problem(429, "Too many exports", f"at most {EXPORTS_AT_ONCE} statements are exported at once; "
                                                "retry shortly", headers={"Retry-After": "5"})
    async with exports, request.app[STATEMENTS].open(request.match_info["channelId"], period) as reader:
        response = web.StreamResponse(headers=_headers(reader, fmt))
        await response.prepare(request)
        try:
            async for chunk in render(reader, fmt):
                await asyncio.wait_for(response.write(chunk.encode()), WRITE_TIMEOUT_S)
        except Exception as error:
            # The status was sent: no error answer can follow. The connection is cut, so the client
            # sees a body that never ended (no last chunk), not a statement that looks complete.
            log.warning("statement of %s cut off after it started: %s", reader.channel_id,
                        untrusted(f"{type(error).__name__}: {error}"),
                        exc_info=isinstance(error, StatementInconsistent))
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response


def _headers(reader: StatementReader, fmt: str) -> dict[str, str]:
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if fmt == "json":
        return {**headers, "Content-Type": "application/json; charset=utf-8"}
    return {**headers, "Content-Type": "text/csv; charset=utf-8; header=present",
            "Content-Disposition": f'attachment; filename="{file_name(reader.channel_id, reader.period, fmt)}"'}


def file_name(channel_id: str, period: Period, fmt: str) -> str:
    """statement-<channel>-<from>-<to>.<fmt>, times in UTC; a channel id is [a-z0-9_-] only."""
    return f"statement-{channel_id}-{period.start:%Y%m%dT%H%M%SZ}-{period.end:%Y%m%dT%H%M%SZ}.{fmt}"


# `mpesa-pipeline reports statement`

REPORTS_SETTINGS = [config.database_url("onboarding")]  # read as the onboarding role, as the admin API does
PROGRESS_EVERY: Final = 10_000  # rows between progress lines on stderr


@dataclass(frozen=True)
class ReportsSettings:
    database_url: str


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `reports` to `mpesa-pipeline` (services/cli.py)."""
    reports = subparsers.add_parser("reports", help="merchant reports: a channel's statement for a period")
    sub = reports.add_subparsers(dest="reports_command", required=True)
    statement = sub.add_parser(
        "statement", help="every payment of a channel requested in [from, to), with totals and success rate",
        description="A channel's payments requested in [FROM, TO): payment id, order reference, state, amount, "
                    "M-Pesa receipt (and one proven after a cancel), times, result code; no phone number. JSON "
                    "adds totals by state and the success rate (Settled out of Settled, Cancelled and Failed). "
                    f"At most {PERIOD_DAYS_MAX} days. Progress goes to stderr.")
    statement.add_argument("--channel", required=True, help="the channel id")
    statement.add_argument("--from", dest="start", metavar="FROM", required=True,
                           help="RFC 3339 date-time with offset, included, e.g. 2026-11-01T00:00:00+03:00")
    statement.add_argument("--to", dest="end", metavar="TO", required=True,
                           help="RFC 3339 date-time with offset, excluded")
    statement.add_argument("--format", required=True, choices=FORMATS, help="csv or json")
    statement.add_argument("--output", type=Path, metavar="FILE",
                           help="write to this file (complete or not at all); default stdout")
    statement.set_defaults(func=cmd_statement)


def cmd_statement(args: argparse.Namespace) -> int:
    cfg = config.load_into(ReportsSettings, REPORTS_SETTINGS)
    try:
        period = parse_period(args.start, args.end)
        return asyncio.run(_export(cfg.database_url, args.channel, period, args.format, args.output))
    except OnboardingError as error:  # a bad period, no such channel
        return _fail(error.detail)
    except (StatementInconsistent, OSError) as error:
        return _fail(str(error))


def _fail(message: str) -> int:
    print(f"mpesa-pipeline reports statement: {untrusted(message, 500)}", file=sys.stderr)
    return 1


async def _export(database_url: str, channel_id: str, period: Period, fmt: str, output: Path | None) -> int:
    import psycopg

    @asynccontextmanager
    async def connect() -> AsyncIterator[Any]:
        async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=10) as conn:
            yield conn

    try:
        async with Statements(connect).open(channel_id, period) as reader:
            if output is None:
                await _write(reader, fmt, sys.stdout)
            else:
                await _write_file(reader, fmt, output)
            totals = reader.totals
    except psycopg.Error as error:
        return _fail(f"PostgreSQL: {(str(error).strip() or type(error).__name__).splitlines()[0]}")
    print(summary(totals), file=sys.stderr)
    return 0


async def _write_file(reader: StatementReader, fmt: str, output: Path) -> None:
    """Written beside `output`, then renamed: a statement cut off never sits under the name asked for."""
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as out:
            await _write(reader, fmt, out)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


async def _write(reader: StatementReader, fmt: str, out: Any) -> None:
    every = _ProgressLines(sys.stderr)
    async for chunk in render(reader, fmt, every if reader.totals.count > PROGRESS_EVERY else None):
        out.write(chunk)
    out.flush()


class _ProgressLines:
    """Prints "12,000/48,210 payments" each time another PROGRESS_EVERY rows are written, and at the end."""

    def __init__(self, stream: Any):
        self._stream, self._next = stream, PROGRESS_EVERY

    def __call__(self, done: int, total: int) -> None:
        if done >= self._next or done == total:
            print(f"{done:,}/{total:,} payments", file=self._stream, flush=True)
            self._next = (done // PROGRESS_EVERY + 1) * PROGRESS_EVERY


def summary(totals: Totals) -> str:
    """One line: the count, each state present with its amount, and the success rate."""
    states = ", ".join(f"{state} {t.count:,} (KES {t.amount:,})" for state, t in totals.by_state.items() if t.count)
    rate = totals.success_rate()
    undecided = (f"; {totals.count_of(OPEN_STATES):,} open and {totals.count_of([PaymentState.REVIEW]):,} "
                 "in Review not counted")
    shown = f"{rate:.2%} of {totals.count_of(DECIDED_STATES):,} decided" if rate is not None else "none decided"
    return f"{totals.count:,} payments" + (f": {states}" if states else "") + f"; success rate {shown}{undecided}"
