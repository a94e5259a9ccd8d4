"""A payer's erasure and subject access on the real database, through the ledger's own code and roles:
payments made by the ledger (raw callbacks, a parked fact, a payment in Review), the `payers erase`
command as an operator runs it (a subprocess as the privacy role), the admin API as the onboarding API
mounts it. After erasure no column of any table holds the payer's number in any form, the status
events and log lines written afterwards do not either, the audit trail verifies, and another payer's
rows are byte for byte what they were."""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import uuid

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.channels.api import create_app
from services.channels.onboarding import Onboarding
from services.channels.settings import AdminToken
from services.common.kafka import new_event_fields
from services.common.pseudonyms import Pseudonyms
from services.common.topics import OPERATOR_COMMAND
from services.ledger.service import Ledger
from services.ledger.store import verify_audit
from services.privacy.payers import KAFKA_STATEMENT, RAW_PII_TOPICS, Payers, number_forms
from tests.conftest import PSEUDONYM_KEY_FILE, ROOT, database_url_of, service_env
from tests.ledger.callbacks import success
from tests.ledger.fakes import FakeClock
from tests.ledger.test_ledger_db import callback, event
from tests.operations.conftest import ADMIN, ADMIN_TOKEN, daraja_checkout_id, make_payment, new_phone
from tests.pii_scan import places_holding

PAYER_ROWS = {"payments": "payment_id", "payment_history": "payment_id", "audit_log": "payment_id",
              "callback_bodies": "payment_id", "parked_facts": "payment_id"}


@pytest.fixture
def ledger(ledger_pool, codec) -> Ledger:
    return Ledger(ledger_pool, codec, clock=FakeClock())


@pytest.fixture
async def client(onboarding_pool, privacy_pool, tmp_path):
    onboarding = Onboarding(onboarding_pool, public_key_file=tmp_path / "absent.pub.json")
    payers = Payers(privacy_pool, Pseudonyms.from_file(PSEUDONYM_KEY_FILE))
    app = create_app(onboarding, AdminToken(hashlib.sha256(ADMIN_TOKEN.encode()).digest()), payers=payers)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def erase_command(infra, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    environ = service_env(infra, DATABASE_URL=database_url_of(infra, "privacy"),
                          PSEUDONYM_KEY_FILE=str(PSEUDONYM_KEY_FILE))
    return subprocess.run([sys.executable, "-m", "services.cli", "payers", *args], cwd=ROOT, env=environ,
                          input=stdin, capture_output=True, text=True, timeout=120)


async def rows_of(pool, payment_ids: list[str]) -> dict[str, list[tuple]]:
    """Every row about these payments, in every table that has them, as stored."""
    rows = {}
    async with pool.connection() as conn:
        for table, column in PAYER_ROWS.items():
            cur = await conn.execute(f"SELECT * FROM {table} WHERE {column} = ANY(%s) ORDER BY 1", (payment_ids,))
            rows[table] = await cur.fetchall()
    return rows


async def park_callback(ledger: Ledger, channel: str, phone: str) -> str:
    """A success callback carrying the payer's number for a payment the ledger has not seen yet: parked."""
    payment_id = str(uuid.uuid4())
    await ledger.handle_batch([callback(channel, payment_id, success(
        daraja_checkout_id(phone), receipt="P" + uuid.uuid4().hex[:9].upper(), phone=int(phone)))])
    return payment_id


async def webhook_sent(pool, channel: str, payment_id: str, phone: str) -> None:
    """A webhook delivered to the merchant about the payment, as the notifier writes it, whose body
    carries a CheckoutRequestID in Daraja's current form: ending in the payer's number."""
    endpoint_id = "ep_" + uuid.uuid4().hex[:20]
    body = json.dumps({"type": "payment.review", "data": {"paymentId": payment_id, "phone": "254******" + phone[-3:],
                                                           "checkoutRequestId": f"ws_CO_191220191020363925_{phone}"}})
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO channels (channel_id, display_name, shortcode_type, business_shortcode,"
                           " environment) VALUES (%s, 'Duka', 'paybill', '174379', 'sandbox')", (channel,))
        await conn.execute("INSERT INTO webhook_endpoints (endpoint_id, channel_id, url, event_types, created_by)"
                           " VALUES (%s, %s, 'https://merchant.example/hook', %s, 'tests')",
                           (endpoint_id, channel, ["payment.review"]))
        await conn.execute("INSERT INTO webhook_deliveries (webhook_id, event_id, endpoint_id, channel_id, payment_id,"
                           " event_type, occurred_at, body, state, finished_at) VALUES (%s, %s, %s, %s, %s,"
                           " 'payment.review', now(), %s, 'delivered', now())",
                           (uuid.uuid4().hex, uuid.uuid4().hex, endpoint_id, channel, payment_id, body))


async def request_recorded(pool, channel: str, payment_id: str, order_reference: str) -> None:
    """The ingress's idempotency record of the payment, as the ingress writes it."""
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO ingress_requests (channel_id, idempotency_key, body_sha256, payment_id,"
                           " event_id, occurred_at, api_key_id, amount, account_reference, order_reference,"
                           " published_at)"
                           " VALUES (%s, %s, %s, %s, %s, now(), 'k1', 100, 'INV1', %s, now())",
                           (channel, uuid.uuid4().hex, bytes(32), payment_id, uuid.uuid4(), order_reference))


def contains_any(text: str, forms: list[str]) -> list[str]:
    return [form for form in forms if form in text]


async def test_erasure_leaves_no_trace_of_the_payer_keeps_the_money_records_and_the_other_payer_untouched(
        infra, client, ledger, pool, ledger_pool, unique, caplog):
    payer_a, payer_b = new_phone(), new_phone()
    forms = number_forms(payer_a)
    channel, other_channel = f"ch-{unique}", f"ch2-{unique}"
    in_review = await make_payment(ledger, channel, phone=payer_a, order_reference=f"call 0{payer_a[3:]}")
    cancelled = await make_payment(ledger, other_channel, phone=payer_a, review=False)
    parked_for = await park_callback(ledger, channel, payer_a)
    of_b = await make_payment(ledger, channel, phone=payer_b)
    ids_a = [in_review.payment_id, cancelled.payment_id]
    await webhook_sent(pool, channel, in_review.payment_id, payer_a)
    await request_recorded(pool, channel, in_review.payment_id, f"call 0{payer_a[3:]}")
    # A payment in Review keeps its payer's data (money may still move): the operator resolves it first.
    command = {**new_event_fields(channel, in_review.payment_id), "action": "SETTLE", "actor": "wanjiku via cli",
               "reason": "statement shows it", "mpesa_receipt": in_review.receipt}
    await ledger.handle_batch([event(OPERATOR_COMMAND, "operator_command", command)])
    async with pool.connection() as conn:
        assert await places_holding(conn, forms), "the scan finds the number before erasure"
    before_a, before_b = await rows_of(pool, ids_a), await rows_of(pool, [of_b.payment_id])
    assert before_a["callback_bodies"] and before_b["callback_bodies"]

    # Subject access first: everything held, every channel.
    exported = await client.post("/admin/payers/export", headers=ADMIN, json={
        "phone": "+" + payer_a, "operator": "wanjiku", "reason": "the payer asked by e-mail"})
    assert exported.status == 200, await exported.text()
    assert exported.headers["Cache-Control"] == "no-store"
    export = await exported.json()
    assert {p["paymentId"] for p in export["payments"]} == set(ids_a)
    assert {p["phone"] for p in export["payments"]} == {payer_a}
    assert {c["paymentId"] for c in export["callbacks"]} == set(ids_a)
    assert len(export["callbacks"]) == len(before_a["callback_bodies"])
    assert [f["paymentId"] for f in export["parkedFacts"]] == [parked_for]
    assert [w["paymentId"] for w in export["webhookDeliveries"]] == [in_review.payment_id]
    assert [k["topic"] for k in export["kafka"]] == [topic for topic, _ in RAW_PII_TOPICS]
    assert of_b.payment_id not in json.dumps(export)

    # Status events written before the erasure went out to the status topic (minimised there: the
    # topic carries at most the number's last three digits); the relay deletes them once published.
    async with ledger_pool.connection() as conn:
        await conn.execute("DELETE FROM outbox WHERE key = ANY(%s)", ([channel.encode(), other_channel.encode()],))

    # Erased by the command, the number typed in its local form on stdin.
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    done = erase_command(infra, "erase", "--phone", "-", "--reason", "erasure request 42", "--operator",
                         "wanjiku", "--yes", stdin="0" + payer_a[3:] + "\n")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["erased"]["payments"] == 2
    assert answer["erased"]["callbacks"] == len(before_a["callback_bodies"])
    assert answer["erased"]["parkedFacts"] == 1 and answer["erased"]["webhookBodies"] == 1
    assert answer["kafkaStatement"] == KAFKA_STATEMENT
    assert all(k["mayHoldUntil"] for k in answer["kafka"])
    assert not contains_any(done.stdout + done.stderr, forms)

    async with pool.connection() as conn:
        assert await places_holding(conn, forms) == []
        # The money records stay: state, amount, receipts, times, history and audit trail.
        after_a = await rows_of(pool, ids_a)
        assert after_a["payment_history"] == before_a["payment_history"]
        assert after_a["audit_log"] == before_a["audit_log"]
        assert after_a["callback_bodies"] == [] and after_a["parked_facts"] == []
        money = ("state", "amount", "mpesa_receipt", "checkout_request_id", "requested_at", "updated_at",
                 "result_code", "late_receipt")
        for payment_id in ids_a:
            row = await (await conn.execute(f"SELECT {', '.join(money)}, phone, payer_data FROM payments"
                                            " WHERE payment_id = %s", (payment_id,))).fetchone()
            kept = dict(zip(money, row[:len(money)], strict=True))
            [was] = [r for r in before_a["payments"] if r[0] == payment_id]
            assert row[-1] == "erased" and row[-2].startswith("ph_")
            assert kept["amount"] == was[3] and kept["state"] == was[2]
        # The record of the request names the payer by pseudonym only.
        recorded = await (await conn.execute("SELECT kind, payer_pseudonym, actor, reason, payments FROM"
                                             " payer_requests WHERE id = %s", (answer["requestId"],))).fetchone()
        assert recorded == ("erase", Pseudonyms.from_file(PSEUDONYM_KEY_FILE).phone(payer_a), "wanjiku via cli",
                            "erasure request 42", 2)

    # The ledger goes on with the erased payment: Daraja's callback for it, delivered again, is decided
    # against the pseudonymised push and writes no number anywhere (audit, history, outbox).
    await ledger.handle_batch([callback(channel, in_review.payment_id, success(
        in_review.checkout_request_id, receipt=in_review.receipt, phone=int(payer_a)))])
    async with pool.connection() as conn:
        state = await (await conn.execute("SELECT state FROM payments WHERE payment_id = %s",
                                          (in_review.payment_id,))).fetchone()
        assert state == ("Settled",)
        assert await places_holding(conn, forms) == []  # outbox included
        count, problem = await verify_audit(conn)
        assert problem is None and count > 0
    assert not [r for r in caplog.records if contains_any(r.getMessage(), forms)]

    # The other payer: byte for byte what it was.
    assert await rows_of(pool, [of_b.payment_id]) == before_b

    # The export after erasure finds nothing and says nothing of the number; erasing again is a no-op.
    after = await client.post("/admin/payers/export", headers=ADMIN, json={"phone": payer_a, "operator": "wanjiku"})
    assert after.status == 200
    text = await after.text()
    assert not contains_any(text, forms) and json.loads(text)["payments"] == []
    again = await client.post("/admin/payers/erase", headers=ADMIN, json={
        "phone": payer_a, "operator": "wanjiku", "reason": "asked twice"})
    assert again.status == 200
    second = await again.json()
    assert second["erased"]["payments"] == 0 and second["message"].startswith("nothing to erase")
    assert await rows_of(pool, [of_b.payment_id]) == before_b
    assert not [r for r in caplog.records if contains_any(r.getMessage(), forms)]  # the API's lines too


async def test_an_open_payment_keeps_the_number_until_final_and_the_answer_says_so(client, ledger, pool, unique):
    from tests.ledger.test_ledger_db import accepted, requested
    payer = new_phone()
    payment_id = str(uuid.uuid4())
    await ledger.handle_batch([requested(f"ch-{unique}", payment_id, phone=payer),
                               accepted(f"ch-{unique}", payment_id, f"ws_CO_{uuid.uuid4().hex[:16]}")])
    erased = await client.post("/admin/payers/erase", headers=ADMIN, json={
        "phone": payer, "operator": "o", "reason": "asked"})
    answer = await erased.json()
    assert (answer["erased"]["payments"], answer["stillOpen"]) == (0, 1)
    assert "still open" in answer["message"]
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT phone FROM payments WHERE payment_id = %s", (payment_id,))).fetchone()
    assert row == (payer,)


HOSTILE = [
    ({"phone": "0812345678", "operator": "o", "reason": "r"}, "phone"),  # not a mobile number
    ({"phone": "07123456789", "operator": "o", "reason": "r"}, "phone"),  # one digit too many
    ({"phone": "0712345678\n", "operator": "o", "reason": "r"}, "phone"),
    ({"phone": "0712\x00345678", "operator": "o", "reason": "r"}, "phone"),
    ({"phone": 712345678, "operator": "o", "reason": "r"}, "phone"),
    ({"phone": "9" * 5000, "operator": "o", "reason": "r"}, "phone"),
    ({"phone": "0712345678", "operator": "o"}, "reason"),  # erasure says why
    ({"phone": "0712345678", "operator": "o", "reason": "x" * 501}, "reason"),
    ({"phone": "0712345678", "operator": "o", "reason": "r", "channel": "../etc"}, "channel"),
    ({"phone": "0712345678", "operator": "o", "reason": "r", "also": 1}, "also"),
    ({"phone": "0712345678", "reason": "r"}, "operator"),
    ([], "body"),
]


async def test_hostile_requests_get_a_clear_400_and_change_nothing(client, ledger, pool, unique):
    made = await make_payment(ledger, f"ch-{unique}", phone="254712345678")
    before = await rows_of(pool, [made.payment_id])
    async with pool.connection() as conn:
        requests_before = (await (await conn.execute("SELECT count(*) FROM payer_requests")).fetchone())[0]
    for body, field in HOSTILE:
        answer = await client.post("/admin/payers/erase", headers=ADMIN, json=body)
        assert answer.status == 400, (body, await answer.text())
        problem = await answer.json()
        assert field in {error["field"] for error in problem["errors"]}, problem
        assert "712345678" not in json.dumps(problem)  # never quoted back
    huge = await client.post(
        "/admin/payers/erase", headers={**ADMIN, "Content-Type": "application/json"},
        data=b'{"phone": "' + b"7" * 100_000 + b'"}')
    assert huge.status == 413
    not_json = await client.post("/admin/payers/export", headers={**ADMIN, "Content-Type": "application/json"},
                                 data=b'{"phone": "0712345678"')
    assert not_json.status == 400 and "0712345678" not in await not_json.text()
    no_token = await client.post("/admin/payers/erase", json={"phone": "0712345678", "operator": "o", "reason": "r"})
    assert no_token.status == 401
    assert await rows_of(pool, [made.payment_id]) == before
    async with pool.connection() as conn:
        assert (await (await conn.execute("SELECT count(*) FROM payer_requests")).fetchone())[0] == requests_before


async def test_the_record_of_requests_is_append_only_for_the_privacy_role(privacy_pool):
    import psycopg
    async with privacy_pool.connection() as conn:
        for statement in ("UPDATE payer_requests SET reason = 'x'", "DELETE FROM payer_requests",
                          "TRUNCATE payer_requests"):
            with pytest.raises(psycopg.Error):
                async with conn.transaction():
                    await conn.execute(statement)


def test_the_command_refuses_a_bad_number_in_one_line_without_quoting_it(infra):
    done = erase_command(infra, "erase", "--phone", "0712 345 6789", "--reason", "r", "--yes")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("mpesa-pipeline payers: ") and "345" not in lines[0]


def test_erasure_without_yes_asks_and_a_wrong_answer_erases_nothing(infra):
    done = erase_command(infra, "erase", "--phone", "0712345678", "--reason", "r", stdin="no\n")
    assert done.returncode == 1 and "nothing was erased" in done.stderr and done.stdout == ""


async def test_the_payer_routes_answer_as_their_openapi_document_says(client, ledger, unique):
    from tests.operations.test_api import Contract
    contract = Contract()
    made = await make_payment(ledger, f"ch-{unique}")
    body = {"phone": made.phone, "operator": "o", "reason": "asked"}
    bad_token = {"Authorization": "Bearer not-the-token"}
    for path in ("/admin/payers/export", "/admin/payers/erase"):
        for response in [await client.post(path, headers=ADMIN, json=body),
                         await client.post(path, headers=ADMIN, json={"phone": "x"}),
                         await client.post(path, headers={**ADMIN, "Content-Type": "text/plain"}, data=b"x"),
                         await client.post(path, headers={**ADMIN, "Content-Type": "application/json"},
                                           data=b"[" * 20_000),
                         await client.post(path, json=body), await client.post(path, headers=bad_token, json=body)]:
            await contract.check("post", path, response)
    statuses = {(path, status) for _, path, status, _ in contract.seen}
    assert {status for _, status in statuses} == {"200", "400", "401", "403", "413", "415"}


async def test_the_export_command_writes_a_file_only_its_owner_reads(infra, ledger, unique, tmp_path):
    made = await make_payment(ledger, f"ch-{unique}")
    output = tmp_path / "export.json"
    done = erase_command(infra, "export", "--phone", "-", "--channel", f"ch-{unique}", "--output", str(output),
                         "--operator", "wanjiku", stdin=made.phone + "\n")
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert output.stat().st_mode & 0o777 == 0o600
    export = json.loads(output.read_text())
    assert [p["paymentId"] for p in export["payments"]] == [made.payment_id] and export["channel"] == f"ch-{unique}"
