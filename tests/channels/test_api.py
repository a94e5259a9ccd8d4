"""The onboarding API over HTTP (aiohttp test server, real PostgreSQL, Daraja sandbox): who gets in,
what bad input gets back, and that no secret ever leaves in a response, a log line or a metric."""
from __future__ import annotations

import hashlib
import logging
import secrets

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from services.channels.api import create_app
from services.channels.credentials import CredentialStore
from services.channels.settings import AdminToken
from services.channels.vault import DecryptionFailed
from services.common.observability import JsonFormatter
from tests.channels.conftest import assert_no_secret, new_secrets, paybill_body

ADMIN_TOKEN = secrets.token_urlsafe(32)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROUTES = [("GET", "/admin/channels"), ("POST", "/admin/channels"), ("GET", "/admin/channels/shop"),
          ("PATCH", "/admin/channels/shop"), ("PUT", "/admin/channels/shop/credentials"),
          ("POST", "/admin/channels/shop/credentials/rotate"), ("POST", "/admin/channels/shop/suspend"),
          ("POST", "/admin/channels/shop/resume"), ("GET", "/admin/api-keys"), ("POST", "/admin/api-keys"),
          ("POST", "/admin/api-keys/0123456789ab/revoke"), ("GET", "/admin/channels/compliance")]


@pytest.fixture
async def client(onboarding):
    app = create_app(onboarding, AdminToken(hashlib.sha256(ADMIN_TOKEN.encode()).digest()))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


@pytest.mark.parametrize("method, path", ROUTES)
async def test_without_a_bearer_token_every_admin_route_answers_401(client, method, path):
    for headers in ({}, {"Authorization": "Basic YWRtaW46YWRtaW4="}, {"Authorization": "Bearer "}):
        response = await client.request(method, path, headers=headers, json={})
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.content_type == "application/problem+json"


@pytest.mark.parametrize("method, path", ROUTES)
async def test_a_wrong_token_answers_403_and_changes_nothing(client, onboarding, unique, method, path):
    body = paybill_body(f"shop-{unique}") if (method, path) == ("POST", "/admin/channels") else {}
    for token in (ADMIN_TOKEN[:-1], secrets.token_urlsafe(32), "mpk_0123456789ab_" + "x" * 43):
        response = await client.request(method, path, headers={"Authorization": f"Bearer {token}"}, json=body)
        assert response.status == 403, await response.text()
        assert (await response.json())["title"] == "Forbidden"
    assert f"shop-{unique}" not in [r.channel.channel_id for r in await onboarding.channels()]


async def test_an_upstream_api_key_is_not_an_admin_credential(client, unique):
    await client.post("/admin/channels", headers=ADMIN, json=paybill_body(f"shop-{unique}"))
    issued = await client.post("/admin/api-keys", headers=ADMIN,
                               json={"label": "web", "channelIds": [f"shop-{unique}"]})
    api_key = (await issued.json())["apiKey"]
    response = await client.get("/admin/channels", headers={"Authorization": f"Bearer {api_key}"})
    assert response.status == 403


async def test_health_and_metrics_need_no_token(client):
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/metrics")).status == 200


@pytest.mark.parametrize("change, field", [
    ({"shortcodeType": "agent"}, "shortcodeType"),
    ({"shortcodeType": "till"}, "tillNumber"),
    ({"businessShortcode": "17-4379"}, "businessShortcode"),
    ({"consentDate": None}, "consentDate"),
    ({"channelId": "Not Valid"}, "channelId"),
])
async def test_bad_input_gets_400_naming_the_field_and_creates_nothing(client, unique, change, field):
    body = paybill_body(f"shop-{unique}", **change)
    response = await client.post("/admin/channels", headers=ADMIN, json=body)
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert field in [e["field"] for e in problem["errors"]] and problem["status"] == 400
    assert (await client.get(f"/admin/channels/shop-{unique}", headers=ADMIN)).status == 404


async def test_activation_without_consent_gets_400_naming_consent_and_changes_nothing(client, creds, unique):
    channel_id = f"shop-{unique}"
    body = {k: v for k, v in paybill_body(channel_id).items() if not k.startswith("consent")}
    assert (await client.post("/admin/channels", headers=ADMIN, json=body)).status == 201
    assert (await client.put(f"/admin/channels/{channel_id}/credentials", headers=ADMIN, json=creds.body)).status == 200
    response = await client.post(f"/admin/channels/{channel_id}/resume", headers=ADMIN)
    assert response.status == 400
    assert [e["field"] for e in (await response.json())["errors"]] == ["consentReference"]
    shown = await (await client.get(f"/admin/channels/{channel_id}", headers=ADMIN)).json()
    assert shown["status"] == "onboarding"


async def test_malformed_bodies_are_refused_without_echoing_them(client, creds, unique):
    channel_id = f"shop-{unique}"
    await client.post("/admin/channels", headers=ADMIN, json=paybill_body(channel_id))
    path = f"/admin/channels/{channel_id}/credentials"
    broken = '{"consumerKey": "%s", "consumerSecret": "%s"' % (creds.consumer_key, creds.consumer_secret)
    response = await client.put(path, headers={**ADMIN, "Content-Type": "application/json"}, data=broken)
    assert response.status == 400
    assert_no_secret(await response.text(), *creds.values)
    response = await client.put(path, headers={**ADMIN, "Content-Type": "text/plain"}, data="x")
    assert response.status == 415
    response = await client.put(path, headers=ADMIN, json={**creds.body, "passkey": 42})
    assert response.status == 400 and [e["field"] for e in (await response.json())["errors"]] == ["passkey"]
    assert_no_secret(await response.text(), *creds.values)


async def test_unknown_channels_and_keys_are_404(client):
    assert (await client.get("/admin/channels/no-such-channel", headers=ADMIN)).status == 404
    assert (await client.post("/admin/channels/no-such-channel/suspend", headers=ADMIN)).status == 404
    assert (await client.post("/admin/api-keys/0123456789ab/revoke", headers=ADMIN)).status == 404


async def test_daraja_refusing_the_credentials_is_a_clear_422(client, creds, unique):
    channel_id = f"shop-{unique}"
    await client.post("/admin/channels", headers=ADMIN, json=paybill_body(channel_id))
    response = await client.put(f"/admin/channels/{channel_id}/credentials", headers=ADMIN,
                                json={**creds.body, "validate": True})
    assert response.status == 422
    problem = await response.json()
    assert problem["title"] == "Daraja refused the credentials" and "400.008.01" in problem["detail"]
    assert_no_secret(await response.text(), *creds.values)


async def test_no_secret_appears_in_responses_logs_errors_or_metrics(client, onboarding, pool, stk_worker_pool,
                                                                     provider, registered_app, unique, caplog):
    """The whole life of a channel, with every log record and response kept and searched for the
    secrets: the Daraja credentials (both versions), the admin token and the upstream API key."""
    caplog.set_level(logging.DEBUG)
    channel_id, rotated = f"shop-{unique}", new_secrets()
    texts: list[str] = []

    async def call(method: str, path: str, expected: int, **kwargs) -> dict:
        response = await client.request(method, path, headers=ADMIN, **kwargs)
        texts.append(await response.text())
        assert response.status == expected, texts[-1]
        return await response.json()

    await call("POST", "/admin/channels", 201, json=paybill_body(channel_id))
    shown = await call("PUT", f"/admin/channels/{channel_id}/credentials", 200,
                       json={**registered_app.body, "validate": True})
    assert shown["credentials"]["version"] == 1 and shown["credentials"]["validatedAt"]
    await call("POST", f"/admin/channels/{channel_id}/resume", 200)
    await call("POST", f"/admin/channels/{channel_id}/credentials/rotate", 200, json=rotated.body)
    listed = await call("GET", "/admin/channels", 200)
    mine = [c for c in listed["channels"] if c["channelId"] == channel_id]
    assert mine[0]["credentials"]["version"] == 2 and len(mine[0]["credentials"]["fingerprint"]) == 16
    issued = await call("POST", "/admin/api-keys", 201, json={"label": "web", "channelIds": [channel_id]})
    api_key = issued.pop("apiKey")
    texts[-1] = texts[-1].replace(api_key, "")  # shown once, on purpose, in the answer that issues it
    await call("GET", "/admin/api-keys", 200)
    await call("POST", f"/admin/api-keys/{issued['keyId']}/revoke", 200)

    store = CredentialStore(stk_worker_pool, provider)
    assert (await store.get_version(channel_id, 1)).app == registered_app.app
    texts.append(repr(await store.get(channel_id)) + str(await store.get(channel_id)))
    async with pool.connection() as conn:
        await conn.execute("UPDATE channel_credentials SET ciphertext = set_byte(ciphertext, 0,"
                           " get_byte(ciphertext, 0) # 1) WHERE channel_id = %s AND version = 2", (channel_id,))
    with pytest.raises(DecryptionFailed) as failed:
        await CredentialStore(stk_worker_pool, provider).get(channel_id)
    texts.append(str(failed.value))

    formatter = JsonFormatter("tests")
    texts += [formatter.format(record) for record in caplog.records]
    texts.append(generate_latest().decode())
    assert any("credentials version 1 decrypted" in t for t in texts)  # the logs were captured
    assert_no_secret("\n".join(texts), *registered_app.values, *rotated.values, ADMIN_TOKEN, api_key)
