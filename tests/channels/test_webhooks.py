"""Webhook endpoint management through the admin API (aiohttp test server, real PostgreSQL): the
secret shown once and opened only with the notifier's key, destinations refused at creation,
rotation with its overlap, the audit, the delivery log and redelivery, and hostile input."""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings, strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.channels.api import create_app
from services.channels.onboarding import Onboarding
from services.channels.settings import AdminToken
from services.channels.vault import SealedCredentials, public_key_path
from services.channels.webhook_model import ENDPOINTS_PER_CHANNEL_MAX, OVERLAP_MAX_S
from services.channels.webhooks import WebhookManagement
from services.common.observability import JsonFormatter
from services.notifier.destinations import DestinationPolicy, parse_networks
from services.notifier.events import EVENT_TYPES
from services.notifier.secrets import fingerprint, open_secret
from tests.channels.conftest import LOOPBACK_NETWORKS, assert_no_secret, insert_delivery, paybill_body

ADMIN_TOKEN = secrets.token_urlsafe(32)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {**ADMIN, "Content-Type": "application/json"}
HOOK = "http://127.0.0.1:8099/hook"


def make_client(onboarding_pool, tmp_path, webhook_key_file, networks: str):
    management = WebhookManagement(onboarding_pool, public_key_file=public_key_path(webhook_key_file),
                                   policy=DestinationPolicy(parse_networks(networks)))
    onboarding = Onboarding(onboarding_pool, public_key_file=tmp_path / "no-channel-vault.pub.json")
    app = create_app(onboarding, AdminToken(hashlib.sha256(ADMIN_TOKEN.encode()).digest()), webhooks=management)
    return TestClient(TestServer(app))


@pytest.fixture
async def client(onboarding_pool, tmp_path, webhook_key_file, webhook_provider):
    async with make_client(onboarding_pool, tmp_path, webhook_key_file, LOOPBACK_NETWORKS) as test_client:
        yield test_client


@pytest.fixture
async def strict_client(onboarding_pool, tmp_path, webhook_key_file, webhook_provider):
    """As deployed by default: no network allowed besides public addresses."""
    async with make_client(onboarding_pool, tmp_path, webhook_key_file, "") as test_client:
        yield test_client


@pytest.fixture
async def channel_id(client, unique) -> str:
    channel_id = f"hooks-{unique}"
    response = await client.post("/admin/channels", headers=ADMIN, json=paybill_body(channel_id))
    assert response.status == 201, await response.text()
    return channel_id


async def add(client, channel_id: str, **body) -> dict:
    response = await client.post(f"/admin/channels/{channel_id}/webhooks", headers=ADMIN, json={"url": HOOK, **body})
    assert response.status == 201, await response.text()
    return await response.json()


async def call(client, method: str, path: str, expected: int = 200, **kwargs) -> dict:
    response = await client.request(method, path, headers=ADMIN, **kwargs)
    assert response.status == expected, await response.text()
    return await response.json()


async def sealed_rows(pool, endpoint_id: str) -> dict[int, tuple[SealedCredentials, datetime | None]]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT version, key_id, wrapped_key, nonce, ciphertext, expires_at"
                                 " FROM webhook_secrets WHERE endpoint_id = %s", (endpoint_id,))
        return {r[0]: (SealedCredentials(r[1], bytes(r[2]), bytes(r[3]), bytes(r[4])), r[5])
                for r in await cur.fetchall()}


def expiry(rows: dict[int, tuple[SealedCredentials, datetime | None]], version: int) -> datetime:
    expires_at = rows[version][1]
    assert expires_at is not None, f"version {version} has no expiry"
    return expires_at


async def audit_rows(pool, channel_id: str) -> list[tuple]:
    """(action, webhook endpoint id, version, detail) of the channel's webhook entries, oldest first."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT action, webhook_endpoint_id, version, detail FROM credential_audit"
                                 " WHERE channel_id = %s AND action LIKE 'webhook%%' ORDER BY id", (channel_id,))
        return await cur.fetchall()


async def every_byte_of_the_audit(pool) -> bytes:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT convert_to(a::text, 'UTF8') FROM credential_audit a")
        return b"\n".join(bytes(r[0]) for r in await cur.fetchall())


async def endpoint_count(pool, channel_id: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM webhook_endpoints WHERE channel_id = %s", (channel_id,))
        return (await cur.fetchone())[0]


# Creation: the secret, once

async def test_the_secret_is_shown_once_and_opens_only_with_the_notifiers_key(client, channel_id, pool,
                                                                             webhook_provider):
    response = await client.post(f"/admin/channels/{channel_id}/webhooks", headers=ADMIN,
                                 json={"url": HOOK, "description": "shop backend"})
    assert response.status == 201
    assert response.headers["Cache-Control"] == "no-store"
    created = await response.json()
    secret = created["secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    assert created["endpointId"].startswith("ep_") and created["eventTypes"] == list(EVENT_TYPES)
    assert response.headers["Location"] == f"/admin/webhooks/{created['endpointId']}"
    assert [s["version"] for s in created["signingSecrets"]] == [1]
    assert created["signingSecrets"][0]["fingerprint"] == fingerprint(secret)

    shown = await client.get(f"/admin/webhooks/{created['endpointId']}", headers=ADMIN)
    listed = await client.get(f"/admin/channels/{channel_id}/webhooks", headers=ADMIN)
    for later in (shown, listed):
        assert later.status == 200
        assert_no_secret(await later.text(), secret, secret.removeprefix("whsec_"))
    assert [e["endpointId"] for e in (await listed.json())["endpoints"]] == [created["endpointId"]]

    [(sealed, expires_at)] = (await sealed_rows(pool, created["endpointId"])).values()
    assert expires_at is None
    assert open_secret(sealed, created["endpointId"], 1, webhook_provider) == secret
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT convert_to(s::text, 'UTF8') FROM webhook_secrets s WHERE endpoint_id = %s",
                                 (created["endpointId"],))
        stored = bytes((await cur.fetchone())[0])
    assert_no_secret(stored, secret.removeprefix("whsec_"))
    assert_no_secret(await every_byte_of_the_audit(pool), secret.removeprefix("whsec_"))
    assert [(a, e, v) for a, e, v, _ in await audit_rows(pool, channel_id)] == [
        ("webhook_endpoint_created", created["endpointId"], 1)]


async def test_event_types_are_a_subset_in_one_order(client, channel_id):
    created = await add(client, channel_id, eventTypes=["payment.failed", "payment.settled", "payment.settled"])
    assert created["eventTypes"] == ["payment.settled", "payment.failed"]


# Destinations (SSRF)

REFUSED_URLS = [
    "http://127.0.0.1:8099/hook",  # loopback, not allowed here
    "https://127.0.0.1/hook",
    "https://10.0.0.5/hook", "https://192.168.1.20/hook", "https://172.16.0.1/hook",  # private
    "https://169.254.169.254/latest/meta-data/",  # the cloud metadata address (link-local)
    "https://[fe80::1]/hook", "https://[fd00::1]/hook", "https://[::1]/hook",
    "https://[::ffff:10.0.0.1]/hook",  # IPv4 in IPv6 clothing
    "https://100.64.0.1/hook", "https://0.0.0.0/hook",
    "https://localhost/hook",  # a name that resolves to loopback: refused by the DNS half
    "http://example.com/hook",  # plain http to a non-loopback host
    "https://user:hunter2@example.com/hook",  # credentials in the URL: refused, never echoed
    "https://example.com/hook#part", "ftp://example.com/hook", "https:///hook", "not a url at all",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
async def test_a_destination_that_is_not_public_is_refused_and_nothing_is_written(strict_client, pool, unique, url):
    channel_id = f"ssrf-{unique}"
    assert (await strict_client.post("/admin/channels", headers=ADMIN, json=paybill_body(channel_id))).status == 201
    response = await strict_client.post(f"/admin/channels/{channel_id}/webhooks", headers=ADMIN, json={"url": url})
    assert response.status == 400, await response.text()
    problem = await response.json()
    assert [e["field"] for e in problem["errors"]] == ["url"] and "nothing was changed" in problem["detail"]
    assert "hunter2" not in await response.text()
    assert await endpoint_count(pool, channel_id) == 0
    assert await audit_rows(pool, channel_id) == []


async def test_the_metadata_address_refusal_says_why(strict_client, channel_id):
    response = await strict_client.post(f"/admin/channels/{channel_id}/webhooks", headers=ADMIN,
                                        json={"url": "https://169.254.169.254/latest/meta-data/"})
    [error] = (await response.json())["errors"]
    assert "not a public address" in error["message"] and "WEBHOOK_ALLOWED_NETWORKS" in error["message"]


async def test_a_changed_url_is_checked_as_a_new_one(strict_client, client, channel_id, pool):
    created = await add(client, channel_id)
    response = await strict_client.patch(f"/admin/webhooks/{created['endpointId']}", headers=ADMIN,
                                         json={"url": "https://10.1.2.3/hook"})
    assert response.status == 400
    assert (await call(client, "GET", f"/admin/webhooks/{created['endpointId']}"))["url"] == HOOK


# Rotation

async def test_rotation_keeps_the_old_secret_signing_for_the_overlap_only(client, channel_id, pool, webhook_provider):
    created = await add(client, channel_id)
    endpoint_id, first = created["endpointId"], created["secret"]
    response = await client.post(f"/admin/webhooks/{endpoint_id}/rotate-secret", headers=ADMIN,
                                 json={"overlapSeconds": 3600})
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    rotated = await response.json()
    second = rotated["secret"]
    assert second != first and [s["version"] for s in rotated["signingSecrets"]] == [2, 1]
    assert_no_secret(json.dumps(rotated), first)

    rows = await sealed_rows(pool, endpoint_id)
    assert rows[2][1] is None
    now = datetime.now(timezone.utc)
    assert now + timedelta(seconds=3500) < expiry(rows, 1) < now + timedelta(seconds=3700)
    assert open_secret(rows[1][0], endpoint_id, 1, webhook_provider) == first
    assert open_secret(rows[2][0], endpoint_id, 2, webhook_provider) == second
    assert await signing_versions(pool, endpoint_id, at_s=0) == [1, 2]  # during the overlap both sign
    assert await signing_versions(pool, endpoint_id, at_s=3601) == [2]  # after it, only the new one

    # Signed by both during the overlap, a receiver still on either secret verifies; one on a
    # secret we never issued does not.
    body, webhook_id, at = '{"type":"payment.settled"}', "evt-1", datetime.now(timezone.utc)
    signature = " ".join(Webhook(s).sign(webhook_id, at, body) for s in (second, first))
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(int(at.timestamp())), "webhook-signature": signature}
    for receiver_secret in (first, second):
        assert Webhook(receiver_secret).verify(body, headers) == {"type": "payment.settled"}
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 43 + "=").verify(body, headers)

    third = (await call(client, "POST", f"/admin/webhooks/{endpoint_id}/rotate-secret", json={"overlapSeconds": 0}))
    assert [s["version"] for s in third["signingSecrets"]] == [3]
    rows = await sealed_rows(pool, endpoint_id)
    assert expiry(rows, 1) <= datetime.now(timezone.utc) and expiry(rows, 2) <= datetime.now(timezone.utc)
    assert await signing_versions(pool, endpoint_id, at_s=0) == [3]
    actions = [(a, v) for a, _, v, _ in await audit_rows(pool, channel_id)]
    assert actions == [("webhook_endpoint_created", 1), ("webhook_secret_rotated", 2), ("webhook_secret_rotated", 3)]


async def test_a_second_rotation_within_the_overlap_stops_the_oldest_at_once(client, channel_id, pool):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    await call(client, "POST", f"/admin/webhooks/{endpoint_id}/rotate-secret")  # the default overlap: a day
    rows = await sealed_rows(pool, endpoint_id)
    assert expiry(rows, 1) > datetime.now(timezone.utc) + timedelta(hours=23)
    await call(client, "POST", f"/admin/webhooks/{endpoint_id}/rotate-secret", json={"overlapSeconds": 600})
    assert await signing_versions(pool, endpoint_id, at_s=0) == [2, 3]  # never three at once


@pytest.mark.parametrize("body", [{"overlapSeconds": OVERLAP_MAX_S + 1}, {"overlapSeconds": -1},
                                  {"overlapSeconds": "3600"}, {"overlapSeconds": 1.5}, {"overlapSeconds": True},
                                  {"overlap": 60}, []])
async def test_a_bad_overlap_is_400_and_rotates_nothing(client, channel_id, pool, body):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    await call(client, "POST", f"/admin/webhooks/{endpoint_id}/rotate-secret", 400, json=body)
    assert list(await sealed_rows(pool, endpoint_id)) == [1]


async def signing_versions(pool, endpoint_id: str, at_s: int) -> list[int]:
    """The versions that sign `at_s` seconds from now, by the rule the notifier applies to expires_at."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT version FROM webhook_secrets WHERE endpoint_id = %s AND (expires_at IS NULL"
                                 " OR expires_at > now() + %s * interval '1 second') ORDER BY version",
                                 (endpoint_id, at_s))
        return [r[0] for r in await cur.fetchall()]


# Life cycle and audit

async def test_every_change_is_audited_and_no_secret_reaches_the_audit_or_a_log(client, channel_id, pool, caplog):
    caplog.set_level(logging.DEBUG)
    created = await add(client, channel_id)
    endpoint_id = created["endpointId"]
    base = f"/admin/webhooks/{endpoint_id}"
    updated = await call(client, "PATCH", base, json={"eventTypes": ["payment.settled"], "description": "ERP",
                                                      "url": HOOK + "?token=receivers-own"})
    assert updated["eventTypes"] == ["payment.settled"] and updated["description"] == "ERP"
    disabled = await call(client, "POST", f"{base}/disable", json={"reason": "receiver moving\u202e hosts"})
    assert disabled["status"] == "disabled" and disabled["disabledReason"] == "receiver moving\\u202e hosts"
    rotated = (await call(client, "POST", f"{base}/rotate-secret", json={"overlapSeconds": 60}))["secret"]
    assert (await call(client, "POST", f"{base}/enable"))["status"] == "enabled"
    await call(client, "POST", f"{base}/redeliver", json={"since": "2026-01-01T00:00:00Z"})
    assert (await call(client, "DELETE", base))["status"] == "deleted"

    audit = await audit_rows(pool, channel_id)
    assert [a for a, *_ in audit] == ["webhook_endpoint_created", "webhook_endpoint_updated",
                                      "webhook_endpoint_disabled", "webhook_secret_rotated",
                                      "webhook_endpoint_enabled", "webhook_redelivery_requested",
                                      "webhook_endpoint_deleted"]
    assert {e for _, e, *_ in audit} == {endpoint_id}
    assert "changed url, eventTypes, description" in audit[1][3]
    assert "receivers-own" not in audit[1][3]  # a receiver's own token in the query is not audited
    assert "0 deliveries requeued" in audit[5][3]
    everything = await every_byte_of_the_audit(pool)
    assert_no_secret(everything, created["secret"].removeprefix("whsec_"), rotated.removeprefix("whsec_"))
    formatter = JsonFormatter("tests")
    logs = "\n".join(formatter.format(record) for record in caplog.records)
    assert f"webhook endpoint {endpoint_id} created" in logs  # the logs were captured
    assert_no_secret(logs, created["secret"].removeprefix("whsec_"), rotated.removeprefix("whsec_"))


async def test_disable_needs_a_reason_and_enable_clears_it_with_the_failure_run(client, channel_id, pool):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    base = f"/admin/webhooks/{endpoint_id}"
    for body in ({}, {"reason": ""}, {"reason": "x" * 501}, {"reason": 5}):
        await call(client, "POST", f"{base}/disable", 400, json=body)
    assert (await call(client, "GET", base))["status"] == "enabled"
    await call(client, "POST", f"{base}/disable", json={"reason": "maintenance"})
    async with pool.connection() as conn:  # as the notifier records a run of failures
        await conn.execute("UPDATE webhook_endpoints SET failing_since = now() - interval '1 day'"
                           " WHERE endpoint_id = %s", (endpoint_id,))
    assert (await call(client, "GET", base))["failingSince"] is not None
    enabled = await call(client, "POST", f"{base}/enable")
    assert (enabled["status"], enabled["disabledReason"], enabled["failingSince"]) == ("enabled", None, None)
    again = await call(client, "POST", f"{base}/enable")  # nothing to do: no second audit entry
    assert again["status"] == "enabled"
    assert [a for a, *_ in await audit_rows(pool, channel_id)].count("webhook_endpoint_enabled") == 1


async def test_delete_cancels_pending_deliveries_and_is_final(client, channel_id, pool):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    pending = await insert_delivery(pool, endpoint_id, channel_id, state="pending", attempts=2)
    delivered = await insert_delivery(pool, endpoint_id, channel_id, state="delivered")
    deleted = await call(client, "DELETE", f"/admin/webhooks/{endpoint_id}")
    assert deleted["status"] == "deleted" and deleted["signingSecrets"] == []
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id, state, finished_at IS NOT NULL, attempts FROM webhook_deliveries"
                                 " WHERE endpoint_id = %s ORDER BY id", (endpoint_id,))
        assert await cur.fetchall() == [(pending["id"], "cancelled", True, 2), (delivered["id"], "delivered", True, 1)]
    audit = await audit_rows(pool, channel_id)
    assert audit[-1][0] == "webhook_endpoint_deleted" and "1 pending deliveries cancelled" in audit[-1][3]
    for method, path, body in [("PATCH", "", {"description": "x"}), ("POST", "/enable", None),
                               ("POST", "/disable", {"reason": "x"}), ("POST", "/rotate-secret", {})]:
        await call(client, method, f"/admin/webhooks/{endpoint_id}{path}", 409, json=body)
    listed = await call(client, "GET", f"/admin/channels/{channel_id}/webhooks")
    assert listed["endpoints"] == []
    everything = await call(client, "GET", f"/admin/channels/{channel_id}/webhooks?includeDeleted=true")
    assert [e["endpointId"] for e in everything["endpoints"]] == [endpoint_id]


async def test_at_most_ten_endpoints_per_channel_and_one_per_url(client, channel_id, pool):
    for n in range(ENDPOINTS_PER_CHANNEL_MAX):
        await add(client, channel_id, url=f"{HOOK}/{n}")
    await call(client, "POST", f"/admin/channels/{channel_id}/webhooks", 409, json={"url": f"{HOOK}/again"})
    await call(client, "POST", f"/admin/channels/{channel_id}/webhooks", 409, json={"url": f"{HOOK}/0"})
    assert await endpoint_count(pool, channel_id) == ENDPOINTS_PER_CHANNEL_MAX
    first = (await call(client, "GET", f"/admin/channels/{channel_id}/webhooks"))["endpoints"][0]
    await call(client, "DELETE", f"/admin/webhooks/{first['endpointId']}")
    await add(client, channel_id, url=f"{HOOK}/0")  # a deleted endpoint no longer counts, nor holds its URL


async def test_an_unknown_channel_or_endpoint_is_404(client):
    await call(client, "POST", "/admin/channels/no-such-channel/webhooks", 404, json={"url": HOOK})
    await call(client, "GET", "/admin/channels/no-such-channel/webhooks", 404)
    await call(client, "GET", "/admin/webhooks/ep_00000000000000000000", 404)
    await call(client, "GET", "/admin/webhook-deliveries/999999999999/attempts", 404)


# The delivery log and redelivery

async def test_the_delivery_log_pages_newest_first_with_filters(client, channel_id, pool):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    old = datetime.now(timezone.utc) - timedelta(days=2)
    rows = [await insert_delivery(pool, endpoint_id, channel_id, state=state, occurred_at=old if n == 0 else None)
            for n, state in enumerate(["delivered", "parked", "pending", "delivered", "delivered"])]
    base = f"/admin/webhooks/{endpoint_id}/deliveries"
    first = await call(client, "GET", f"{base}?limit=2")
    assert [d["deliveryId"] for d in first["deliveries"]] == [str(rows[4]["id"]), str(rows[3]["id"])]
    second = await call(client, "GET", f"{base}?limit=2&cursor={first['nextCursor']}")
    assert [d["deliveryId"] for d in second["deliveries"]] == [str(rows[2]["id"]), str(rows[1]["id"])]
    third = await call(client, "GET", f"{base}?limit=2&cursor={second['nextCursor']}")
    assert [d["deliveryId"] for d in third["deliveries"]] == [str(rows[0]["id"])] and third["nextCursor"] is None
    parked = await call(client, "GET", f"{base}?state=parked")
    assert [d["deliveryId"] for d in parked["deliveries"]] == [str(rows[1]["id"])]
    since = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    recent = await client.get(base, headers=ADMIN, params={"since": since})
    assert len((await recent.json())["deliveries"]) == 4
    shown = first["deliveries"][0]
    assert shown["webhookId"] == rows[4]["webhook_id"] and shown["eventType"] == "payment.settled"
    assert "body" not in shown


async def test_a_deliverys_attempts_and_body_are_shown(client, channel_id, pool):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    delivery = await insert_delivery(pool, endpoint_id, channel_id, state="delivered", attempts=2)
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO webhook_attempts (delivery_id, at, http_status, latency_ms, error, outcome)"
                           " VALUES (%s, now() - interval '1 minute', NULL, 5000, 'read timeout', 'retry'),"
                           " (%s, now(), 204, 12.34, NULL, 'delivered')", (delivery["id"], delivery["id"]))
    attempts = await call(client, "GET", f"/admin/webhook-deliveries/{delivery['id']}/attempts")
    assert [(a["httpStatus"], a["latencyMs"], a["error"], a["outcome"]) for a in attempts["attempts"]] == [
        (None, 5000.0, "read timeout", "retry"), (204, 12.3, None, "delivered")]
    shown = await call(client, "GET", f"/admin/webhook-deliveries/{delivery['id']}")
    assert shown["body"]["type"] == "payment.settled" and shown["body"]["data"]["eventId"] == delivery["event_id"]
    assert "254" not in json.dumps(shown["body"])  # no phone number, not even the masked one
    assert len(shown["attemptLog"]) == 2


async def delivery_state(pool, delivery_id: int) -> tuple:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT state, attempts, finished_at, leased_by, next_attempt_at <= now(), webhook_id"
                                 " FROM webhook_deliveries WHERE id = %s", (delivery_id,))
        return await cur.fetchone()


async def test_redelivering_one_delivery_requeues_it_with_the_same_webhook_id(client, channel_id, pool):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    parked = await insert_delivery(pool, endpoint_id, channel_id, state="parked", attempts=5)
    answer = await call(client, "POST", f"/admin/webhook-deliveries/{parked['id']}/redeliver")
    assert answer == {"endpointId": endpoint_id, "requeued": 1}
    assert await delivery_state(pool, parked["id"]) == ("pending", 5, None, None, True, parked["webhook_id"])
    delivered = await insert_delivery(pool, endpoint_id, channel_id, state="delivered")
    by_event = await call(client, "POST", f"/admin/webhooks/{endpoint_id}/redeliver",
                          json={"eventId": delivered["event_id"]})
    assert by_event["requeued"] == 1
    assert (await delivery_state(pool, delivered["id"]))[0] == "pending"
    await call(client, "POST", f"/admin/webhooks/{endpoint_id}/redeliver", 404, json={"eventId": "no-such-event"})
    audit = await audit_rows(pool, channel_id)
    assert [d for a, _, _, d in audit if a == "webhook_redelivery_requested"] == [
        f"1 deliveries requeued (delivery {parked['id']})", f"1 deliveries requeued (event {delivered['event_id']})"]


async def test_redelivering_since_a_time_requeues_finished_rows_and_leaves_leased_ones(client, channel_id, pool):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    long_ago = datetime.now(timezone.utc) - timedelta(days=3)
    before = await insert_delivery(pool, endpoint_id, channel_id, state="delivered", occurred_at=long_ago)
    finished = [await insert_delivery(pool, endpoint_id, channel_id, state=s) for s in ("delivered", "parked")]
    waiting = await insert_delivery(pool, endpoint_id, channel_id, state="pending")
    leased = await insert_delivery(pool, endpoint_id, channel_id, state="pending", leased=True)
    since = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    answer = await call(client, "POST", f"/admin/webhooks/{endpoint_id}/redeliver", json={"since": since})
    assert answer["requeued"] == 3  # the two finished, and the waiting one made due now
    for row in (*finished, waiting):
        assert (await delivery_state(pool, row["id"]))[:5] == ("pending", 1, None, None, True)
    assert (await delivery_state(pool, before["id"]))[0] == "delivered"
    assert (await delivery_state(pool, leased["id"]))[3:5] == ("notifier-test", False)  # its holder's to finish


async def test_a_disabled_endpoint_is_not_redelivered_to(client, channel_id, pool):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    row = await insert_delivery(pool, endpoint_id, channel_id, state="parked")
    await call(client, "POST", f"/admin/webhooks/{endpoint_id}/disable", json={"reason": "maintenance"})
    await call(client, "POST", f"/admin/webhook-deliveries/{row['id']}/redeliver", 409)
    await call(client, "POST", f"/admin/webhooks/{endpoint_id}/redeliver", 409, json={"eventId": row["event_id"]})
    assert (await delivery_state(pool, row["id"]))[0] == "parked"


# Who gets in, and hostile input

WEBHOOK_ROUTES = [("GET", "/admin/channels/shop/webhooks"), ("POST", "/admin/channels/shop/webhooks"),
                  ("GET", "/admin/webhooks/ep_00000000000000000000"),
                  ("PATCH", "/admin/webhooks/ep_00000000000000000000"),
                  ("DELETE", "/admin/webhooks/ep_00000000000000000000"),
                  ("POST", "/admin/webhooks/ep_00000000000000000000/disable"),
                  ("POST", "/admin/webhooks/ep_00000000000000000000/enable"),
                  ("POST", "/admin/webhooks/ep_00000000000000000000/rotate-secret"),
                  ("GET", "/admin/webhooks/ep_00000000000000000000/deliveries"),
                  ("POST", "/admin/webhooks/ep_00000000000000000000/redeliver"),
                  ("GET", "/admin/webhook-deliveries/1"), ("GET", "/admin/webhook-deliveries/1/attempts"),
                  ("POST", "/admin/webhook-deliveries/1/redeliver")]


@pytest.mark.parametrize("method, path", WEBHOOK_ROUTES)
async def test_webhook_routes_refuse_a_missing_or_wrong_admin_token(client, pool, method, path):
    assert (await client.request(method, path, json={"url": HOOK})).status == 401
    for token in (ADMIN_TOKEN[:-1], secrets.token_urlsafe(32)):
        response = await client.request(method, path, headers={"Authorization": f"Bearer {token}"},
                                        json={"url": HOOK})
        assert response.status == 403


async def test_a_wrong_token_changes_nothing(client, channel_id, pool):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    wrong = {"Authorization": "Bearer " + secrets.token_urlsafe(32)}
    for method, path in [("POST", f"/admin/channels/{channel_id}/webhooks"),
                         ("DELETE", f"/admin/webhooks/{endpoint_id}"),
                         ("POST", f"/admin/webhooks/{endpoint_id}/rotate-secret")]:
        assert (await client.request(method, path, headers=wrong, json={"url": HOOK + "/2"})).status == 403
    assert await endpoint_count(pool, channel_id) == 1
    assert list(await sealed_rows(pool, endpoint_id)) == [1]
    assert (await call(client, "GET", f"/admin/webhooks/{endpoint_id}"))["status"] == "enabled"


HOSTILE_BODIES = [
    {"url": 42}, {"url": ["https://example.com"]}, {"url": None}, {}, {"url": HOOK, "extra": 1},
    {"url": "http://127.0.0.1:8099/\u0000hook"}, {"url": "http://127.0.0.1:8099/h\nook"},
    {"url": "http://127.0.0.1:8099/" + "a" * 3000}, {"url": "http://127.0.0.1:8099/caf\u00e9"},
    {"url": HOOK, "eventTypes": []}, {"url": HOOK, "eventTypes": "payment.settled"},
    {"url": HOOK, "eventTypes": ["payment.refunded"]}, {"url": HOOK, "eventTypes": ["payment.settled\u0000"]},
    {"url": HOOK, "eventTypes": [1, 2]}, {"url": HOOK, "eventTypes": [None]},
    {"url": HOOK, "description": "x" * 201}, {"url": HOOK, "description": "a\u0000b"},
    {"url": HOOK, "description": "\ud800"}, {"url": HOOK, "description": ""}, {"url": HOOK, "description": 7},
    {"\u0000": 1, "url": HOOK}, [HOOK], "url", None,
]


@pytest.mark.parametrize("body", HOSTILE_BODIES)
async def test_hostile_bodies_are_400_and_create_nothing(client, channel_id, pool, body):
    response = await client.post(f"/admin/channels/{channel_id}/webhooks", headers=JSON, data=json.dumps(body))
    assert response.status == 400, await response.text()
    assert response.content_type == "application/problem+json"
    assert await endpoint_count(pool, channel_id) == 0


@pytest.mark.parametrize("raw", [b"not json", b"{", b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000, b'{"url":\x00"x"}'])
async def test_bodies_that_are_not_json_are_400_everywhere(client, channel_id, raw):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    for method, path in [("POST", f"/admin/channels/{channel_id}/webhooks"),
                         ("PATCH", f"/admin/webhooks/{endpoint_id}"),
                         ("POST", f"/admin/webhooks/{endpoint_id}/disable"),
                         ("POST", f"/admin/webhooks/{endpoint_id}/rotate-secret"),
                         ("POST", f"/admin/webhooks/{endpoint_id}/redeliver")]:
        response = await client.request(method, path, headers=JSON, data=raw)
        assert response.status == 400, (method, path, await response.text())


async def test_a_huge_body_is_413_and_changes_nothing(client, channel_id, pool):
    body = json.dumps({"url": HOOK, "description": "x" * 20_000})
    response = await client.post(f"/admin/channels/{channel_id}/webhooks", headers=JSON, data=body)
    assert response.status == 413
    assert await endpoint_count(pool, channel_id) == 0


@pytest.mark.parametrize("body", [{"url": "https://10.0.0.1/x"}, {"eventTypes": ["payment.nope"]},
                                  {"description": None, "url": 5}, {}, {"status": "disabled"},
                                  {"description": "\u0000"}])
async def test_a_hostile_update_is_400_and_changes_nothing(client, channel_id, pool, body):
    created = await add(client, channel_id, description="kept")
    await call(client, "PATCH", f"/admin/webhooks/{created['endpointId']}", 400, json=body)
    shown = await call(client, "GET", f"/admin/webhooks/{created['endpointId']}")
    assert (shown["url"], shown["eventTypes"], shown["description"], shown["status"]) == (
        HOOK, list(EVENT_TYPES), "kept", "enabled")
    assert [a for a, *_ in await audit_rows(pool, channel_id)] == ["webhook_endpoint_created"]


@pytest.mark.parametrize("query", ["state=lost", "limit=0", "limit=201", "limit=abc", "cursor=-1", "cursor=x",
                                   "cursor=99999999999999999999", "since=yesterday", "since=2026-01-01T00:00:00",
                                   "colour=blue", "since=" + "9" * 100])
async def test_bad_delivery_log_queries_are_400(client, channel_id, query):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    await call(client, "GET", f"/admin/webhooks/{endpoint_id}/deliveries?{query}", 400)


@pytest.mark.parametrize("body", [{}, {"eventId": "e", "since": "2026-01-01T00:00:00Z"}, {"eventId": 5},
                                  {"eventId": "a\u0000b"}, {"eventId": "x" * 101}, {"since": "2026-13-01T00:00:00Z"},
                                  {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
                                  {"until": "2026-01-01T00:00:00Z"}, {"eventId": "e", "extra": True},
                                  {"since": "0001-01-01T00:00:00+01:00"}])
async def test_bad_redelivery_requests_are_400_and_requeue_nothing(client, channel_id, pool, body):
    endpoint_id = (await add(client, channel_id))["endpointId"]
    row = await insert_delivery(pool, endpoint_id, channel_id, state="delivered")
    await call(client, "POST", f"/admin/webhooks/{endpoint_id}/redeliver", 400, json=body)
    assert (await delivery_state(pool, row["id"]))[0] == "delivered"


@pytest.mark.parametrize("path", ["/admin/webhooks/ep_%00", "/admin/webhooks/ep_0000000000000000000%0a",
                                  "/admin/webhooks/EP_00000000000000000000", "/admin/webhook-deliveries/%00/attempts",
                                  "/admin/webhook-deliveries/-1", "/admin/webhook-deliveries/99999999999999999999",
                                  "/admin/channels/shop%00/webhooks"])
async def test_hostile_path_parameters_are_404(client, path):
    response = await client.get(path, headers=ADMIN)
    assert response.status == 404, await response.text()
    assert "\u0000" not in (await response.json())["detail"]


# Nothing a client sends makes the API answer 500

any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates and controls included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text
    | st.sampled_from([HOOK, "https://10.0.0.1/x", "payment.settled", "2026-01-01T00:00:00Z", "\u0000", "\ud800",
                       "9" * 5000, 86400, -1]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
FIELDS = ["url", "eventTypes", "description", "reason", "overlapSeconds", "eventId", "since", "until"]
VALID: dict[tuple[str, str], dict[str, Any]] = {  # route -> a valid body for it; {e} is the endpoint
    ("POST", "/admin/channels/{c}/webhooks"): {"url": HOOK + "/prop", "eventTypes": ["payment.settled"]},
    ("PATCH", "/admin/webhooks/{e}"): {"description": "ERP", "eventTypes": ["payment.failed"]},
    ("POST", "/admin/webhooks/{e}/disable"): {"reason": "maintenance"},
    ("POST", "/admin/webhooks/{e}/rotate-secret"): {"overlapSeconds": 60},
    ("POST", "/admin/webhooks/{e}/redeliver"): {"since": "2026-01-01T00:00:00Z"},
}


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(route=st.sampled_from(sorted(VALID)), data=st.data())
async def test_no_nearly_valid_body_makes_the_webhook_routes_answer_500(client, channel_id, route, data):
    endpoint_id = await a_live_endpoint(client, channel_id)
    fields = st.sampled_from(sorted(VALID[route])) | st.sampled_from(FIELDS)
    change = data.draw(st.dictionaries(fields, json_values, min_size=1, max_size=2))
    method, path = route
    body = json.dumps({**VALID[route], **change})
    response = await client.request(method, path.format(c=channel_id, e=endpoint_id), headers=JSON, data=body)
    assert response.status < 500, await response.text()


async def a_live_endpoint(client, channel_id: str) -> str:
    """The channel's endpoint that is not deleted or disabled, made or enabled as needed."""
    listed = (await call(client, "GET", f"/admin/channels/{channel_id}/webhooks"))["endpoints"]
    if not listed:
        return (await add(client, channel_id))["endpointId"]
    endpoint_id = listed[0]["endpointId"]
    await call(client, "POST", f"/admin/webhooks/{endpoint_id}/enable")
    return endpoint_id
