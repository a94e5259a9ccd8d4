"""What the notifier does about an endpoint it cannot serve: a signing secret that does not open
holds its deliveries (audited, counted, never logged), and an endpoint that fails for the whole
retry window is disabled (audited, in the gauge) with its deliveries left pending for `enable`."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from prometheus_client import REGISTRY

from services.channels.vault import LocalKeyFileProvider
from services.common.ids import new_id
from services.common.topics import PAYMENT_STATUS
from services.notifier.deliveries import Endpoint
from services.notifier.events import EVENT_TYPES
from services.notifier.secrets import fingerprint, new_secret, seal_secret
from services.notifier.signing import CachedSigningSecrets
from services.notifier.store import NotifierStore, SealedSecret
from tests.conftest import eventually
from tests.notifier.conftest import (
    Behaviour,
    channel_with_endpoint,
    consumed,
    delivery_rows,
    notifier_config,
    notifier_process,
    publish_payments,
    running_notifier,
    status_event,
)
from tests.notifier.fakes import met


async def audit_rows(pool, endpoint_id: str, action: str) -> list[tuple]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT actor, channel_id, detail FROM credential_audit"
                                 " WHERE webhook_endpoint_id = %s AND action = %s", (endpoint_id, action))
        return await cur.fetchall()


async def test_a_secret_that_does_not_open_holds_the_deliveries_and_is_audited_without_the_secret(
        infra, pool, receiver, key_file, producer, codec, caplog):
    # Sealed for another endpoint: the vault's associated data does not match, it fails to open.
    channel, endpoint_id = await channel_with_endpoint(pool, key_file, receiver, "badseal",
                                                       sealed_for="ep_" + "0" * 20)
    secret = receiver.secrets[channel]
    event = status_event(channel, new_id(), "Pending")
    cfg = notifier_config(infra, key_file)
    caplog.set_level(logging.INFO)
    async with running_notifier(cfg, producer, codec) as notifier:
        await producer.publish(PAYMENT_STATUS, event)
        await eventually(lambda: audit_rows(pool, endpoint_id, "webhook_secret_decrypt_failed"), timeout=30)

        async def waiting() -> list:
            rows = await delivery_rows(pool, [event["event_id"]])
            return rows if rows and rows[0]["last_error"] and rows[0]["leased_by"] is None else []
        [row] = await eventually(waiting, timeout=60)
        # The waiting delivery counts in the age of the oldest undelivered one.
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT EXTRACT(EPOCH FROM now() - created_at)::float8 FROM webhook_deliveries"
                                     " WHERE id = %s", (row["id"],))
            age_s = (await cur.fetchone())[0]
        await notifier.poller.sample()
        assert REGISTRY.get_sample_value("webhook_oldest_undelivered_seconds") >= age_s > 0
    assert (row["state"], row["attempts"]) == ("pending", 0)  # not an attempt: never parked for it
    assert "cannot be opened" in row["last_error"] and secret not in row["last_error"]
    [(actor, audited_channel, detail)] = await audit_rows(pool, endpoint_id, "webhook_secret_decrypt_failed")
    assert (actor, audited_channel) == ("notifier", channel) and secret not in detail
    assert receiver.arrivals == []
    assert secret not in caplog.text and secret.removeprefix("whsec_") not in caplog.text
    assert (REGISTRY.get_sample_value("webhook_secret_failures_total", {"endpoint": endpoint_id}) or 0) >= 1


async def test_an_endpoint_failing_for_the_whole_retry_window_is_disabled_and_its_deliveries_wait(
        infra, pool, receiver, key_file, producer, codec):
    channel, endpoint_id = await channel_with_endpoint(pool, key_file, receiver, "hopeless")
    receiver.behaviours[channel] = Behaviour(status=503)
    cfg = notifier_config(infra, key_file, NOTIFIER_RETRY_WINDOW_S=2)
    async with running_notifier(cfg, producer, codec) as notifier:
        async def disabled() -> bool:
            # New events keep coming, so attempts keep failing until the window has passed.
            await publish_payments(producer, channel, 1, ("Pending",))
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT status, disabled_reason, failing_since FROM webhook_endpoints"
                                         " WHERE endpoint_id = %s", (endpoint_id,))
                status, reason, since = await cur.fetchone()
            return status == "disabled" and reason and since
        await eventually(disabled, timeout=60, interval=0.3)
        [(actor, audited_channel, _)] = await audit_rows(pool, endpoint_id, "webhook_endpoint_auto_disabled")
        assert (actor, audited_channel) == ("notifier", channel)
        await notifier.poller.sample()
        assert (REGISTRY.get_sample_value("webhook_endpoints_disabled") or 0) >= 1
        # Its deliveries wait, unattempted, for an operator to enable it again.
        seen = len(receiver.arrivals)
        late = status_event(channel, new_id(), "Pending")
        await producer.publish(PAYMENT_STATUS, late)
        await asyncio.sleep(1.0)
        assert len(receiver.arrivals) == seen
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = %s AND state = 'pending'"
                                 " AND leased_by IS NULL", (endpoint_id,))
        assert (await cur.fetchone())[0] >= 1


async def test_a_failure_days_after_the_last_one_on_a_quiet_endpoint_does_not_disable_it(
        infra, pool, receiver, key_file):
    """An endpoint failed once four days ago and has had no traffic since: one 503 now starts a new
    failing run instead of counting as four days of failing (a disabled endpoint gets no new events)."""
    channel, endpoint_id = await channel_with_endpoint(pool, key_file, receiver, "quiet")
    async with pool.connection() as conn:
        await conn.execute("UPDATE webhook_endpoints SET failing_since = now() - interval '4 days',"
                           " last_failed_at = now() - interval '4 days' WHERE endpoint_id = %s", (endpoint_id,))
    receiver.behaviours[channel] = Behaviour(status=503)
    event = status_event(channel, new_id(), "Pending")
    async with notifier_process(notifier_config(infra, key_file), "quiet") as notifier:
        assert await notifier.enqueuer.handle_batch([consumed(event, 1)]) == []
        await eventually(lambda: met(len(receiver.at(channel)) == 1), timeout=60)
        receiver.behaviours[channel] = Behaviour(status=200)

        async def delivered() -> bool:
            return (await delivery_rows(pool, [event["event_id"]]))[0]["state"] == "delivered"
        await eventually(delivered, timeout=60)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT status, failing_since FROM webhook_endpoints WHERE endpoint_id = %s",
                                 (endpoint_id,))
        assert await cur.fetchone() == ("enabled", None)
    assert await audit_rows(pool, endpoint_id, "webhook_endpoint_auto_disabled") == []


async def test_a_secret_past_its_overlap_by_the_databases_clock_no_longer_signs_whatever_the_notifiers_clock(
        infra, pool, receiver, key_file):
    """The overlap's end is written in database time (the rotation); a notifier whose clock is behind
    must not keep signing with the old secret past it (a receiver's verification must fail then)."""
    channel, endpoint_id = await channel_with_endpoint(pool, key_file, receiver, "skew")
    newer = new_secret()
    sealed = seal_secret(newer, endpoint_id, 2, LocalKeyFileProvider.open(key_file).public_wrapper())
    async with pool.connection() as conn:
        await conn.execute("UPDATE webhook_secrets SET expires_at = now() - interval '1 minute'"
                           " WHERE endpoint_id = %s AND version = 1", (endpoint_id,))
        await conn.execute("INSERT INTO webhook_secrets (endpoint_id, version, key_id, wrapped_key, nonce, ciphertext,"
                           " fingerprint, created_by) VALUES (%s, 2, %s, %s, %s, %s, %s, 'tests')",
                           (endpoint_id, sealed.key_id, sealed.wrapped_key, sealed.nonce, sealed.ciphertext,
                            fingerprint(newer)))
    endpoint = Endpoint(endpoint_id, channel, receiver.url(channel), frozenset(EVENT_TYPES))
    secrets = CachedSigningSecrets(NotifierStore(pool, "skew"), LocalKeyFileProvider.open(key_file), 10.0)
    assert await secrets.for_endpoint(endpoint) == [newer]

    class BehindTheDatabase(NotifierStore):  # the notifier's clock two hours behind the database's
        async def secrets_of(self, endpoint_id: str) -> tuple[list[SealedSecret], datetime]:
            versions, now = await super().secrets_of(endpoint_id)
            skewed = [replace(v, expires_at=datetime.now(timezone.utc) + timedelta(hours=1)) if v.version == 1
                      else v for v in versions]  # past in database time, future in the notifier's
            return skewed, now + timedelta(hours=2)

    secrets = CachedSigningSecrets(BehindTheDatabase(pool, "skew"), LocalKeyFileProvider.open(key_file), 10.0)
    assert await secrets.for_endpoint(endpoint) == [newer]
