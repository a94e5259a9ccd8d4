"""Least privilege in PostgreSQL (migrations/0009_roles.sql) and the audit chain's signed anchors
(services/ledger/anchors.py), on the real database with the login roles of infra/postgres.sh.

Every attack on the audit tables runs inside a transaction that is rolled back, so nothing a test
tries (and nothing it would do if a guard were missing) outlives it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.common.db import SchemaNotReady, require_schema
from services.ledger import anchors, store
from services.ledger.service import Ledger
from tests.conftest import ANCHOR_KEY_FILE, ROOT, database_url_of, eventually, free_port, service_env, start_service
from tests.ledger.test_ledger_db import requested

SERVICE_ROLES = ("ingress", "stk_worker", "ledger", "onboarding", "auditor", "notifier", "privacy")
AUDIT_TABLES = ("audit_log", "audit_anchors", "credential_audit", "payment_history")
TIME_COLUMN = {"audit_anchors": "anchored_at"}  # every other audit table calls it `at`

# What each login role may do, table by table; anything not listed is refused. The services' own
# tests (tests/ledger, tests/ingress, tests/stk_worker, tests/channels) show that this is enough.
GRANTS = {
    "ingress": {"ingress_requests": "SELECT INSERT UPDATE", "payments": "SELECT", "payment_history": "SELECT",
                "channels": "SELECT", "api_keys": "SELECT", "schema_migrations": "SELECT"},
    "stk_worker": {"stk_push_claims": "SELECT INSERT UPDATE", "stk_worker_instances": "SELECT INSERT UPDATE",
                   "daraja_tokens": "SELECT INSERT UPDATE",
                   "channels": "SELECT", "channel_credentials": "SELECT", "credential_audit": "INSERT",
                   "schema_migrations": "SELECT"},
    "ledger": {"payments": "SELECT INSERT UPDATE", "payment_history": "SELECT INSERT", "audit_log": "SELECT INSERT",
               "processed_events": "SELECT INSERT DELETE", "parked_facts": "SELECT INSERT DELETE",
               "outbox": "SELECT INSERT UPDATE DELETE", "callback_bodies": "SELECT INSERT",
               "schema_migrations": "SELECT"},
    "onboarding": {"channels": "SELECT INSERT UPDATE", "channel_credentials": "SELECT INSERT UPDATE",
                   "api_keys": "SELECT INSERT UPDATE", "credential_audit": "INSERT", "schema_migrations": "SELECT",
                   "webhook_endpoints": "SELECT INSERT UPDATE", "webhook_secrets": "SELECT INSERT UPDATE",
                   "webhook_deliveries": "SELECT UPDATE", "webhook_attempts": "SELECT",
                   # the review desk and statements read payments and what is behind them
                   "payments": "SELECT", "payment_history": "SELECT", "audit_log": "SELECT",
                   "callback_bodies": "SELECT", "payer_requests": "SELECT"},
    "auditor": {"audit_log": "SELECT", "audit_anchors": "SELECT INSERT", "schema_migrations": "SELECT"},
    # The notifier's UPDATE of webhook_endpoints is by column (status, failing_since...), so not listed here.
    "notifier": {"webhook_endpoints": "SELECT", "webhook_secrets": "SELECT",
                 "webhook_deliveries": "SELECT INSERT UPDATE", "webhook_attempts": "SELECT INSERT",
                 "credential_audit": "INSERT", "schema_migrations": "SELECT"},
    # Retention and a payer's requests rewrite the payer's columns of payments, ingress records and
    # webhook deliveries by column (checked below, not listed here), drop raw bodies, and record each request.
    "privacy": {"schema_migrations": "SELECT", "payments": "SELECT", "callback_bodies": "SELECT DELETE",
                "parked_facts": "SELECT DELETE", "payer_requests": "SELECT INSERT", "webhook_deliveries": "SELECT",
                "ingress_requests": "SELECT"},
}
PAYMENT_COLUMNS = ("payment_id", "channel_id", "state", "amount", "phone", "account_reference", "description",
                   "order_reference", "metadata", "checkout_request_id", "mpesa_receipt", "transaction_time",
                   "result_code", "result_desc", "requested_at", "final_at", "payer_data", "payer_data_changed_at",
                   "candidate_checkout_request_id", "review_reason", "contradiction")
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


def connect(infra, role: str) -> psycopg.Connection:
    return psycopg.connect(database_url_of(infra, role))


def refused(conn: psycopg.Connection, statement: str) -> str:
    """The error PostgreSQL gives for a statement, tried in a transaction that is rolled back."""
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(statement)
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ACCEPTED"


def _one(conn: psycopg.Connection, query: str, params: tuple[object, ...]) -> object:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def test_each_role_holds_exactly_the_grants_its_service_needs(infra, database_url):
    with psycopg.connect(database_url) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        held: dict[str, dict[str, str]] = {role: {} for role in SERVICE_ROLES}
        for role in SERVICE_ROLES:
            for table in tables:
                granted = [p for p in PRIVILEGES if _one(conn, "SELECT has_table_privilege(%s, %s, %s)",
                                                                 (role, table, p))]
                if granted:
                    held[role][table] = " ".join(granted)
        # The ingress sees a channel's credential version, never the sealed secret.
        columns = {c: _one(conn, "SELECT has_column_privilege('ingress', 'channel_credentials', %s, 'SELECT')",
                           (c,)) for c in ("version", "fingerprint", "ciphertext", "wrapped_key")}
        # The ledger reads two policies of a channel (confirm every success by query, the metadata keys
        # analytics may see), nothing else of it.
        ledger_reads = {c: _one(conn, "SELECT has_column_privilege('ledger', 'channels', %s, 'SELECT')",
                                (c,)) for c in ("confirm_success_by_query", "analytics_metadata_keys",
                                                "business_shortcode")}
        # The privacy role writes a payment's payer data and nothing of its money record.
        privacy_writes = {c for c in PAYMENT_COLUMNS if _one(
            conn, "SELECT has_column_privilege('privacy', 'payments', %s, 'UPDATE')", (c,))}
        privacy_reads_channels = {c: _one(conn, "SELECT has_column_privilege('privacy', 'channels', %s, 'SELECT')",
                                          (c,)) for c in ("payer_data_retention_days", "business_shortcode")}
    assert held == GRANTS
    assert privacy_writes == {"phone", "account_reference", "description", "metadata", "order_reference",
                              "payer_data", "payer_data_changed_at", "checkout_request_id",
                              "candidate_checkout_request_id", "review_reason", "contradiction"}
    assert privacy_reads_channels == {"payer_data_retention_days": True, "business_shortcode": False}
    assert ledger_reads == {"confirm_success_by_query": True, "analytics_metadata_keys": True,
                            "business_shortcode": False}
    assert columns == {"version": True, "fingerprint": True, "ciphertext": False, "wrapped_key": False}


@pytest.mark.parametrize("role", SERVICE_ROLES)
@pytest.mark.parametrize("table", AUDIT_TABLES)
def test_no_service_role_can_truncate_delete_update_or_alter_an_audit_table(infra, role, table):
    with connect(infra, role) as conn:
        for statement in (f"TRUNCATE {table}", f"DELETE FROM {table}",
                          f"UPDATE {table} SET {TIME_COLUMN.get(table, 'at')} = now()",
                          f"ALTER TABLE {table} DISABLE TRIGGER ALL", f"DROP TABLE {table}"):
            outcome = refused(conn, statement)
            assert outcome.startswith("InsufficientPrivilege"), f"{role}: {statement}: {outcome}"


# A row of each, so that a row trigger has something to fire on.
SAMPLE_ROWS = {
    "audit_log": "INSERT INTO audit_log (seq, payment_id, fact, verdict, at, prev_hash, hash)"
                 " VALUES (9000000000000000000, 'p', 'f', 'v', now(), 'h', 'h')",
    "audit_anchors": "INSERT INTO audit_anchors (audit_seq, audit_hash, anchored_at, key_id, signature)"
                     " VALUES (1, repeat('0', 64), now(), repeat('0', 16), decode(repeat('00', 64), 'hex'))",
    "credential_audit": "INSERT INTO credential_audit (actor, action) VALUES ('tests', 'kek_rotated')",
}


@pytest.mark.parametrize("table", sorted(SAMPLE_ROWS))
def test_even_the_owner_cannot_truncate_or_edit_an_audit_table_without_first_disabling_its_trigger(database_url,
                                                                                                  table):
    with psycopg.connect(database_url) as conn:
        for change in (f"TRUNCATE {table}", f"DELETE FROM {table}",
                       f"UPDATE {table} SET {TIME_COLUMN.get(table, 'at')} = now()"):
            assert "is append-only" in refused(conn, f"{SAMPLE_ROWS[table]}; {change}"), change


def test_the_ingress_role_cannot_touch_the_ledgers_tables_or_the_sealed_credentials(infra):
    with connect(infra, "ingress") as conn:
        for statement in ("INSERT INTO payments (payment_id) VALUES ('x')", "UPDATE payments SET state = 'Settled'",
                          "DELETE FROM payments", "INSERT INTO payment_history (payment_id) VALUES ('x')",
                          "SELECT * FROM audit_log", "SELECT * FROM processed_events", "SELECT * FROM outbox",
                          "SELECT * FROM parked_facts", "SELECT * FROM stk_push_claims",
                          "SELECT ciphertext FROM channel_credentials", "UPDATE channels SET status = 'active'",
                          "INSERT INTO api_keys (key_id) VALUES ('x')", "CREATE TABLE t (x int)",
                          "CREATE TEMP TABLE t (x int)"):
            outcome = refused(conn, statement)
            assert outcome.startswith("InsufficientPrivilege"), f"{statement}: {outcome}"


def test_the_ledger_role_cannot_hide_an_audit_row_below_the_start_of_the_chain(infra):
    with connect(infra, "ledger") as conn:
        outcome = refused(conn, "INSERT INTO audit_log (seq, payment_id, fact, verdict, at, prev_hash, hash)"
                                " VALUES (0, 'p', 'f', 'v', now(), 'h', 'h')")
    assert outcome.startswith("CheckViolation") and "audit_log_seq_positive" in outcome, outcome


def test_a_service_refuses_to_start_on_a_schema_behind_its_code_with_one_line(infra, tmp_path):
    # require_schema compares with this code's migrations: one more file than the database has.
    ahead = tmp_path / "migrations"
    ahead.mkdir()
    for path in sorted((ROOT / "migrations").glob("*.sql")):
        (ahead / path.name).write_text(path.read_text())
    (ahead / "9999_future.sql").write_text("SELECT 1;")
    require_schema(database_url_of(infra, "ledger"), ROOT / "migrations")  # up to date: no error
    with pytest.raises(SchemaNotReady, match=r"lacks 1 migration\(s\) this code needs \(first: 9999_future.sql\)"):
        require_schema(database_url_of(infra, "ledger"), ahead)

    # A database where nothing was migrated: the service stops at once, before touching Kafka.
    empty = database_url_of(infra, "ledger").rsplit("/", 1)[0] + "/postgres"
    result = subprocess.run([sys.executable, "-m", "services.ledger"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**service_env(infra), "DATABASE_URL": empty})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ledger: cannot start: the database schema lacks"), result.stderr
    assert "mpesa-pipeline migrate" in lines[0]


# --- Anchors -----------------------------------------------------------------------------------------

@pytest.fixture
def anchor_key():
    return anchors.load_signing_key(ANCHOR_KEY_FILE)


@pytest.fixture
def public_keys():
    return anchors.load_public_keys(anchors.public_key_path(ANCHOR_KEY_FILE))


async def _audited_payment(ledger_pool, codec, unique) -> str:
    payment_id = str(uuid.uuid4())
    await Ledger(ledger_pool, codec).handle_batch([requested(f"ch-{unique}", payment_id)])
    return payment_id


async def _rows_of(conn, payment_id: str) -> list[int]:
    cur = await conn.execute("SELECT seq FROM audit_log WHERE payment_id = %s ORDER BY seq", (payment_id,))
    return [r[0] for r in await cur.fetchall()]


async def _recompute_chain_from(conn, seq: int) -> None:
    """What an attacker with the owner's rights does after editing row `seq`: every later hash anew."""
    # The edited row still holds the hash it was chained to (the genesis value when it is the first row:
    # the test must not rely on other tests having written rows before its own).
    prev = (await (await conn.execute("SELECT prev_hash FROM audit_log WHERE seq = %s", (seq,))).fetchone())[0]
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT seq, payment_id, event_id::text, fact, verdict, from_state, to_state, detail, at, actor"
                      " FROM audit_log WHERE seq >= %s ORDER BY seq", (seq,))
    for row in await cur.fetchall():
        digest = store.audit_hash(prev, store._audit_entry(row))
        await conn.execute("UPDATE audit_log SET prev_hash = %s, hash = %s WHERE seq = %s", (prev, digest, row["seq"]))
        prev = digest


async def _verify(conn, public_keys, from_seq: int):
    count, problem = await store.verify_audit(conn, from_seq)
    return problem, await anchors.verify_anchors(conn, public_keys)


@pytest.mark.parametrize("attack", ["rewrite", "cut"])
async def test_an_anchored_trail_rewritten_even_with_every_hash_recomputed_fails_verification(
        ledger_pool, auditor_pool, pool, codec, unique, anchor_key, public_keys, attack):
    payment_id = await _audited_payment(ledger_pool, codec, unique)
    anchor = await _anchor(auditor_pool, anchor_key)
    assert anchor is not None
    async with pool.connection() as conn:
        seq = (await _rows_of(conn, payment_id))[0]
        assert anchor.audit_seq >= seq
        problem, report = await _verify(conn, public_keys, max(seq - 50, 1))
        assert problem is None and report.problem is None and report.newest == anchor

        async with conn.transaction(force_rollback=True):  # the attack never outlives the test
            await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
            if attack == "rewrite":
                await conn.execute("UPDATE audit_log SET detail = 'nothing happened' WHERE seq = %s", (seq,))
                await _recompute_chain_from(conn, seq)
            else:
                await conn.execute("DELETE FROM audit_log WHERE seq >= %s", (seq,))
            problem, report = await _verify(conn, public_keys, max(seq - 50, 1))
            assert problem is None  # the chain alone no longer shows it...
            expected = "the trail was rewritten" if attack == "rewrite" else "is missing: the trail was cut"
            assert report.problem is not None and expected in report.problem  # ...its anchor does
            assert f"row {anchor.audit_seq}" in report.problem or attack == "cut"

        problem, report = await _verify(conn, public_keys, max(seq - 50, 1))
        assert problem is None and report.problem is None


async def _anchor(pool: AsyncConnectionPool, key: Ed25519PrivateKey) -> anchors.Anchor:
    anchor = await anchors.Anchorer(pool, key, 60).anchor_once()
    assert anchor is not None, "the audit head was anchored"
    return anchor


async def test_a_forged_anchor_or_one_by_an_unknown_key_fails_verification(ledger_pool, auditor_pool, pool, codec,
                                                                          unique, anchor_key, public_keys):
    await _audited_payment(ledger_pool, codec, unique)
    anchor = await _anchor(auditor_pool, anchor_key)
    stranger = anchors.sign(Ed25519PrivateKey.generate(), anchor.audit_seq, anchor.audit_hash,
                            anchor.anchored_at)
    forged = anchors.Anchor(anchor.audit_seq, "0" * 64, anchor.anchored_at, anchor.key_id, anchor.signature)
    for bad, expected in ((stranger, "which is not among the public keys"), (forged, "does not verify: forged")):
        async with pool.connection() as conn, conn.transaction(force_rollback=True):
            await conn.execute("INSERT INTO audit_anchors (audit_seq, audit_hash, anchored_at, key_id, signature)"
                               " VALUES (%s, %s, %s, %s, %s)",
                               (bad.audit_seq, bad.audit_hash, bad.anchored_at, bad.key_id, bad.signature))
            report = await anchors.verify_anchors(conn, public_keys)
            assert report.problem is not None and expected in report.problem


async def test_the_anchoring_job_refuses_to_sign_a_chain_that_does_not_verify(ledger_pool, auditor_pool, pool, codec,
                                                                             unique, anchor_key):
    await anchors.Anchorer(auditor_pool, anchor_key, 60).anchor_once()
    payment_id = await _audited_payment(ledger_pool, codec, unique)  # rows after the newest anchor
    async with pool.connection() as conn, conn.transaction(force_rollback=True):
        seq = (await _rows_of(conn, payment_id))[0]
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        await conn.execute("UPDATE audit_log SET detail = 'nothing happened' WHERE seq = %s", (seq,))
        with pytest.raises(anchors.ChainBroken, match=f"row {seq}: content does not match its hash"):
            await anchors.anchor_head(conn, anchor_key)


async def test_the_anchoring_job_refuses_to_go_on_from_an_anchor_whose_row_was_rewritten(ledger_pool, auditor_pool,
                                                                                      pool, codec, unique,
                                                                                      anchor_key):
    payment_id = await _audited_payment(ledger_pool, codec, unique)
    anchor = await _anchor(auditor_pool, anchor_key)
    await _audited_payment(ledger_pool, codec, unique)  # the head moves on
    async with pool.connection() as conn, conn.transaction(force_rollback=True):
        seq = (await _rows_of(conn, payment_id))[0]
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        await conn.execute("UPDATE audit_log SET detail = 'nothing happened' WHERE seq = %s", (seq,))
        await _recompute_chain_from(conn, seq)  # a consistent chain, but not the one anchored
        with pytest.raises(anchors.ChainBroken, match=f"row {anchor.audit_seq} no longer has the hash anchored"):
            await anchors.anchor_head(conn, anchor_key)


def test_only_the_auditor_writes_anchors_and_nobody_changes_them(infra):
    with connect(infra, "auditor") as auditor, connect(infra, "ledger") as ledger:
        row = "(1, repeat('0', 64), now(), repeat('0', 16), decode(repeat('00', 64), 'hex'))"
        columns = "(audit_seq, audit_hash, anchored_at, key_id, signature)"
        assert refused(auditor, f"INSERT INTO audit_anchors {columns} VALUES {row}") == "ACCEPTED"
        assert refused(ledger, f"INSERT INTO audit_anchors {columns} VALUES {row}").startswith("InsufficientPrivilege")
        for statement in ("UPDATE audit_anchors SET audit_seq = 2", "DELETE FROM audit_anchors",
                          "TRUNCATE audit_anchors", "INSERT INTO audit_log (seq) VALUES (0)"):
            assert refused(auditor, statement).startswith("InsufficientPrivilege"), statement


async def test_the_anchoring_service_anchors_the_head_and_audit_verify_reports_it(infra, pool, ledger_pool, codec,
                                                                                unique):
    payment_id = await _audited_payment(ledger_pool, codec, unique)
    async with pool.connection() as conn:  # its own newest row, whatever other tests append meanwhile
        head = max(await _rows_of(conn, payment_id))
    port = free_port()
    service = start_service("services.ledger.anchors", service_env(
        infra, AUDIT_ANCHOR_INTERVAL_S="0.2", AUDIT_ANCHOR_KEY_FILE=str(ANCHOR_KEY_FILE),
        AUDIT_ANCHOR_METRICS_PORT=str(port)))
    try:
        async def anchored():
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT 1 FROM audit_anchors WHERE audit_seq >= %s", (head,))
                return await cur.fetchone()
        await eventually(anchored, timeout=30)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'audit_anchors_total{result="anchored"}' in metrics
        assert "audit_anchor_checked_timestamp_seconds" in metrics
    finally:
        service.terminate()
        output, _ = service.communicate(timeout=30)
    assert service.returncode == 0, output
    assert "anchored audit row" in output and "schema's owner" not in output

    verify = [sys.executable, "-m", "services.cli", "audit", "verify", "--from", str(max(head - 100, 1))]
    result = subprocess.run(verify, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin", "PGPASSFILE": os.environ.get("PGPASSFILE", ""),
                                 "DATABASE_URL": database_url_of(infra, "auditor")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "anchors verified, the newest at row" in result.stdout
