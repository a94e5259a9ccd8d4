"""The STK worker's CredentialStore against the real PostgreSQL: it decrypts once per version and
audits each decryption; a tampered, moved or foreign row fails with a clear error (audited too);
credential rotation and KEK rotation keep every version readable."""
from __future__ import annotations

import asyncio

import pytest

from services.channels.credentials import CredentialStore, CredentialsUnavailable
from services.channels.rotation import rotate_kek
from services.channels.vault import DecryptionFailed, KeyNotHeld, LocalKeyFileProvider
from tests.channels.conftest import assert_no_secret, audit_of, new_secrets, onboard


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_worker_decrypts_once_and_serves_the_rest_from_memory(onboarding, pool, stk_worker_pool, provider,
                                                                        creds, unique):
    channel_id = await onboard(onboarding, f"shop-{unique}", creds)
    store = CredentialStore(stk_worker_pool, provider, actor="stk-worker-test")
    results = await asyncio.gather(*(store.get(channel_id) for _ in range(50)))  # cold cache, concurrent
    results += [await store.get(channel_id) for _ in range(50)]
    assert {(r.version, r.app) for r in results} == {(1, creds.app)}
    assert store.decryptions == 1
    decrypted = [row for row in await audit_of(pool, channel_id) if row[0] == "credentials_decrypted"]
    assert [(row[1], row[2], row[3]) for row in decrypted] == [(1, "stk-worker-test", provider.key_id)]


async def test_a_rotation_is_seen_after_the_ttl_and_the_old_version_stays_readable(onboarding, pool, stk_worker_pool,
                                                                                   provider, creds, unique):
    channel_id = await onboard(onboarding, f"shop-{unique}", creds)
    clock = FakeClock()
    store = CredentialStore(stk_worker_pool, provider, ttl_s=30, clock=clock)
    assert (await store.get(channel_id)).version == 1
    newer = new_secrets()
    await onboarding.rotate_credentials(channel_id, newer.body, "tests")
    assert (await store.get(channel_id)).app == creds.app  # still within the TTL
    clock.now += 31
    current = await store.get(channel_id)
    assert (current.version, current.app) == (2, newer.app)
    assert (await store.get_version(channel_id, 1)).app == creds.app  # in-flight work
    assert store.decryptions == 2
    assert (await CredentialStore(stk_worker_pool, provider).get_version(channel_id, 1)).app == creds.app


async def test_invalidate_and_suspension_are_seen_at_once(onboarding, pool, stk_worker_pool, provider, creds, unique):
    channel_id = await onboard(onboarding, f"shop-{unique}", creds)
    await onboarding.resume(channel_id, "tests")
    store = CredentialStore(stk_worker_pool, provider, ttl_s=3600)
    assert (await store.get(channel_id)).can_push
    await onboarding.suspend(channel_id, "tests")
    store.invalidate(channel_id)
    suspended = await store.get(channel_id)
    assert not suspended.can_push and suspended.app == creds.app
    assert store.decryptions == 1  # a re-read of the channel is not a decryption


async def test_a_tampered_row_fails_clearly_and_the_failure_is_audited(onboarding, pool, stk_worker_pool, provider,
                                                                       creds, unique):
    channel_id = await onboard(onboarding, f"shop-{unique}", creds)
    async with pool.connection() as conn:
        await conn.execute("UPDATE channel_credentials SET ciphertext = set_byte(ciphertext, 2,"
                           " get_byte(ciphertext, 2) # 1) WHERE channel_id = %s", (channel_id,))
    store = CredentialStore(stk_worker_pool, provider)
    for _ in range(3):  # three payments meet the broken row; one audit entry per TTL, not per payment
        with pytest.raises(DecryptionFailed) as failed:
            await store.get(channel_id)
        assert f"channel {channel_id!r} version 1 fail authentication" in str(failed.value)
        assert_no_secret(str(failed.value), *creds.values)
    failures = [row for row in await audit_of(pool, channel_id) if row[0] == "credentials_decrypt_failed"]
    assert len(failures) == 1 and "altered" in failures[0][4]


async def test_a_row_copied_to_another_channel_fails_to_decrypt(onboarding, pool, stk_worker_pool, provider, creds,
                                                                unique):
    victim = await onboard(onboarding, f"victim-{unique}", creds)
    thief = await onboard(onboarding, f"thief-{unique}", new_secrets())
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO channel_credentials (channel_id, version, key_id, wrapped_key, nonce, ciphertext, fingerprint,"
            " app_key_id, created_by) SELECT %s, 2, key_id, wrapped_key, nonce, ciphertext, fingerprint, app_key_id,"
            " 'attacker' FROM channel_credentials WHERE channel_id = %s AND version = 1", (thief, victim))
    with pytest.raises(DecryptionFailed, match=f"channel '{thief}' version 2"):
        await CredentialStore(stk_worker_pool, provider).get(thief)


async def test_a_wrong_key_file_fails_clearly(onboarding, pool, stk_worker_pool, provider, creds, unique, tmp_path):
    channel_id = await onboard(onboarding, f"shop-{unique}", creds)
    stranger = LocalKeyFileProvider.open(tmp_path / "elsewhere" / "kek.json", create=True)
    with pytest.raises(KeyNotHeld) as failed:
        await CredentialStore(stk_worker_pool, stranger).get(channel_id)
    assert provider.key_id in str(failed.value) and "wrong or outdated key file" in str(failed.value)


async def test_unknown_channels_and_versions_are_reported(onboarding, pool, stk_worker_pool, provider, creds, unique):
    store = CredentialStore(stk_worker_pool, provider)
    with pytest.raises(CredentialsUnavailable, match="no channel"):
        await store.get(f"ghost-{unique}")
    channel_id = await onboard(onboarding, f"shop-{unique}", creds)
    with pytest.raises(CredentialsUnavailable, match="no credentials version 9"):
        await store.get_version(channel_id, 9)


async def test_kek_rotation_rewraps_every_version_and_everything_stays_readable(onboarding, pool, stk_worker_pool,
                                                                                onboarding_pool, provider, key_file,
                                                                                creds, unique):
    first = await onboard(onboarding, f"one-{unique}", creds)
    second_v1, second_v2 = new_secrets(), new_secrets()
    second = await onboard(onboarding, f"two-{unique}", second_v1)
    await onboarding.rotate_credentials(second, second_v2.body, "tests")
    # a worker started before the rotation
    running = CredentialStore(stk_worker_pool, LocalKeyFileProvider.open(key_file))
    old_key = provider.key_id

    report = await rotate_kek(onboarding_pool, LocalKeyFileProvider.open(key_file), "ops", retire_old=True)

    assert sorted(report.rewrapped) == [(first, 1), (second, 1), (second, 2)]
    assert report.failed == [] and report.retired == [old_key]
    assert LocalKeyFileProvider.open(key_file).key_ids == (report.active_key_id,)
    for store in (running, CredentialStore(stk_worker_pool, LocalKeyFileProvider.open(key_file))):
        assert (await store.get(first)).app == creds.app
        assert (await store.get_version(second, 1)).app == second_v1.app
        assert (await store.get(second)).app == second_v2.app
    rewrapped = [row for row in await audit_of(pool, second) if row[0] == "credentials_rewrapped"]
    assert [(row[1], row[3], row[4]) for row in rewrapped] == [(1, report.active_key_id, f"from {old_key}"),
                                                                (2, report.active_key_id, f"from {old_key}")]
    # New credentials are sealed to the new key through the refreshed public key file.
    third = await onboard(onboarding, f"three-{unique}", new_secrets())
    assert (await onboarding.channel(third)).credentials.kek_id == report.active_key_id


async def test_kek_rotation_reports_a_row_it_cannot_unwrap_and_keeps_the_old_key(onboarding, pool, stk_worker_pool,
                                                                                 onboarding_pool, provider, key_file,
                                                                                 creds, unique):
    good = await onboard(onboarding, f"good-{unique}", creds)
    bad = await onboard(onboarding, f"bad-{unique}", new_secrets())
    async with pool.connection() as conn:
        await conn.execute("UPDATE channel_credentials SET wrapped_key = set_byte(wrapped_key, 40,"
                           " get_byte(wrapped_key, 40) # 1) WHERE channel_id = %s", (bad,))
    old_key = provider.key_id

    report = await rotate_kek(onboarding_pool, LocalKeyFileProvider.open(key_file), "ops", retire_old=True)

    assert report.rewrapped == [(good, 1)] and [(c, v) for c, v, _ in report.failed] == [(bad, 1)]
    assert not report.complete and report.retired == []
    assert old_key in LocalKeyFileProvider.open(key_file).key_ids
    assert (await CredentialStore(stk_worker_pool, LocalKeyFileProvider.open(key_file)).get(good)).app == creds.app
    assert [row[0] for row in await audit_of(pool, bad)][-1] == "credentials_rewrap_failed"


def test_credentials_never_show_in_reprs(creds):
    from services.channels.credentials import ChannelCredentials
    from services.channels.model import Channel
    shown = repr(ChannelCredentials(Channel("shop", "Shop", "paybill", "174379", "sandbox"), creds.app, 3))
    assert "version=3" in shown
    assert_no_secret(shown + str(ChannelCredentials(Channel("s", "S", "paybill", "174379", "sandbox"), creds.app, 1)),
                     creds.consumer_secret, creds.passkey, creds.consumer_key)
