"""The review desk's admin routes against their OpenAPI document (services/operations/openapi.json),
and hostile input: every documented answer is provoked on a real app and database and checked against
the document; nothing a client sends makes a route answer 500 or echo a payer's number."""
from __future__ import annotations

import base64
import json
import logging
import uuid
from pathlib import Path

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator, FormatChecker
from psycopg_pool import AsyncConnectionPool
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from services.common.observability import serve
from services.common.ratelimit import RateLimiter
from services.operations.desk import ReviewDesk
from tests.conftest import free_port
from tests.openapi_refs import refs_in
from tests.operations.conftest import ADMIN, admin_app, make_payment

DOCUMENT = json.loads((Path(__file__).resolve().parents[2] / "services" / "operations" / "openapi.json").read_text())
URI = "urn:operations-openapi"
REGISTRY = Registry().with_resource(URI, DRAFT202012.create_resource(DOCUMENT))
PAYMENTS, PAYMENT = "/admin/payments", "/admin/payments/{paymentId}"
QUERY, RESOLVE = "/admin/payments/{paymentId}/query", "/admin/payments/{paymentId}/resolve"
DESK_PATHS = (PAYMENTS, PAYMENT, QUERY, RESOLVE)  # the statement route is part R's, tested with it


class Contract:
    """Checks answers against the document; remembers which documented answers were seen."""

    def __init__(self):
        self.seen: set[tuple[str, str, str, str]] = set()

    async def check(self, method: str, path: str, response) -> None:
        status, media_type = str(response.status), response.content_type
        documented = DOCUMENT["paths"][path][method]["responses"]
        assert status in documented, f"{method.upper()} {path} answered undocumented {status}: {await response.text()}"
        answer, pointer = documented[status], f"/paths/{_escape(path)}/{method}/responses/{status}"
        if "$ref" in answer:
            pointer = answer["$ref"][1:]
            answer = _at(pointer)
        assert media_type in answer["content"], f"{method.upper()} {path} {status} answered {media_type}"
        schema = {"$ref": f"{URI}#{pointer}/content/{_escape(media_type)}/schema"}
        validator = Draft202012Validator(schema, registry=REGISTRY, format_checker=FormatChecker())
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(await response.json())]
        assert not errors, f"{method.upper()} {path} {status}: {errors}"
        for header in answer.get("headers", {}):
            assert header in response.headers, f"{method.upper()} {path} {status} lacks {header}"
        self.seen.add((method, path, status, media_type))

    @staticmethod
    def documented() -> set[tuple[str, str, str, str]]:
        answers = set()
        for path in DESK_PATHS:
            for method, operation in DOCUMENT["paths"][path].items():
                for status, answer in operation["responses"].items():
                    if status == "500":
                        continue
                    answer = _at(answer["$ref"][1:]) if "$ref" in answer else answer
                    answers |= {(method, path, status, media_type) for media_type in answer["content"]}
        return answers


def _at(pointer: str) -> dict:
    node = DOCUMENT
    for part in pointer.strip("/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def test_the_document_is_openapi_3_1_and_every_ref_resolves():
    assert DOCUMENT["openapi"].startswith("3.1.")
    for schema in DOCUMENT["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    refs = refs_in(DOCUMENT)
    resolver = REGISTRY.resolver(URI)
    assert refs and all(resolver.lookup(ref).contents for ref in refs)
    assert "/admin/channels/{channelId}/statement" in DOCUMENT["paths"]


async def test_every_documented_answer_matches_the_document(client, onboarding_pool, desk, scripted, ledger, tmp_path,
                                                            unique):
    contract = Contract()
    made = await make_payment(ledger, f"ch-{unique}")
    cancelled = await make_payment(ledger, f"ch-{unique}", review=False)
    one, query, resolve = (p.replace("{paymentId}", made.payment_id) for p in (PAYMENT, QUERY, RESOLVE))
    asking = {"reason": "customer says paid", "operator": "otieno"}
    settling = {"outcome": "Settled", "mpesaReceipt": made.receipt, "reason": "SMS seen", "operator": "otieno"}
    cancel_body = {"outcome": "Cancelled", "reason": "r", "operator": "o"}
    unknown = str(uuid.uuid4())

    await contract.check("get", PAYMENTS, await client.get(PAYMENTS, params={"receipt": made.receipt}, headers=ADMIN))
    await contract.check("get", PAYMENTS, await client.get(PAYMENTS, params={"state": "x"}, headers=ADMIN))
    await contract.check("get", PAYMENT, await client.get(one, headers=ADMIN))
    await contract.check("get", PAYMENT, await client.get(f"/admin/payments/{unknown}", headers=ADMIN))
    for path, concrete, body in ((QUERY, query, asking), (RESOLVE, resolve, settling)):
        await contract.check("post", path, await client.post(concrete, json=body, headers=ADMIN))  # 200
        await contract.check("post", path, await client.post(concrete, json={}, headers=ADMIN))  # 400
        await contract.check("post", path, await client.post(path.replace("{paymentId}", unknown), json=body,
                                                             headers=ADMIN))  # 404
        await contract.check("post", path, await client.post(concrete, data=b"x", headers={
            **ADMIN, "Content-Type": "text/plain"}))  # 415
        await contract.check("post", path, await client.post(concrete, json={"reason": "x" * 20000}, headers=ADMIN))
        await contract.check("post", path, await client.post(path.replace("{paymentId}", cancelled.payment_id),
                                                             json=body if path == QUERY else cancel_body,
                                                             headers=ADMIN))  # 409, refused before publishing
    scripted.verdict, scripted.detail = "rejected", "the ledger says no"
    for path, concrete, body in ((QUERY, query, asking), (RESOLVE, resolve, settling)):
        await contract.check("post", path, await client.post(concrete, json=body, headers=ADMIN))  # 409 rejected
    scripted.verdict = None
    for path, concrete, body in ((QUERY, query, asking), (RESOLVE, resolve, settling)):
        await contract.check("post", path, await client.post(concrete, json=body, headers=ADMIN))  # 202
    for method, path, concrete in (("get", PAYMENTS, PAYMENTS), ("get", PAYMENT, one), ("post", QUERY, query),
                                   ("post", RESOLVE, resolve)):
        await contract.check(method, path, await client.request(method, concrete, json={}))  # 401
        await contract.check(method, path, await client.request(method, concrete, json={},
                                                                headers={"Authorization": "Bearer wrong"}))  # 403

    limited = admin_app(onboarding_pool, desk, tmp_path, login_failures=RateLimiter(0.001, 1))
    async with TestClient(TestServer(limited)) as http:
        await http.get(PAYMENTS, headers={"Authorization": "Bearer wrong"})
        for method, path, concrete in (("get", PAYMENTS, PAYMENTS), ("get", PAYMENT, one), ("post", QUERY, query),
                                       ("post", RESOLVE, resolve)):
            await contract.check(method, path, await http.request(method, concrete, json={}, headers=ADMIN))  # 429

    gone = AsyncConnectionPool("postgresql://onboarding@127.0.0.1:9/mpesa", min_size=0, max_size=1, open=False)
    await gone.open(wait=False)
    try:
        async with TestClient(TestServer(admin_app(onboarding_pool, ReviewDesk(gone, None), tmp_path))) as http:
            await contract.check("get", PAYMENTS, await http.get(PAYMENTS, headers=ADMIN))  # 503
            await contract.check("get", PAYMENT, await http.get(one, headers=ADMIN))
        async with TestClient(TestServer(admin_app(onboarding_pool, ReviewDesk(onboarding_pool, None),
                                                   tmp_path))) as http:
            await contract.check("post", QUERY, await http.post(query, json=asking, headers=ADMIN))  # 503: no Kafka
            await contract.check("post", RESOLVE, await http.post(resolve, json=cancel_body, headers=ADMIN))
    finally:
        await gone.close()

    missing = contract.documented() - contract.seen
    assert not missing, f"documented but never provoked: {sorted(missing)}"


HOSTILE_VALUES = ["' OR '1'='1", "'; DROP TABLE payments; --", "\u0000", "%00", "Review\u0000", "\u202eweiveR",
                  "x" * 4000, "../../etc/passwd", "{\"$ne\": null}", "😀" * 100, "1; SELECT pg_sleep(10)", "\ud800"]


@pytest.mark.parametrize("name", ["channel", "state", "from", "to", "orderReference", "receipt", "checkoutRequestId",
                                  "phone", "cursor", "limit", "sort", "state[]", "\u0000"])
async def test_hostile_search_parameters_get_400_and_never_500(client, name):
    for value in HOSTILE_VALUES:
        response = await client.get(PAYMENTS, params={name: value.encode("utf-8", "surrogatepass").decode(
            "utf-8", "replace")}, headers=ADMIN)
        body = await response.json()
        if response.status == 200:  # a well-formed order reference that matches nothing
            assert name == "orderReference" and body["payments"] == []
        else:
            assert response.status == 400 and response.content_type == "application/problem+json", body


@pytest.mark.parametrize("cursor", [
    base64.urlsafe_b64encode(json.dumps(v).encode()).decode().rstrip("=") for v in
    [[], [1, 2], ["2026-11-30T08:00:00", "p"], ["2026-11-30T08:00:00+03:00", 5], {"a": 1}, "x",
     ["2026-11-30T08:00:00+03:00", "p", "extra"], ["9999-99-99T00:00:00+00:00", "p"], [None, None]]
] + ["=" * 10, "-" * 399, "AAAA" * 100 + "A", "eyJ"])
async def test_a_forged_cursor_is_refused(client, cursor):
    response = await client.get(PAYMENTS, params={"cursor": cursor}, headers=ADMIN)
    assert response.status == 400 and (await response.json())["errors"][0]["field"] == "cursor"


async def test_repeated_and_overlong_parameters_are_refused_and_an_overlong_url_is_not_a_500(client):
    response = await client.get(PAYMENTS + "?state=Review&state=Settled", headers=ADMIN)
    assert response.status == 400
    response = await client.get(PAYMENTS + "?" + "&".join(f"p{i}=1" for i in range(2000)), headers=ADMIN)
    assert 400 <= response.status < 500
    response = await client.get(PAYMENTS + "?orderReference=" + "o" * 20000, headers=ADMIN)
    assert 400 <= response.status < 500


@pytest.mark.parametrize("payment_id", ["%00", "a%00b", "x" * 300, "..%2F..%2Fetc", "%E2%80%AE", "' OR 1=1 --",
                                        "%F0%9F%98%80", "%ff"])
async def test_odd_payment_ids_in_the_path_are_not_found_and_never_500(client, payment_id):
    for method, suffix, body in (("GET", "", None), ("POST", "/query", {"reason": "r", "operator": "o"}),
                                 ("POST", "/resolve", {"outcome": "Cancelled", "reason": "r", "operator": "o"})):
        response = await client.request(method, f"/admin/payments/{payment_id}{suffix}", json=body, headers=ADMIN)
        assert response.status == 404, (method, payment_id, response.status)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\"x\"", b"1e999999", b"[" * 100000 + b"]" * 100000,
                                 b"\xff\xfe", b'{"reason": "r", "operator": "o", "reason": 5}',
                                 b'{"outcome": {"$gt": ""}, "reason": "r", "operator": "o"}'])
async def test_odd_bodies_get_400_or_413_and_nothing_is_sent(client, ledger, scripted, unique, raw):
    made = await make_payment(ledger, f"ch-{unique}")
    for suffix in ("query", "resolve"):
        response = await client.post(f"/admin/payments/{made.payment_id}/{suffix}", data=raw,
                                     headers={**ADMIN, "Content-Type": "application/json"})
        assert response.status in (400, 413), (suffix, response.status)
    assert scripted.sent == []


async def test_the_operator_cannot_forge_the_actor_or_the_log(client, ledger, scripted, unique):
    made = await make_payment(ledger, f"ch-{unique}")
    for operator in ("eve via cli", "eve\nERROR forged", "eve from 10.0.0.1", "", "e" * 65, 5, None):
        response = await client.post(f"/admin/payments/{made.payment_id}/query",
                                     json={"reason": "r", "operator": operator}, headers=ADMIN)
        assert response.status == 400
    assert scripted.sent == []


async def test_a_phone_searched_for_never_reaches_a_log_line_or_an_answer(onboarding_pool, desk, ledger, tmp_path,
                                                                           unique, caplog):
    """Served as the onboarding API serves (services.common.observability.serve: no access log, which
    would write the query string, and with it the number searched for)."""
    made = await make_payment(ledger, f"ch-{unique}")
    port = free_port()
    runner = await serve(admin_app(onboarding_pool, desk, tmp_path), "127.0.0.1", port)
    caplog.set_level(logging.DEBUG)
    local = "0" + made.phone[3:]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=ADMIN) as http:
            for typed in (local, local + "9", "+" + made.phone):
                response = await http.get(PAYMENTS, params={"phone": typed})
                assert made.phone[3:] not in response.text
            await http.get(f"/admin/payments/{made.payment_id}")
    finally:
        await runner.cleanup()
    # The server side's records: the test's own HTTP client (httpx, httpcore) logs the URL it asked for.
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert made.phone[3:] not in logged
