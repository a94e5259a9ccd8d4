"""The retention of payers' data against the real PostgreSQL, with the ledger applying facts as its
own role and the retention running as the privacy role: payments past their channel's retention are
pseudonymised and only they, the money record and receipt searches stay, raw callbacks go, and a late
callback the ledger applies meanwhile cannot write the payer's data back."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import pytest

from services.common.payment import mask_phones_in
from services.common.pseudonyms import Pseudonyms
from services.operations.desk import ReviewDesk
from services.operations.model import Search
from services.privacy.retention import Retention
from services.privacy.scrub import ACCOUNT_REFERENCE_PLACEHOLDER, lock_payments, scrub_payments
from tests.conftest import ROOT, database_url_of, eventually
from tests.ledger.callbacks import failure, success
from tests.ledger.test_ledger_db import accepted, callback, requested
from tests.operations.conftest import daraja_checkout_id

PSEUDONYMS = Pseudonyms(bytes(range(32)))
PAYER = "254712345678"


async def new_channel(pool, channel_id: str, retention_days: int | None = None) -> None:
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO channels (channel_id, display_name, shortcode_type, business_shortcode,"
                           " environment, payer_data_retention_days) VALUES (%s, 'Test', 'paybill', '174379',"
                           " 'sandbox', %s)", (channel_id, retention_days))


async def settled(ledger, channel: str, receipt: str, phone: str = PAYER, **request) -> str:
    """A payment the ledger settled, with its raw callback kept; its id."""
    pid, checkout = str(uuid.uuid4()), daraja_checkout_id(phone)  # Daraja's form: it ends in the number
    facts = [requested(channel, pid, phone=phone, account_reference="Jane Doe", description="for Jane",
                       order_reference=f"order of {phone}", metadata={"name": "Jane Doe"}, **request),
             accepted(channel, pid, checkout), callback(channel, pid, success(checkout, receipt=receipt,
                                                                              phone=int(phone)))]
    assert await ledger.handle_batch(facts) == []
    return pid


async def final_days_ago(pool, payment_id: str, days: float) -> None:
    async with pool.connection() as conn:
        await conn.execute("UPDATE payments SET final_at = now() - make_interval(secs => %s) WHERE payment_id = %s",
                           (days * 86400, payment_id))


async def payer_data(pool, payment_id: str) -> dict:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT state, amount, mpesa_receipt, checkout_request_id, final_at, result_code, phone, account_reference,"
            " description, order_reference, metadata, payer_data, payer_data_changed_at IS NOT NULL,"
            " (SELECT count(*) FROM callback_bodies c WHERE c.payment_id = p.payment_id),"
            " (SELECT count(*) FROM parked_facts f WHERE f.payment_id = p.payment_id)"
            " FROM payments p WHERE payment_id = %s", (payment_id,))
        row = await cur.fetchone()
    keys = ("state", "amount", "receipt", "checkout", "final_at", "result_code", "phone", "account_reference",
            "description", "order_reference", "metadata", "payer_data", "changed", "callbacks", "parked")
    return dict(zip(keys, row, strict=True))


async def park_a_fact(pool, payment_id: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO parked_facts (event_id, payment_id, topic, payload) VALUES (%s, %s,"
                           " 'mpesa.callback.raw.v1', %s)", (uuid.uuid4(), payment_id, PAYER.encode()))


def retention(privacy_pool, default_days: int = 90, chunk: int = 500) -> Retention:
    return Retention(privacy_pool, PSEUDONYMS, default_days, interval_s=3600, chunk=chunk, pause_s=0)


MONEY = ("state", "amount", "receipt", "checkout", "final_at", "result_code")  # checkout: its pseudonym after


async def test_retention_pseudonymises_the_payments_past_their_channels_retention_and_only_those(
        ledger, pool, privacy_pool, unique):
    default, own = f"ch-{unique}-d", f"ch-{unique}-o"
    await new_channel(pool, default)
    await new_channel(pool, own, retention_days=10)
    old = await settled(ledger, default, f"R{unique[:8]}A".upper())
    recent = await settled(ledger, default, f"R{unique[:8]}B".upper())
    own_old = await settled(ledger, own, f"R{unique[:8]}C".upper())
    own_recent = await settled(ledger, own, f"R{unique[:8]}D".upper())
    still_open = str(uuid.uuid4())
    assert await ledger.handle_batch([requested(default, still_open)]) == []
    await final_days_ago(pool, old, 91)
    await final_days_ago(pool, recent, 89)
    await final_days_ago(pool, own_old, 11)
    await final_days_ago(pool, own_recent, 9)
    async with pool.connection() as conn:  # requested long ago, but never final: money may still move
        await conn.execute("UPDATE payments SET requested_at = now() - interval '400 days' WHERE payment_id = %s",
                           (still_open,))
    await park_a_fact(pool, old)
    before = {p: await payer_data(pool, p) for p in (old, recent, own_old, own_recent, still_open)}

    report = await retention(privacy_pool).run_once()

    after = {p: await payer_data(pool, p) for p in before}
    for p in (old, own_old):
        assert after[p] == {**before[p], "phone": PSEUDONYMS.phone(PAYER),
                            "account_reference": ACCOUNT_REFERENCE_PLACEHOLDER, "description": None,
                            "order_reference": f"order of {mask_phones_in(PAYER)}", "metadata": {},
                            "payer_data": "pseudonymised", "changed": True, "callbacks": 0, "parked": 0,
                            "checkout": PSEUDONYMS.checkout(before[p]["checkout"])}
        assert before[p]["checkout"].endswith(PAYER[3:])
        assert {k: after[p][k] for k in MONEY if k != "checkout"} == {k: before[p][k] for k in MONEY if k != "checkout"}
    for p in (recent, own_recent, still_open):
        assert after[p] == before[p]
    assert before[old]["callbacks"] == 1 and before[old]["parked"] == 1
    assert report.payments >= 2 and report.callback_bodies >= 2 and report.parked_facts >= 1


async def test_pseudonymised_payments_are_still_found_by_receipt_and_one_payer_keeps_one_pseudonym(
        ledger, pool, privacy_pool, unique):
    channel = f"ch-{unique}"
    await new_channel(pool, channel, retention_days=1)
    receipts = [f"S{unique[:8]}{n}".upper() for n in "AB"]
    first, second = [await settled(ledger, channel, r) for r in receipts]
    other = await settled(ledger, channel, f"S{unique[:8]}C".upper(), phone="254798765432")
    for p in (first, second, other):
        await final_days_ago(pool, p, 2)

    await retention(privacy_pool).run_once()

    desk = ReviewDesk(pool, None)
    found = await desk.search(Search(receipt=receipts[1]))
    assert [p["paymentId"] for p in found["payments"]] == [second]
    phones = [(await payer_data(pool, p))["phone"] for p in (first, second, other)]
    assert phones[0] == phones[1] != phones[2] and all(p.startswith("ph_") for p in phones)
    async with pool.connection() as conn:  # the repeat payer's join, on the pseudonym alone
        repeat = await (await conn.execute("SELECT count(*) FROM payments WHERE channel_id = %s AND phone = %s",
                                           (channel, phones[0]))).fetchone()
    assert repeat[0] == 2


async def test_a_second_run_changes_nothing_and_the_audit_chain_still_verifies(ledger, pool, privacy_pool, infra,
                                                                                 unique):
    channel = f"ch-{unique}"
    await new_channel(pool, channel, retention_days=1)
    pids = [await settled(ledger, channel, f"I{unique[:8]}{n}".upper()) for n in "ABC"]
    for p in pids:
        await final_days_ago(pool, p, 2)
    job = retention(privacy_pool, chunk=2)  # three payments: two chunks
    await job.run_once()
    once = [await payer_data(pool, p) for p in pids]
    assert all(d["payer_data"] == "pseudonymised" for d in once)

    again = await job.run_once()

    assert [await payer_data(pool, p) for p in pids] == once
    assert again.oldest_due_s == 0.0
    auditor = {"DATABASE_URL": database_url_of(infra, "auditor"), "PATH": "/usr/bin",
               "PGPASSFILE": os.environ.get("PGPASSFILE", "")}
    result = subprocess.run([sys.executable, "-m", "services.cli", "audit", "verify"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=auditor)
    assert result.returncode == 0 and result.stdout.startswith("audit trail intact"), result.stdout + result.stderr


async def test_a_late_callback_the_ledger_applies_meanwhile_does_not_write_the_payers_data_back(
        ledger, pool, privacy_pool, unique):
    # The scrub holds the payment's advisory lock (its transaction still open) while the ledger applies a
    # late, contradicting callback to the same payment; the ledger must wait, then write what it reads
    # after the scrub's commit, not the payer's data it would have read before.
    channel = f"ch-{unique}"
    await new_channel(pool, channel)
    pid, checkout = str(uuid.uuid4()), f"ws_CO_{unique}"
    assert await ledger.handle_batch([requested(channel, pid, account_reference="Jane Doe", metadata={"n": "Jane"}),
                                      accepted(channel, pid, checkout),
                                      callback(channel, pid, success(checkout, receipt=f"L{unique[:9]}".upper()))
                                      ]) == []
    async with privacy_pool.connection() as conn:
        async with conn.transaction():
            await scrub_payments(conn, [pid], PSEUDONYMS.phone, "pseudonymised", PSEUDONYMS.checkout)
            late = asyncio.create_task(ledger.handle_batch([callback(channel, pid, failure(checkout, 1032))]))
            await eventually(lambda: _someone_waits_on_a_lock(pool))
        assert await asyncio.wait_for(late, 60) == []
    after = await payer_data(pool, pid)
    async with pool.connection() as conn:
        contradiction = await (await conn.execute("SELECT contradiction FROM payments WHERE payment_id = %s",
                                                  (pid,))).fetchone()
    assert contradiction[0] is not None  # the ledger did write the payment
    assert (after["state"], after["phone"], after["account_reference"], after["metadata"], after["payer_data"]) == (
        "Settled", PSEUDONYMS.phone(PAYER), ACCOUNT_REFERENCE_PLACEHOLDER, {}, "pseudonymised")


async def _someone_waits_on_a_lock(pool) -> bool:
    # Whichever lock: the payment's advisory lock with the scrub as built, the row's without it (the
    # owner cannot see other roles' sessions, but every lock a session waits for is in pg_locks).
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")).fetchone()
    return row[0] > 0


async def test_the_scrub_replaces_the_ingress_records_digest_and_references(pool, privacy_pool, unique):
    channel, pid = f"ch-{unique}", str(uuid.uuid4())
    digest = bytes(32)
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO ingress_requests (channel_id, idempotency_key, body_sha256, payment_id,"
                           " event_id, occurred_at, api_key_id, amount, account_reference, order_reference)"
                           " VALUES (%s, 'k', %s, %s, %s, now(), 'key', 100, 'Jane Doe', 'for 0712345678')",
                           (channel, digest, pid, uuid.uuid4()))
        await conn.execute("INSERT INTO payments (payment_id, channel_id, state, amount, phone, account_reference,"
                           " order_reference, requested_at, final_at) VALUES (%s, %s, 'Cancelled', 100, %s,"
                           " 'Jane Doe', 'for 0712345678', now(), now())", (pid, channel, PAYER))
    async with privacy_pool.connection() as conn, conn.transaction():
        report = await scrub_payments(conn, [pid, "no-such-payment"], PSEUDONYMS.phone, "pseudonymised",
                                      PSEUDONYMS.checkout)
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT body_sha256, account_reference, order_reference FROM ingress_requests"
                                        " WHERE payment_id = %s", (pid,))).fetchone()
    assert (report.payments, report.ingress_requests) == (1, 1)
    assert row[0] != digest and row[1] == ACCOUNT_REFERENCE_PLACEHOLDER and "0712345678" not in row[2]


@pytest.mark.parametrize("outcome", ["kept", "deleted", ""])
async def test_the_scrub_refuses_an_outcome_it_does_not_know(privacy_pool, outcome):
    async with privacy_pool.connection() as conn:
        with pytest.raises(ValueError):
            await scrub_payments(conn, ["p"], PSEUDONYMS.phone, outcome, PSEUDONYMS.checkout)


async def test_a_payment_reopened_while_retention_waits_for_its_lock_is_left_alone(ledger, pool, privacy_pool,
                                                                                    unique):
    # The owner's transaction stands for the ledger: it holds the payment's lock while a late fact
    # takes a long-final payment to Review; the retention chose it before, and must look again.
    channel = f"ch-{unique}"
    await new_channel(pool, channel, retention_days=1)
    pid = await settled(ledger, channel, f"O{unique[:9]}".upper())
    await final_days_ago(pool, pid, 2)
    async with pool.connection() as conn:
        async with conn.transaction():
            await lock_payments(conn, [pid])
            run = asyncio.create_task(retention(privacy_pool).run_once())
            await eventually(lambda: _someone_waits_on_a_lock(pool))
            await conn.execute("UPDATE payments SET state = 'Review', review_reason = 'late fact'"
                               " WHERE payment_id = %s", (pid,))
        await asyncio.wait_for(run, 60)
    after = await payer_data(pool, pid)
    assert (after["state"], after["payer_data"], after["phone"]) == ("Review", "kept", PAYER)
