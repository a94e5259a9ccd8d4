"""The merchant's processing agreement on the real PostgreSQL, through the operations, the admin API
and the command line: activation is refused without every field of it (and the database refuses it
too), a channel active from before agreements keeps working until its next activation, and the
compliance report shows each channel's agreement, consent, credential age, retention and last
erasure with what is missing flagged."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.channels.api import create_app
from services.channels.cli import compliance_table
from services.channels.model import AGREEMENT_FIELDS
from services.channels.onboarding import InvalidInput, Onboarding
from services.channels.settings import AdminToken
from services.channels.vault import public_key_path
from tests.channels.conftest import AGREEMENT, audit_of, onboard, paybill_body
from tests.channels.test_api import ADMIN, ADMIN_TOKEN
from tests.channels.test_cli import run  # noqa: F401  (the command-line fixture)

WITHOUT_AGREEMENT = {field: None for field in AGREEMENT_FIELDS}


@pytest.fixture(scope="module")
def erasure_and_retention_tables(infra) -> Iterator[None]:
    """What the report reads from the other parts of issue #17, made here with their real shape only
    where their migrations have not made it (the retention column of channels, 0021; the erasure
    requests, 0022), and dropped again afterwards so that the database's grants stay the migrations'."""
    with psycopg.connect(infra["DATABASE_URL"], autocommit=True) as conn:  # the owner
        made_table = _one(conn, "SELECT to_regclass('payer_requests') IS NULL")
        made_column = _one(conn, "SELECT NOT EXISTS (SELECT FROM information_schema.columns WHERE table_name ="
                                 " 'channels' AND column_name = 'payer_data_retention_days')")
        if made_column:
            conn.execute("ALTER TABLE channels ADD COLUMN payer_data_retention_days integer"
                         " CHECK (payer_data_retention_days > 0)")
        if made_table:
            conn.execute("CREATE TABLE payer_requests (id bigserial PRIMARY KEY, kind text NOT NULL,"
                         " payer_pseudonym text NOT NULL, channel_id text, actor text NOT NULL, reason text,"
                         " payments integer NOT NULL, at timestamptz NOT NULL DEFAULT now())")
            conn.execute("GRANT SELECT ON payer_requests TO mpesa_onboarding")  # as migration 0023 does
    yield
    with psycopg.connect(infra["DATABASE_URL"], autocommit=True) as conn:
        if made_table:
            conn.execute("DROP TABLE payer_requests")
        if made_column:
            conn.execute("ALTER TABLE channels DROP COLUMN payer_data_retention_days")


def _one(conn: psycopg.Connection, query: str) -> bool:
    row = conn.execute(query).fetchone()
    assert row is not None
    return bool(row[0])


async def legacy_active_channel(onboarding: Onboarding, database_url: str, channel_id: str, creds) -> None:
    """An active channel without an agreement, as channels active before migration 0023 are. The
    trigger is disabled only inside the owner's transaction, so no other session ever sees it off."""
    await onboard(onboarding, channel_id, creds, **WITHOUT_AGREEMENT)
    with psycopg.connect(database_url) as conn, conn.transaction():
        conn.execute("ALTER TABLE channels DISABLE TRIGGER channels_agreement_before_activation")
        conn.execute("UPDATE channels SET status = 'active' WHERE channel_id = %s", (channel_id,))
        conn.execute("ALTER TABLE channels ENABLE TRIGGER channels_agreement_before_activation")


# The operations

async def test_activation_without_an_agreement_is_refused_naming_each_missing_field(onboarding, pool, creds, unique):
    channel_id = f"dpa-{unique}"
    await onboard(onboarding, channel_id, creds, agreementReference="DPA-1", **{
        field: None for field in AGREEMENT_FIELDS if field != "agreementReference"})
    with pytest.raises(InvalidInput) as refused:
        await onboarding.resume(channel_id, "tests")
    assert set(refused.value.errors) == {"agreementVersion", "agreementSignedOn", "lawfulBasis"}
    assert "it lacks agreementVersion, agreementSignedOn, lawfulBasis" in refused.value.detail
    assert (await onboarding.channel(channel_id)).channel.status == "onboarding"
    assert "channel_activated" not in [row[0] for row in await audit_of(pool, channel_id)]

    await onboarding.update_channel(channel_id, {"agreementVersion": "4", "agreementSignedOn": "2024-06-01",
                                                 "lawfulBasis": "consent"}, "tests")
    assert (await onboarding.resume(channel_id, "tests")).channel.status == "active"
    assert [row[0] for row in await audit_of(pool, channel_id)][-1] == "channel_activated"


async def test_the_agreement_round_trips_through_update_show_and_list(onboarding, pool, unique):
    channel_id = f"dpa-{unique}"
    created = await onboarding.create_channel(paybill_body(channel_id), "tests")
    assert {k: created.view()[k] for k in AGREEMENT} == AGREEMENT
    changed = {"agreementReference": "DPA-2025-3", "agreementVersion": "3.0", "agreementSignedOn": "2025-01-02",
               "lawfulBasis": "legitimate_interests"}
    await onboarding.update_channel(channel_id, changed, "tests")
    assert {k: (await onboarding.channel(channel_id)).view()[k] for k in AGREEMENT} == changed
    listed = [r.view() for r in await onboarding.channels() if r.channel.channel_id == channel_id]
    assert {k: listed[0][k] for k in AGREEMENT} == changed
    await onboarding.update_channel(channel_id, WITHOUT_AGREEMENT, "tests")  # not active: may be removed
    shown = (await onboarding.channel(channel_id)).view()
    assert [shown[k] for k in AGREEMENT] == [None] * 4
    assert [row[4] for row in await audit_of(pool, channel_id)][-1] == (
        "changed agreementReference, agreementSignedOn, agreementVersion, lawfulBasis")


async def test_the_database_refuses_an_active_channel_without_its_agreement(onboarding, database_url, creds, unique):
    channel_id = f"dpa-{unique}"
    await onboard(onboarding, channel_id, creds, lawfulBasis=None)
    with psycopg.connect(database_url, autocommit=True) as conn:  # each refusal on its own
        with pytest.raises(psycopg.errors.CheckViolation, match="without its processing agreement"):
            conn.execute("UPDATE channels SET status = 'active' WHERE channel_id = %s", (channel_id,))
        with pytest.raises(psycopg.errors.CheckViolation, match="without its processing agreement"):
            conn.execute("INSERT INTO channels (channel_id, display_name, environment, business_shortcode,"
                         " shortcode_type, status, consent_reference, consent_date) VALUES (%s, 'x', 'sandbox',"
                         " '174379', 'paybill', 'active', 'AGR-1', '2024-01-01')", (f"{channel_id}-b",))
        conn.execute("UPDATE channels SET lawful_basis = 'contract' WHERE channel_id = %s", (channel_id,))
        conn.execute("UPDATE channels SET status = 'active' WHERE channel_id = %s", (channel_id,))
        with pytest.raises(psycopg.errors.CheckViolation, match="without its processing agreement"):
            conn.execute("UPDATE channels SET agreement_version = NULL WHERE channel_id = %s", (channel_id,))
        with pytest.raises(psycopg.errors.CheckViolation, match="lawful_basis"):
            conn.execute("UPDATE channels SET lawful_basis = 'research' WHERE channel_id = %s", (channel_id,))


async def test_a_channel_active_from_before_agreements_keeps_working_until_its_next_activation(
        onboarding, database_url, creds, unique):
    channel_id = f"old-{unique}"
    await legacy_active_channel(onboarding, database_url, channel_id, creds)
    renamed = await onboarding.update_channel(channel_id, {"displayName": "Duka ya Zamani"}, "tests")
    assert renamed.channel.status == "active" and renamed.channel.display_name == "Duka ya Zamani"
    with pytest.raises(InvalidInput) as refused:  # half an agreement on an active channel
        await onboarding.update_channel(channel_id, {"agreementReference": "DPA-OLD"}, "tests")
    assert set(refused.value.errors) == {"agreementVersion", "agreementSignedOn", "lawfulBasis"}

    await onboarding.suspend(channel_id, "tests")
    with pytest.raises(InvalidInput) as refused:
        await onboarding.resume(channel_id, "tests")
    assert set(refused.value.errors) == set(AGREEMENT_FIELDS)
    await onboarding.update_channel(channel_id, AGREEMENT, "tests")
    assert (await onboarding.resume(channel_id, "tests")).channel.status == "active"


# The compliance report

async def test_the_compliance_report_shows_and_flags_each_channel(
        onboarding_pool, provider, key_file, database_url, erasure_and_retention_tables, creds, unique):
    now_onboarding = Onboarding(onboarding_pool, public_key_file=public_key_path(key_file))
    complete, legacy, bare = f"ok-{unique}", f"old-{unique}", f"new-{unique}"
    await onboard(now_onboarding, complete, creds)
    await now_onboarding.resume(complete, "tests")
    await legacy_active_channel(now_onboarding, database_url, legacy, creds)
    await now_onboarding.create_channel({k: v for k, v in paybill_body(bare).items()
                                         if not k.startswith("consent") and k not in AGREEMENT}, "tests")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE channels SET payer_data_retention_days = 90 WHERE channel_id = %s", (complete,))
        for at in ("2026-03-01T10:00:00+03:00", "2026-04-02T09:30:00+03:00"):
            conn.execute("INSERT INTO payer_requests (kind, payer_pseudonym, channel_id, actor, payments, at)"
                         " VALUES ('erase', %s, %s, 'tests', 1, %s)", ("ph_" + "0" * 32, complete, at))
        conn.execute("INSERT INTO payer_requests (kind, payer_pseudonym, channel_id, actor, payments, at)"
                     " VALUES ('export', %s, %s, 'tests', 1, '2026-05-01T00:00:00Z')", ("ph_" + "0" * 32, complete))

    later = datetime.now(timezone.utc) + timedelta(days=400)  # the credentials made above are 400 days old then
    later_onboarding = Onboarding(onboarding_pool, public_key_file=public_key_path(key_file), now=lambda: later)
    report = await now_onboarding.compliance()
    entries = {c["channelId"]: c for c in report["channels"] if c["channelId"] in (complete, legacy, bare)}
    ok = entries[complete]
    assert (ok["status"], ok["agreementReference"], ok["agreementVersion"], ok["agreementSignedOn"],
            ok["lawfulBasis"], ok["consentReference"], ok["consentDate"]) == (
        "active", "DPA-2024-017", "2.1", "2024-05-01", "contract", "AGR-2024-001", "2024-05-01")
    assert (ok["credentialsVersion"], ok["credentialsAgeDays"], ok["payerDataRetentionDays"]) == (1, 0, 90)
    assert datetime.fromisoformat(ok["lastErasureAt"]) == datetime(2026, 4, 2, 6, 30, tzinfo=timezone.utc)
    assert ok["flags"] == [] and ok["missingAgreementFields"] == []
    old = entries[legacy]
    assert old["status"] == "active" and old["flags"] == ["no_agreement"]
    assert old["missingAgreementFields"] == list(AGREEMENT_FIELDS) and old["lastErasureAt"] is None
    assert old["payerDataRetentionDays"] is None  # the default applies
    assert entries[bare]["flags"] == ["no_agreement", "no_consent", "no_credentials"]
    assert entries[bare]["credentialsAgeDays"] is None
    assert legacy in report["activeFlagged"] and complete not in report["activeFlagged"]
    assert bare not in report["activeFlagged"]  # onboarding: missing pieces are expected there

    aged = {c["channelId"]: c for c in (await later_onboarding.compliance())["channels"]}
    assert aged[complete]["flags"] == ["credentials_older_than_365_days"]
    assert aged[complete]["credentialsAgeDays"] == 400

    hostile = {**report, "channels": [{**entries[legacy], "consentReference": "AGR-\u202eevil"}]}
    assert "AGR-\\u202eevil" in compliance_table(hostile)  # escaped: the terminal shows it as it is
    table = compliance_table(report)
    line = next(row for row in table.splitlines() if row.startswith(legacy + " "))
    assert "no_agreement" in line and "default" in line
    assert table.splitlines()[-1].startswith("active channels with a flag: ") and legacy in table.splitlines()[-1]


# The admin API

@pytest.fixture
async def client(onboarding):
    app = create_app(onboarding, AdminToken(hashlib.sha256(ADMIN_TOKEN.encode()).digest()))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_the_api_refuses_activation_without_an_agreement_and_allows_it_with_one(client, creds, unique):
    channel_id = f"api-{unique}"
    body = {k: v for k, v in paybill_body(channel_id).items() if k not in AGREEMENT}
    assert (await client.post("/admin/channels", headers=ADMIN, json=body)).status == 201
    assert (await client.put(f"/admin/channels/{channel_id}/credentials", headers=ADMIN, json=creds.body)).status == 200
    response = await client.post(f"/admin/channels/{channel_id}/resume", headers=ADMIN)
    assert response.status == 400 and response.content_type == "application/problem+json"
    problem = await response.json()
    assert [e["field"] for e in problem["errors"]] == list(AGREEMENT_FIELDS)
    assert "lacks agreementReference" in problem["detail"]
    assert (await (await client.get(f"/admin/channels/{channel_id}", headers=ADMIN)).json())["status"] == "onboarding"

    patched = await client.patch(f"/admin/channels/{channel_id}", headers=ADMIN, json=AGREEMENT)
    assert patched.status == 200 and {k: (await patched.json())[k] for k in AGREEMENT} == AGREEMENT
    resumed = await client.post(f"/admin/channels/{channel_id}/resume", headers=ADMIN)
    assert resumed.status == 200 and (await resumed.json())["status"] == "active"
    listed = (await (await client.get("/admin/channels", headers=ADMIN)).json())["channels"]
    assert [c["lawfulBasis"] for c in listed if c["channelId"] == channel_id] == ["contract"]


@pytest.mark.parametrize("change, field", [
    ({"agreementReference": "DPA\u0000"}, "agreementReference"),
    ({"agreementReference": {"a": 1}}, "agreementReference"),
    ({"agreementReference": "DPA-\u202e1"}, "agreementReference"),
    ({"agreementVersion": "9" * 10_000}, "agreementVersion"),
    ({"agreementSignedOn": "2024-13-01"}, "agreementSignedOn"),
    ({"agreementSignedOn": "9999-01-01"}, "agreementSignedOn"),
    ({"lawfulBasis": "contract; DROP TABLE channels"}, "lawfulBasis"), ({"lawfulBasis": None}, "lawfulBasis"),
])
async def test_hostile_agreement_fields_get_400_and_change_nothing(client, creds, unique, change, field):
    channel_id = f"api-{unique}"
    assert (await client.post("/admin/channels", headers=ADMIN, json=paybill_body(channel_id))).status == 201
    await client.put(f"/admin/channels/{channel_id}/credentials", headers=ADMIN, json=creds.body)
    assert (await client.post(f"/admin/channels/{channel_id}/resume", headers=ADMIN)).status == 200
    before = await (await client.get(f"/admin/channels/{channel_id}", headers=ADMIN)).json()
    response = await client.patch(f"/admin/channels/{channel_id}", headers=ADMIN, json=change)
    assert response.status == 400, await response.text()
    assert [e["field"] for e in (await response.json())["errors"]] == [field]
    assert await (await client.get(f"/admin/channels/{channel_id}", headers=ADMIN)).json() == before
    created = await client.post("/admin/channels", headers=ADMIN, json=paybill_body(f"new-{unique}", **change))
    assert created.status == 400 if change[field] is not None else created.status == 201


async def test_the_compliance_report_is_an_admin_route(client, erasure_and_retention_tables, unique):
    channel_id = f"api-{unique}"
    await client.post("/admin/channels", headers=ADMIN, json=paybill_body(channel_id))
    assert (await client.get("/admin/channels/compliance")).status == 401
    response = await client.get("/admin/channels/compliance", headers=ADMIN)
    assert response.status == 200
    entries = [c for c in (await response.json())["channels"] if c["channelId"] == channel_id]
    assert entries[0]["agreementReference"] == "DPA-2024-017" and entries[0]["flags"] == ["no_credentials"]


# The command line

def test_the_command_line_records_the_agreement_and_reports_compliance(run, erasure_and_retention_tables,  # noqa: F811
                                                                        unique):
    channel_id = f"cli-{unique}"
    created = run("channels", "create", channel_id, "--name", "Duka", "--shortcode-type", "paybill", "--shortcode",
                  "174379", "--environment", "sandbox", "--agreement-reference", "DPA-CLI", "--agreement-version",
                  "1", "--agreement-signed-on", "2024-03-01", "--lawful-basis", "contract")
    assert created.returncode == 0, created.stderr
    assert {k: json.loads(created.stdout)[k] for k in AGREEMENT} == {
        "agreementReference": "DPA-CLI", "agreementVersion": "1", "agreementSignedOn": "2024-03-01",
        "lawfulBasis": "contract"}
    bad = run("channels", "update", channel_id, "--lawful-basis", "whatever")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr  # argparse refuses it before any change
    future = run("channels", "update", channel_id, "--agreement-signed-on", "2999-01-01")
    assert future.returncode == 1 and "agreementSignedOn: must not be in the future" in future.stderr
    cleared = run("channels", "update", channel_id, "--clear", "agreement")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["agreementReference"] is None

    as_json = run("channels", "compliance", "--json")
    assert as_json.returncode == 0, as_json.stderr
    mine = [c for c in json.loads(as_json.stdout)["channels"] if c["channelId"] == channel_id]
    assert mine[0]["flags"] == ["no_agreement", "no_consent", "no_credentials"]
    as_table = run("channels", "compliance")
    assert as_table.returncode == 0 and any(
        line.startswith(channel_id + " ") and "no_agreement,no_consent,no_credentials" in line
        for line in as_table.stdout.splitlines())
