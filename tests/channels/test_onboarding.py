"""The onboarding operations against the real PostgreSQL: what is stored, what is refused (and then
left unchanged), the consent and credential rules of activation, and the audit trail."""
from __future__ import annotations

from typing import Any

import psycopg
import pytest

from services.channels.onboarding import (
    Conflict,
    CredentialsRefused,
    DependencyUnavailable,
    InvalidInput,
    NotFound,
    Onboarding,
    daraja_credential_check,
)
from services.channels.vault import public_key_path
from tests.channels.conftest import assert_no_secret, audit_of, new_secrets, onboard, paybill_body, table_bytes
from tests.conftest import free_port


async def test_a_created_channel_is_listed_and_shown(onboarding, pool, unique):
    channel_id = f"shop-{unique}"
    created = await onboarding.create_channel(paybill_body(channel_id, maxAmount=7000), "tests")
    assert created.view()["status"] == "onboarding" and created.view()["credentials"] is None
    assert (await onboarding.channel(channel_id)).view()["maxAmount"] == 7000
    assert created.view()["confirmSuccessByQuery"] is False
    changed = await onboarding.update_channel(channel_id, {"confirmSuccessByQuery": True}, "tests")
    assert (await onboarding.channel(channel_id)).view()["confirmSuccessByQuery"] is True is changed.view()[
        "confirmSuccessByQuery"]
    assert channel_id in [r.channel.channel_id for r in await onboarding.channels()]
    with pytest.raises(Conflict, match="already exists"):
        await onboarding.create_channel(paybill_body(channel_id), "tests")
    assert [row[0] for row in await audit_of(pool, channel_id)] == ["channel_created", "channel_updated"]


async def test_bad_input_is_refused_by_field_and_nothing_is_written(onboarding, pool, unique):
    channel_id = f"shop-{unique}"
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"shortcodeType": "agent"}, "shortcodeType"), ({"shortcodeType": "till"}, "tillNumber"),
        ({"businessShortcode": "12ab5"}, "businessShortcode"), ({"consentDate": None}, "consentDate")]
    for change, field in refusals:
        with pytest.raises(InvalidInput) as refused:
            await onboarding.create_channel(paybill_body(channel_id, **change), "tests")
        assert field in refused.value.errors
    with pytest.raises(NotFound):
        await onboarding.channel(channel_id)
    assert await audit_of(pool, channel_id) == []


async def test_a_refused_update_leaves_the_channel_as_it_was(onboarding, unique):
    channel_id = f"shop-{unique}"
    before = await onboarding.create_channel(paybill_body(channel_id), "tests")
    with pytest.raises(InvalidInput) as refused:
        await onboarding.update_channel(channel_id, {"displayName": "New name", "tillNumber": "5123456"}, "tests")
    assert set(refused.value.errors) == {"tillNumber"}
    assert (await onboarding.channel(channel_id)).view() == before.view()

    changed = await onboarding.update_channel(channel_id, {"shortcodeType": "till", "tillNumber": "5123456"}, "tests")
    assert changed.channel.shortcode.party_b == "5123456"


async def test_activation_needs_consent_and_credentials(onboarding, pool, creds, unique):
    channel_id = f"shop-{unique}"
    body = {k: v for k, v in paybill_body(channel_id).items() if not k.startswith("consent")}
    await onboarding.create_channel(body, "tests")
    with pytest.raises(InvalidInput) as refused:
        await onboarding.resume(channel_id, "tests")
    assert set(refused.value.errors) == {"consentReference", "credentials"}
    assert (await onboarding.channel(channel_id)).channel.status == "onboarding"

    await onboarding.update_channel(channel_id, {"consentReference": "AGR-9", "consentDate": "2024-06-01"}, "tests")
    await onboarding.set_credentials(channel_id, creds.body, "tests")
    assert (await onboarding.resume(channel_id, "tests")).channel.status == "active"
    assert (await onboarding.suspend(channel_id, "tests")).channel.status == "suspended"
    assert (await onboarding.resume(channel_id, "tests")).channel.status == "active"
    with pytest.raises(InvalidInput, match="invalid") as refused:
        await onboarding.update_channel(channel_id, {"consentReference": None, "consentDate": None}, "tests")
    assert "consentReference" in refused.value.errors
    actions = [row[0] for row in await audit_of(pool, channel_id)]
    assert actions == ["channel_created", "channel_updated", "credentials_set", "channel_activated",
                       "channel_suspended", "channel_activated"]


async def test_stored_credentials_never_contain_the_plaintext(onboarding, pool, creds, unique):
    channel_id = await onboard(onboarding, f"shop-{unique}", creds)
    await onboarding.rotate_credentials(channel_id, new_secrets().body, "tests")
    stored = await table_bytes(pool, "channel_credentials", "channel_id", channel_id)
    assert (await onboarding.channel(channel_id)).credentials.fingerprint.encode() in stored  # the right rows
    assert_no_secret(stored, *creds.values)
    for table in ("channels", "credential_audit"):
        assert_no_secret(await table_bytes(pool, table, "channel_id", channel_id), *creds.values)


async def test_credentials_are_set_once_then_rotated_as_new_versions(onboarding, pool, creds, unique):
    channel_id = await onboard(onboarding, f"shop-{unique}", creds)
    with pytest.raises(Conflict, match="rotate them instead"):
        await onboarding.set_credentials(channel_id, new_secrets().body, "tests")
    rotated = await onboarding.rotate_credentials(channel_id, new_secrets().body, "ops-person")
    assert rotated.credentials.version == 2 and rotated.credentials.created_by == "ops-person"
    audit = await audit_of(pool, channel_id)
    assert [(a[0], a[1]) for a in audit if a[0].startswith("credentials")] == [
        ("credentials_set", 1), ("credentials_rotated", 2)]
    await onboarding.create_channel(paybill_body(f"other-{unique}"), "tests")
    with pytest.raises(Conflict, match="no credentials to rotate"):
        await onboarding.rotate_credentials(f"other-{unique}", creds.body, "tests")


async def test_bad_credentials_input_is_refused_by_field(onboarding, pool, unique):
    channel_id = f"shop-{unique}"
    await onboarding.create_channel(paybill_body(channel_id), "tests")
    with pytest.raises(InvalidInput) as refused:
        await onboarding.set_credentials(channel_id, {"consumerKey": "k", "passkey": "has space"}, "tests")
    assert set(refused.value.errors) == {"consumerSecret", "passkey"}
    assert (await onboarding.channel(channel_id)).credentials is None


async def test_without_the_vault_public_key_nothing_is_stored(onboarding_pool, creds, unique, tmp_path):
    onboarding = Onboarding(onboarding_pool, public_key_file=tmp_path / "absent.pub.json")
    channel_id = f"shop-{unique}"
    await onboarding.create_channel(paybill_body(channel_id), "tests")
    with pytest.raises(DependencyUnavailable, match="no vault public key at .*vault init"):
        await onboarding.set_credentials(channel_id, creds.body, "tests")
    assert (await onboarding.channel(channel_id)).credentials is None


async def test_credentials_daraja_refuses_are_not_stored(onboarding, pool, creds, unique):
    channel_id = f"shop-{unique}"
    await onboarding.create_channel(paybill_body(channel_id), "tests")
    with pytest.raises(CredentialsRefused) as refused:  # never registered with the sandbox
        await onboarding.set_credentials(channel_id, {**creds.body, "validate": True}, "tests")
    assert "400.008.01" in refused.value.detail and "nothing was stored" in refused.value.detail
    assert_no_secret(refused.value.detail, *creds.values)
    assert (await onboarding.channel(channel_id)).credentials is None
    assert [row[0] for row in await audit_of(pool, channel_id)] == ["channel_created", "credentials_refused"]


async def test_credentials_daraja_accepts_are_stored_as_validated(onboarding, pool, registered_app, unique):
    channel_id = f"shop-{unique}"
    await onboarding.create_channel(paybill_body(channel_id), "tests")
    record = await onboarding.set_credentials(channel_id, {**registered_app.body, "validate": True}, "tests")
    assert record.credentials.validated_at is not None
    assert [row[0] for row in await audit_of(pool, channel_id)][-2:] == ["credentials_validated", "credentials_set"]


async def test_an_unreachable_daraja_is_not_a_refusal(onboarding_pool, provider, key_file, creds, unique):
    onboarding = Onboarding(onboarding_pool, public_key_file=public_key_path(key_file),
                            credential_check=daraja_credential_check(f"http://127.0.0.1:{free_port()}"))
    channel_id = f"shop-{unique}"
    await onboarding.create_channel(paybill_body(channel_id), "tests")
    with pytest.raises(DependencyUnavailable, match="could not be asked"):
        await onboarding.set_credentials(channel_id, {**creds.body, "validate": True}, "tests")
    assert (await onboarding.channel(channel_id)).credentials is None


@pytest.mark.parametrize("values, constraint", [
    ("'till', NULL, 'onboarding', NULL, NULL", "channels_check"),  # a till without its till number
    ("'paybill', NULL, 'active', NULL, NULL", "channels_check2"),  # active without consent
    ("'paybill', NULL, 'onboarding', 'AGR-1', NULL", "channels_check1"),  # consent without date
])
async def test_the_database_refuses_what_the_model_refuses(database_url, unique, values, constraint):
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.CheckViolation, match=constraint):
        conn.execute("INSERT INTO channels (channel_id, display_name, environment, business_shortcode, shortcode_type,"
                     " till_number, status, consent_reference, consent_date, agreement_reference, agreement_version,"
                     f" agreement_signed_on, lawful_basis) VALUES (%s, 'x', 'sandbox', '174379', {values},"
                     " 'DPA-1', '1', '2024-01-01', 'contract')", (f"db-{unique}",))


async def test_the_audit_trail_cannot_be_edited_or_deleted(onboarding, pool, database_url, unique):
    channel_id = f"shop-{unique}"
    await onboarding.create_channel(paybill_body(channel_id), "tests")
    for statement in ("UPDATE credential_audit SET actor = 'someone else' WHERE channel_id = %s",
                      "DELETE FROM credential_audit WHERE channel_id = %s"):
        with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute(statement, (channel_id,))
    assert [row[2] for row in await audit_of(pool, channel_id)] == ["tests"]


async def test_api_keys_are_stored_hashed_and_scoped_to_existing_channels(onboarding, pool, unique):
    channel_id = f"shop-{unique}"
    await onboarding.create_channel(paybill_body(channel_id), "tests")
    with pytest.raises(InvalidInput) as refused:
        await onboarding.issue_api_key({"label": "web", "channelIds": [channel_id, f"ghost-{unique}"]}, "tests")
    assert f"ghost-{unique}" in refused.value.errors["channelIds"]
    view, api_key = await onboarding.issue_api_key({"label": "web", "channelIds": [channel_id]}, "tests")
    assert api_key.startswith(f"mpk_{view['keyId']}_")
    assert_no_secret(await table_bytes(pool, "api_keys", "key_id", view["keyId"]), api_key)
    listed = [k for k in await onboarding.api_keys() if k["keyId"] == view["keyId"]]
    assert listed == [view] and "apiKey" not in view
    revoked = await onboarding.revoke_api_key(view["keyId"], "tests")
    assert revoked["revokedBy"] == "tests"
    with pytest.raises(NotFound):
        await onboarding.revoke_api_key("000000000000", "tests")
