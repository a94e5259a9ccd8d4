"""The Daraja client's metrics: every call timed by endpoint and outcome (ok, refused, timeout, error)
and the codes Daraja answered counted, bounded to the catalogue. A local aiohttp server plays Daraja
so that each answer, hostile ones included, is exactly the one the test needs."""
from __future__ import annotations

import asyncio
import functools
import json
import socket

import pytest
from aiohttp import web
from hypothesis import given, settings, strategies as st
from prometheus_client import REGISTRY

from services.daraja.client import DarajaClient, DarajaTimeouts
from services.daraja.errors import DarajaError
from services.daraja.metrics import OTHER_CODE, code_label
from services.daraja.parsing import KNOWN_ERROR_CODES
from services.daraja.result_codes import FAILURE_MEANINGS, STILL_PROCESSING_CODE, SUCCESS
from tests.daraja.conftest import push_request

TOKEN = {"access_token": "T" * 28, "expires_in": "3599"}
ACCEPTED = {"MerchantRequestID": "m-1", "CheckoutRequestID": "ws_CO_1", "ResponseCode": "0",
            "ResponseDescription": "Success. Request accepted for processing", "CustomerMessage": "ok"}


class FakeDaraja:
    """Answers each endpoint with what the test put there; a slow answer sleeps first."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, object]] = {
            "oauth": (200, TOKEN), "stkpush": (200, ACCEPTED),
            "stkquery": (200, {"ResultCode": "0", "ResultDesc": "ok", "CheckoutRequestID": "ws_CO_1"})}
        self.delay_s = 0.0
        self.base_url = ""

    def app(self) -> web.Application:
        app = web.Application()
        for method, path, endpoint in (("GET", "/oauth/v1/generate", "oauth"),
                                       ("POST", "/mpesa/stkpush/v1/processrequest", "stkpush"),
                                       ("POST", "/mpesa/stkpushquery/v1/query", "stkquery")):
            app.router.add_route(method, path, functools.partial(self._answer, endpoint))
        return app

    async def _answer(self, endpoint: str, _: web.Request) -> web.Response:
        await asyncio.sleep(self.delay_s)
        status, body = self.answers[endpoint]
        return web.Response(status=status, body=body if isinstance(body, bytes) else json.dumps(body).encode(),
                            content_type="application/json")


@pytest.fixture
async def daraja():
    fake = FakeDaraja()
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    fake.base_url = f"http://{host}:{port}"
    yield fake
    await runner.cleanup()


@pytest.fixture
async def client(daraja):
    c = DarajaClient(daraja.base_url, timeouts=DarajaTimeouts(connect_s=1, read_s=0.3, pool_s=1))
    yield c
    await c.aclose()


def calls(endpoint: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("daraja_request_seconds_count", {"endpoint": endpoint, "outcome": outcome}) or 0


def codes(endpoint: str, code: str) -> float:
    return REGISTRY.get_sample_value("daraja_result_codes_total", {"endpoint": endpoint, "result_code": code}) or 0


def code_series() -> set[tuple[str, str]]:
    return {(s.labels["endpoint"], s.labels["result_code"]) for m in REGISTRY.collect()
            if m.name == "daraja_result_codes" for s in m.samples if s.name == "daraja_result_codes_total"}


async def test_successful_calls_are_ok_and_count_the_codes_daraja_answered(client, app_credentials, paybill):
    before = {k: calls(k, "ok") for k in ("oauth", "stkpush", "stkquery")}
    push_zero, query_zero = codes("stkpush", "0"), codes("stkquery", "0")

    await client.push(app_credentials, paybill, push_request("https://example.com/cb"))
    await client.query(app_credentials, paybill, "ws_CO_1")

    assert {k: calls(k, "ok") - before[k] for k in before} == {"oauth": 1, "stkpush": 1, "stkquery": 1}
    assert (codes("stkpush", "0") - push_zero, codes("stkquery", "0") - query_zero) == (1, 1)


async def test_a_query_still_processing_is_ok_and_counts_its_code(daraja, client, app_credentials, paybill):
    daraja.answers["stkquery"] = (500, {"requestId": "r-1", "errorCode": "500.001.1001",
                                        "errorMessage": "The transaction is being processed"})
    ok, pending = calls("stkquery", "ok"), codes("stkquery", "500.001.1001")

    await client.query(app_credentials, paybill, "ws_CO_1")

    assert (calls("stkquery", "ok") - ok, codes("stkquery", "500.001.1001") - pending) == (1, 1)


@pytest.mark.parametrize("answer, code", [
    ((500, {"requestId": "r", "errorCode": "500.001.1001", "errorMessage": "Merchant does not exist"}),
     "500.001.1001"),
    ((400, {"requestId": "r", "errorCode": "400.002.02", "errorMessage": "Bad Request - Invalid Amount"}),
     "400.002.02"),
    ((200, {**ACCEPTED, "ResponseCode": "1"}), None),  # a refusal in a 2xx: ResponseCode other than 0
    ((403, b"<html>blocked</html>"), None),  # the gateway's WAF
])
async def test_an_error_answer_is_refused(daraja, client, app_credentials, paybill, answer, code):
    daraja.answers["stkpush"] = answer
    refused = calls("stkpush", "refused")
    counted = codes("stkpush", code) if code else 0

    with pytest.raises(DarajaError):
        await client.push(app_credentials, paybill, push_request("https://example.com/cb"))

    assert calls("stkpush", "refused") - refused == 1
    if code:
        assert codes("stkpush", code) - counted == 1


async def test_no_answer_in_time_is_a_timeout(daraja, client, app_credentials, paybill):
    await client.fetch_token(app_credentials)
    daraja.delay_s = 1.0  # above the client's read timeout
    timeouts = calls("stkquery", "timeout")

    with pytest.raises(DarajaError):
        await client.query(app_credentials, paybill, "ws_CO_1")

    assert calls("stkquery", "timeout") - timeouts == 1


async def test_an_unreadable_answer_or_no_connection_is_an_error(daraja, client, app_credentials, paybill):
    await client.fetch_token(app_credentials)
    daraja.answers["stkquery"] = (200, b"not json")
    errors = calls("stkquery", "error")
    with pytest.raises(DarajaError):
        await client.query(app_credentials, paybill, "ws_CO_1")
    assert calls("stkquery", "error") - errors == 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nobody listens once the socket is closed
    unreachable = DarajaClient(f"http://127.0.0.1:{closed}")
    errors = calls("oauth", "error")
    try:
        with pytest.raises(DarajaError):
            await unreachable.fetch_token(app_credentials)
    finally:
        await unreachable.aclose()
    assert calls("oauth", "error") - errors == 1


async def test_codes_a_hostile_daraja_makes_up_add_no_series(daraja, client, app_credentials, paybill):
    """Goal: answers cannot grow the metric's label set. Method: answer queries with many made-up
    ResultCodes and errorCodes (text, long, control characters); every one counts as "other"."""
    await client.fetch_token(app_credentials)
    other = codes("stkquery", OTHER_CODE)
    made_up = [f"x{i}\u202e<script>" + "9" * 300 for i in range(20)] + [str(10_000 + i) for i in range(20)]
    await client.query(app_credentials, paybill, "ws_CO_1")  # the known series exist first
    series = code_series()
    for i, code in enumerate(made_up):
        body = {"ResultCode": code, "ResultDesc": "?"} if i % 2 else {"errorCode": code, "errorMessage": "?"}
        daraja.answers["stkquery"] = (200 if i % 2 else 500, body)
        try:
            await client.query(app_credentials, paybill, "ws_CO_1")
        except DarajaError:
            pass
    assert codes("stkquery", OTHER_CODE) - other == len(made_up)
    assert code_series() - series <= {("stkquery", OTHER_CODE)}


@pytest.mark.parametrize("code, label", [
    ("0", "0"), (" 1032 ", "1032"), ("sfc_ic0003", "SFC_IC0003"), ("4999", "4999"), ("404.001.03", "404.001.03"),
    ("1033", OTHER_CODE), ("", OTHER_CODE), (None, None)])
def test_a_code_is_its_own_label_only_when_catalogued(code, label):
    assert code_label(code) == label


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=50))
def test_any_code_maps_to_the_catalogue_or_other(code):
    catalogue = {SUCCESS, STILL_PROCESSING_CODE, *FAILURE_MEANINGS, *KNOWN_ERROR_CODES}
    assert code_label(code) in catalogue | {OTHER_CODE}
