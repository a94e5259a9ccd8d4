"""The onboarding API against hostile clients: every body it refuses gets a 4xx problem detail, never
a 500, and wrong admin tokens are limited per source address while the right one is never slowed."""
from __future__ import annotations

import hashlib
import json
import secrets

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client import REGISTRY

from services.channels.api import LOGIN_FAILURES_BURST, LOGIN_FAILURES_PER_S, create_app
from services.channels.settings import AdminToken
from services.common.ratelimit import RateLimiter
from tests.channels.conftest import paybill_body

ADMIN_TOKEN = secrets.token_urlsafe(32)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WRONG = {"Authorization": "Bearer " + "w" * 43}
JSON = {**ADMIN, "Content-Type": "application/json"}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(onboarding, clock):
    limiter = RateLimiter(LOGIN_FAILURES_PER_S, LOGIN_FAILURES_BURST, clock=clock)
    app = create_app(onboarding, AdminToken(hashlib.sha256(ADMIN_TOKEN.encode()).digest()), login_failures=limiter)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


@pytest.fixture
async def channel_id(client, unique) -> str:
    channel_id = f"shop-{unique}"
    response = await client.post("/admin/channels", headers=ADMIN, json=paybill_body(channel_id))
    assert response.status == 201
    return channel_id


async def assert_refused(response, status: int = 400) -> None:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    assert (await response.json())["status"] == status


@pytest.mark.parametrize("raw", [
    b"not json", b"", b"{", b"\xff\xfe{}",  # not JSON; bad UTF-8
    b"[" * 5000 + b"]" * 5000,  # nested deeper than the parser's recursion limit (was a 500)
    b'{"displayName": 1e999999}', b'{"maxAmount": ' + b"9" * 5000 + b"}",  # an int Python will not parse
    b'{"displayName":\x00"x"}',  # a raw NUL byte
])
async def test_bodies_that_are_not_json_are_400(client, channel_id, raw):
    for method, path in [("POST", "/admin/channels"), ("PATCH", f"/admin/channels/{channel_id}"),
                         ("PUT", f"/admin/channels/{channel_id}/credentials"), ("POST", "/admin/api-keys")]:
        await assert_refused(await client.request(method, path, headers=JSON, data=raw))


@pytest.mark.parametrize("body", [[], "channel", 1, None, True, [{"channelId": "x"}]])
async def test_json_that_is_not_an_object_is_400(client, channel_id, body):
    for method, path in [("POST", "/admin/channels"), ("PATCH", f"/admin/channels/{channel_id}"),
                         ("PUT", f"/admin/channels/{channel_id}/credentials"), ("POST", "/admin/api-keys")]:
        await assert_refused(await client.request(method, path, headers=JSON, data=json.dumps(body)))


@pytest.mark.parametrize("change", [
    {"displayName": "Duka\u0000Mama"}, {"displayName": "Duka \ud800"}, {"displayName": "Duka\u2028Mama"},
    {"displayName": ["Duka"]}, {"displayName": {"a": 1}}, {"consentReference": "AGR\ud83d"},
    {"businessShortcode": 174379}, {"shortcodeType": ["paybill"]}, {"maxAmount": "100"},
    {"pushesPerSecond": float("nan")}, {"consentDate": "2024-02-30"}, {"\u0000": 1}, {"x" * 10_000: 1},
])
async def test_wrong_types_nul_and_surrogates_are_400_and_create_nothing(client, unique, change):
    # A lone surrogate cannot be encoded as UTF-8: before, it reached PostgreSQL and came back a 500.
    channel_id = f"shop-{unique}"
    body = json.dumps({**paybill_body(channel_id), **change})
    await assert_refused(await client.post("/admin/channels", headers=JSON, data=body))
    assert (await client.get(f"/admin/channels/{channel_id}", headers=ADMIN)).status == 404


async def test_a_body_over_the_limit_is_413(client):
    body = json.dumps({"displayName": "x" * 20_000})
    await assert_refused(await client.post("/admin/channels", headers=JSON, data=body), 413)


@pytest.mark.parametrize("path", ["/admin/api-keys/%00/revoke", "/admin/api-keys/0123456789ab%0a/revoke",
                                  "/admin/channels/shop%00", "/admin/channels/shop%0a/suspend"])
async def test_hostile_path_parameters_are_404(client, path):
    # A NUL in a key id reached PostgreSQL and came back a 500.
    await assert_refused(await client.post(path, headers=ADMIN) if path.endswith(("revoke", "suspend"))
                         else await client.get(path, headers=ADMIN), 404)


async def test_problem_details_quote_path_text_cleaned(client):
    response = await client.post("/admin/api-keys/%E2%80%AEevil/revoke", headers=ADMIN)  # right-to-left override
    await assert_refused(response, 404)
    assert "\u202e" not in (await response.json())["detail"]


def refusals(reason: str) -> float:
    return REGISTRY.get_sample_value("admin_auth_refusals_total", {"reason": reason}) or 0.0


async def test_wrong_tokens_are_limited_per_address_with_retry_after(client, clock):
    wrong_before, limited_before = refusals("wrong"), refusals("rate_limited")
    for _ in range(LOGIN_FAILURES_BURST):
        assert (await client.get("/admin/channels", headers=WRONG)).status == 403
    response = await client.get("/admin/channels", headers=WRONG)
    await assert_refused(response, 429)
    assert int(response.headers["Retry-After"]) >= 1
    # Over the budget, the right token is not even compared: a 200 would tell a right guess from a wrong one.
    assert (await client.get("/admin/channels", headers=ADMIN)).status == 429
    assert refusals("wrong") - wrong_before == LOGIN_FAILURES_BURST
    assert refusals("rate_limited") - limited_before == 2
    clock.now += int(response.headers["Retry-After"])
    assert (await client.get("/admin/channels", headers=ADMIN)).status == 200
    assert (await client.get("/admin/channels", headers=WRONG)).status == 403
    assert (await client.get("/admin/channels", headers=WRONG)).status == 429


async def test_successful_logins_spend_nothing(client):
    for _ in range(5 * LOGIN_FAILURES_BURST):
        assert (await client.get("/admin/channels", headers=ADMIN)).status == 200
    for _ in range(LOGIN_FAILURES_BURST):  # the whole failure budget is still there
        assert (await client.get("/admin/channels", headers=WRONG)).status == 403


def test_the_limiter_can_be_asked_without_spending():
    clock = Clock()
    limiter = RateLimiter(1.0, 2, clock=clock)
    assert limiter.wait_s("a") == 0.0 and limiter.wait_s("a") == 0.0
    limiter.take("a"), limiter.take("a")
    assert limiter.wait_s("a") == pytest.approx(1.0) and limiter.wait_s("b") == 0.0
    clock.now += 0.5
    assert limiter.wait_s("a") == pytest.approx(0.5)


FIELD_NAMES = ["channelId", "displayName", "shortcodeType", "businessShortcode", "tillNumber", "environment",
               "consentReference", "consentDate", "maxAmount", "pushesPerSecond", "status", "consumerKey",
               "consumerSecret", "passkey", "validate", "label", "channelIds"]
any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates and controls included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text
    | st.sampled_from(["paybill", "till", "sandbox", "174379", "2024-05-01", "shop-1", "\u0000", "\ud800"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
hostile_strings = st.sampled_from(["\u0000", "\ud800", "shop\ud83d", "x\n", "a\u2028b", "\x1b[2J", "9" * 5000])
CREDENTIALS = {"consumerKey": "ck1", "consumerSecret": "cs1", "passkey": "pk1"}
ROUTES = {  # (method, path) -> a valid body for it
    ("POST", "/admin/channels"): paybill_body("prop-shop"),
    ("PATCH", "/admin/channels/{c}"): {"displayName": "Duka", "maxAmount": 100},
    ("PUT", "/admin/channels/{c}/credentials"): CREDENTIALS,
    ("POST", "/admin/channels/{c}/credentials/rotate"): CREDENTIALS,
    ("POST", "/admin/api-keys"): {"label": "shop", "channelIds": ["{c}"]},
}
PROPERTY_SETTINGS = settings(max_examples=250, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


async def assert_no_500(client, route: tuple[str, str], body: bytes, channel_id: str) -> None:
    method, path = route
    response = await client.request(method, path.format(c=channel_id), headers=JSON, data=body)
    assert response.status < 500, await response.text()
    if response.status >= 400:
        assert response.content_type == "application/problem+json"


@PROPERTY_SETTINGS
@given(route=st.sampled_from(sorted(ROUTES)), data=st.data())
async def test_no_nearly_valid_body_makes_the_api_answer_500(client, channel_id, route, data):
    # A valid body with a field or two replaced reaches furthest: past the parsers, into PostgreSQL.
    fields = st.sampled_from(sorted(ROUTES[route])) | st.sampled_from(FIELD_NAMES)
    change = data.draw(st.dictionaries(fields, hostile_strings | json_values, min_size=1, max_size=2))
    body = json.dumps({**ROUTES[route], **change}).replace("{c}", channel_id).encode()
    await assert_no_500(client, route, body, channel_id)


@PROPERTY_SETTINGS
@given(route=st.sampled_from(sorted(ROUTES)),
       body=st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=12), json_values, max_size=8)
       .map(lambda d: json.dumps(d).encode())
       | json_values.map(lambda v: json.dumps(v).encode())
       | st.binary(max_size=200))
async def test_no_body_makes_the_api_answer_500(client, channel_id, route, body):
    await assert_no_500(client, route, body, channel_id)
