"""Rotating the notifier's key-encryption key (real PostgreSQL): webhook signing secrets re-wrapped
without being decrypted and still opening to the same secret after the old key is retired; a
retirement that would strand a row of either sealed table refused whichever keyring and table the
operator named; a tampered row reported and audited; `vault status` per table; and secret writes
waiting for the KEK lock."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from services.channels import repository as repo
from services.channels.credentials import CredentialStore
from services.channels.onboarding import Onboarding
from services.channels.repository import WEBHOOK_SECRETS
from services.channels.rotation import retire_old_keys, rotate_kek
from services.channels.vault import LocalKeyFileProvider, public_key_path
from services.channels.webhooks import WebhookManagement
from services.notifier.destinations import DestinationPolicy, parse_networks
from services.notifier.secrets import open_secret
from tests.channels.conftest import LOOPBACK_NETWORKS, onboard, paybill_body
from tests.conftest import ROOT, database_url_of, eventually

HOOK = "http://127.0.0.1:8099/hook"


@pytest.fixture
def management(onboarding_pool, webhook_key_file, webhook_provider) -> WebhookManagement:
    return WebhookManagement(onboarding_pool, public_key_file=public_key_path(webhook_key_file),
                             policy=DestinationPolicy(parse_networks(LOOPBACK_NETWORKS)))


async def new_channel(onboarding_pool, tmp_path, channel_id: str) -> str:
    onboarding = Onboarding(onboarding_pool, public_key_file=tmp_path / "no-channel-vault.pub.json")
    await onboarding.create_channel(paybill_body(channel_id), "tests")
    return channel_id


async def add_endpoint(management: WebhookManagement, channel_id: str, path: str = "hook") -> tuple[str, str]:
    record, secret = await management.add_endpoint(channel_id, {"url": f"http://127.0.0.1:8099/{path}"}, "tests")
    return record.endpoint_id, secret


async def sealed(pool, endpoint_id: str, version: int):
    async with pool.connection() as conn:
        row = await repo.sealed_credentials(conn, endpoint_id, version, table=WEBHOOK_SECRETS)
    assert row is not None
    return row


async def webhook_audit(pool, endpoint_id: str) -> list[tuple]:
    """(action, version, kek_id, detail) for an endpoint, oldest first."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT action, version, kek_id, detail FROM credential_audit"
                                 " WHERE webhook_endpoint_id = %s ORDER BY id", (endpoint_id,))
        return await cur.fetchall()


async def test_rotating_the_notifiers_kek_rewraps_every_secret_and_each_opens_to_the_same_secret(
        management, onboarding_pool, pool, webhook_key_file, webhook_provider, tmp_path, unique):
    channel_id = await new_channel(onboarding_pool, tmp_path, f"kek-{unique}")
    first, first_secret = await add_endpoint(management, channel_id, "one")
    second, second_v1 = await add_endpoint(management, channel_id, "two")
    _, second_v2 = await management.rotate_secret(second, {"overlapSeconds": 3600}, "tests")
    running = LocalKeyFileProvider.open(webhook_key_file)  # a notifier started before the rotation
    old_key = webhook_provider.key_id
    before = await sealed(pool, second, 1)

    report = await rotate_kek(onboarding_pool, LocalKeyFileProvider.open(webhook_key_file), "ops", retire_old=True,
                              table=WEBHOOK_SECRETS)

    assert sorted(report.rewrapped) == sorted([(first, 1), (second, 1), (second, 2)])
    assert report.failed == [] and report.retired == [old_key]
    assert LocalKeyFileProvider.open(webhook_key_file).key_ids == (report.active_key_id,)
    after = await sealed(pool, second, 1)
    # Only the data key moved: the secret's own ciphertext was never decrypted and sealed again.
    assert (after.key_id, after.nonce, after.ciphertext) == (report.active_key_id, before.nonce, before.ciphertext)
    for notifier in (running, LocalKeyFileProvider.open(webhook_key_file)):
        assert open_secret(await sealed(pool, first, 1), first, 1, notifier) == first_secret
        assert open_secret(await sealed(pool, second, 1), second, 1, notifier) == second_v1
        assert open_secret(await sealed(pool, second, 2), second, 2, notifier) == second_v2
    rewrapped = [row for row in await webhook_audit(pool, second) if row[0] == "webhook_secret_rewrapped"]
    assert [(row[1], row[2], row[3]) for row in rewrapped] == [(1, report.active_key_id, f"from {old_key}"),
                                                                (2, report.active_key_id, f"from {old_key}")]
    # New secrets are sealed to the new key through the refreshed public key file.
    third, third_secret = await add_endpoint(management, channel_id, "three")
    assert (await sealed(pool, third, 1)).key_id == report.active_key_id


async def test_a_tampered_secret_is_reported_and_audited_and_the_others_rewrapped(
        management, onboarding_pool, pool, webhook_key_file, webhook_provider, tmp_path, unique):
    channel_id = await new_channel(onboarding_pool, tmp_path, f"kek-{unique}")
    good, good_secret = await add_endpoint(management, channel_id, "good")
    bad, _ = await add_endpoint(management, channel_id, "bad")
    moved, _ = await add_endpoint(management, channel_id, "moved")
    async with pool.connection() as conn:
        await conn.execute("UPDATE webhook_secrets SET wrapped_key = set_byte(wrapped_key, 40,"
                           " get_byte(wrapped_key, 40) # 1) WHERE endpoint_id = %s", (bad,))
        # Another endpoint's sealed secret copied over this one: bound to (endpoint, version), it fails.
        await conn.execute("UPDATE webhook_secrets m SET wrapped_key = g.wrapped_key, nonce = g.nonce,"
                           " ciphertext = g.ciphertext FROM webhook_secrets g WHERE m.endpoint_id = %s"
                           " AND g.endpoint_id = %s", (moved, good))
    old_key = webhook_provider.key_id

    report = await rotate_kek(onboarding_pool, LocalKeyFileProvider.open(webhook_key_file), "ops", retire_old=True,
                              table=WEBHOOK_SECRETS)

    assert report.rewrapped == [(good, 1)]
    assert sorted((o, v) for o, v, _ in report.failed) == sorted([(bad, 1), (moved, 1)])
    assert all("signing secret of webhook endpoint" in why for _, _, why in report.failed)
    assert not report.complete and report.retired == []
    assert old_key in LocalKeyFileProvider.open(webhook_key_file).key_ids
    assert open_secret(await sealed(pool, good, 1), good, 1, LocalKeyFileProvider.open(webhook_key_file)) == good_secret
    failed = (await webhook_audit(pool, bad))[-1]
    assert (failed[0], failed[1], failed[2]) == ("webhook_secret_rewrap_failed", 1, old_key)


async def test_no_key_a_row_uses_is_retired_whichever_table_the_rotation_named(
        management, onboarding, onboarding_pool, pool, stk_worker_pool, provider, key_file, creds, webhook_key_file,
        webhook_provider, tmp_path, unique):
    channel_id = await onboard(onboarding, f"kek-{unique}", creds)
    endpoint_id, secret = await add_endpoint(management, channel_id)
    old_webhook_key, old_credentials_key = webhook_provider.key_id, provider.key_id

    # The notifier's keyring rotated as if it sealed credentials, then the STK worker's as if it
    # sealed webhook secrets: each re-wraps nothing of its own, and must retire nothing in use.
    wrong_table = await rotate_kek(onboarding_pool, LocalKeyFileProvider.open(webhook_key_file), "ops",
                                   retire_old=True)
    wrong_keyring = await rotate_kek(onboarding_pool, LocalKeyFileProvider.open(key_file), "ops", retire_old=True,
                                     table=WEBHOOK_SECRETS)

    assert wrong_table.rewrapped == [] and wrong_table.retired == []
    assert wrong_keyring.rewrapped == [] and wrong_keyring.retired == []
    assert old_webhook_key in LocalKeyFileProvider.open(webhook_key_file).key_ids
    assert old_credentials_key in LocalKeyFileProvider.open(key_file).key_ids
    notifier = LocalKeyFileProvider.open(webhook_key_file)
    assert open_secret(await sealed(pool, endpoint_id, 1), endpoint_id, 1, notifier) == secret
    assert (await CredentialStore(stk_worker_pool, LocalKeyFileProvider.open(key_file)).get(channel_id)).app == \
        creds.app


async def test_retiring_after_the_sealing_side_got_the_new_public_half_rewraps_what_it_sealed_meanwhile(
        onboarding_pool, pool, webhook_key_file, webhook_provider, tmp_path, unique):
    # The onboarding side reads a copy of the public half (another host, the Docker volume).
    copy = tmp_path / "onboarding" / "webhooks-kek.pub.json"
    copy.parent.mkdir()
    copy.write_text(public_key_path(webhook_key_file).read_text())
    stale = WebhookManagement(onboarding_pool, public_key_file=copy,
                              policy=DestinationPolicy(parse_networks(LOOPBACK_NETWORKS)))
    channel_id = await new_channel(onboarding_pool, tmp_path, f"kek-{unique}")
    before, before_secret = await add_endpoint(stale, channel_id, "before")
    old_key = webhook_provider.key_id

    rotation = await rotate_kek(onboarding_pool, LocalKeyFileProvider.open(webhook_key_file), "ops",
                                table=WEBHOOK_SECRETS)
    meanwhile, meanwhile_secret = await add_endpoint(stale, channel_id, "meanwhile")  # sealed to the old key
    copy.write_text(public_key_path(webhook_key_file).read_text())
    report = await retire_old_keys(onboarding_pool, LocalKeyFileProvider.open(webhook_key_file), "ops",
                                   table=WEBHOOK_SECRETS)

    assert rotation.rewrapped == [(before, 1)] and report.rewrapped == [(meanwhile, 1)]
    assert report.retired == [old_key] and report.active_key_id == rotation.active_key_id
    notifier = LocalKeyFileProvider.open(webhook_key_file)
    assert notifier.key_ids == (rotation.active_key_id,)
    assert open_secret(await sealed(pool, before, 1), before, 1, notifier) == before_secret
    assert open_secret(await sealed(pool, meanwhile, 1), meanwhile, 1, notifier) == meanwhile_secret


async def test_a_secret_write_waits_for_a_retirement_and_seals_to_the_key_read_after_it(
        management, onboarding_pool, pool, webhook_key_file, webhook_provider, tmp_path, unique):
    channel_id = await new_channel(onboarding_pool, tmp_path, f"kek-{unique}")
    async with pool.connection() as conn, conn.transaction():
        await repo.lock_keks(conn, exclusive=True)  # what retire_unused_keys holds while it checks the keys
        adding = asyncio.create_task(add_endpoint(management, channel_id))
        await eventually(lambda: _waiting_for_advisory_lock(pool))
        assert not adding.done()
        new_key = webhook_provider.add_key()  # a rotation finishing while the write waits
    endpoint_id, _ = await adding
    assert (await sealed(pool, endpoint_id, 1)).key_id == new_key


async def _waiting_for_advisory_lock(pool) -> bool:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        return (await cur.fetchone())[0] > 0


# The commands, as an operator runs them.

@pytest.fixture
def run(infra, key_file, provider, webhook_key_file, webhook_provider):
    env = {**os.environ, "DATABASE_URL": database_url_of(infra, "onboarding"), "VAULT_KEY_FILE": str(key_file),
           "NOTIFIER_VAULT_KEY_FILE": str(webhook_key_file)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=env)
    return run


async def test_the_vault_commands_with_webhooks_rotate_and_count_the_notifiers_rows_only(
        run, management, onboarding, onboarding_pool, pool, creds, key_file, webhook_key_file, webhook_provider,
        provider, unique):
    channel_id = await onboard(onboarding, f"kek-{unique}", creds)
    endpoint_id, secret = await add_endpoint(management, channel_id)
    old_webhook_key = webhook_provider.key_id

    credentials = json.loads(run("vault", "status").stdout)
    webhooks = json.loads(run("vault", "status", "--webhooks").stdout)
    assert (credentials["table"], credentials["versionsPerKey"]) == ("channel_credentials", {provider.key_id: 1})
    assert (webhooks["table"], webhooks["versionsPerKey"]) == ("webhook_secrets", {old_webhook_key: 1})
    assert webhooks["keyFile"] == str(webhook_key_file)

    # The command that once retired the notifier's key with every secret still wrapped by it.
    stranding = run("vault", "rotate-kek", "--key-file", str(webhook_key_file), "--retire-old")
    assert json.loads(stranding.stdout)["retiredKeyIds"] == [], stranding.stdout
    assert old_webhook_key in LocalKeyFileProvider.open(webhook_key_file).key_ids

    result = run("vault", "rotate-kek", "--webhooks", "--retire-old")
    report = json.loads(result.stdout)
    assert report["table"] == "webhook_secrets" and report["rewrapped"] == 1 and report["failed"] == [], result.stdout
    assert old_webhook_key in report["retiredKeyIds"]
    after = json.loads(run("vault", "status", "--webhooks").stdout)
    assert after["versionsPerKey"] == {report["activeKeyId"]: 1}
    assert open_secret(await sealed(pool, endpoint_id, 1), endpoint_id, 1,
                       LocalKeyFileProvider.open(webhook_key_file)) == secret
    assert json.loads(run("vault", "status").stdout)["versionsPerKey"] == {provider.key_id: 1}
