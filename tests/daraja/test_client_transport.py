"""Transport failures, classified by whether the request can have reached Daraja; and secrets, which
must never appear in a log line, an exception or its traceback."""
from __future__ import annotations

import asyncio
import logging
import socket
import traceback

import aiohttp
import httpx
import pytest

from services.daraja.client import DarajaClient, DarajaTimeouts, transport_error
from services.daraja.errors import DarajaError, ErrorKind
from services.daraja.models import AppCredentials, Shortcode
from services.daraja.payloads import stk_password
from services.daraja.transport import as_httpx_error
from services.daraja_sandbox.scenarios import named_scenario
from services.daraja_sandbox.settings import DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY
from services.daraja_sandbox.state import Fault
from tests.daraja.conftest import new_phone, push_request


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


async def test_unreachable_daraja_is_retryable(app_credentials, paybill):
    client = DarajaClient(f"http://127.0.0.1:{closed_port()}")
    try:
        with pytest.raises(DarajaError) as caught:
            await client.push(app_credentials, paybill, push_request("http://127.0.0.1:1/cb"))
    finally:
        await client.aclose()
    assert (caught.value.kind, caught.value.operation) == (ErrorKind.RETRYABLE, "oauth")  # the token comes first
    assert "before the request was sent" in caught.value.reason


async def _slow_phone(sandbox, latency_ms: int) -> str:
    phone = new_phone()
    sandbox.state.overrides.by_phone[phone] = named_scenario("success", latency_ms=latency_ms)
    return phone


async def test_push_read_timeout_is_outcome_unknown_and_was_pushed_exactly_once(sandbox, receiver, app_credentials,
                                                                                paybill):
    client = DarajaClient(sandbox.base_url, timeouts=DarajaTimeouts(read_s=0.2))
    phone, url = await _slow_phone(sandbox, 1000), receiver.new_url()
    try:
        with pytest.raises(DarajaError) as caught:
            await client.push(app_credentials, paybill, push_request(url, phone=phone))
    finally:
        await client.aclose()
    assert caught.value.kind is ErrorKind.OUTCOME_UNKNOWN
    assert "after the request was sent" in caught.value.reason
    # The prompt exists: Daraja accepted it although the answer never came back.
    assert len(sandbox.accepted_pushes(PhoneNumber=phone)) == 1
    assert (await receiver.wait_for(url))[0].body.count(b'"ResultCode":0') == 1


async def test_query_read_timeout_is_just_retryable(sandbox, app_credentials, paybill):
    client = DarajaClient(sandbox.base_url, timeouts=DarajaTimeouts(read_s=0.2))
    try:
        await client.fetch_token(app_credentials)
        sandbox.state.update_settings({"latency_ms": 600})
        with pytest.raises(DarajaError) as caught:
            await client.query(app_credentials, paybill, "ws_CO_1")
    finally:
        await client.aclose()
    assert (caught.value.kind, caught.value.operation) == (ErrorKind.RETRYABLE, "query")


@pytest.mark.parametrize("operation, kind", [("push", ErrorKind.OUTCOME_UNKNOWN), ("query", ErrorKind.RETRYABLE)])
async def test_dropped_connection(client, sandbox, receiver, app_credentials, paybill, operation, kind):
    await client.fetch_token(app_credentials)
    sandbox.state.add_fault(Fault(operation, drop_connection=True, process=operation == "push"))
    url = receiver.new_url()
    with pytest.raises(DarajaError) as caught:
        if operation == "push":
            await client.push(app_credentials, paybill, push_request(url))
        else:
            await client.query(app_credentials, paybill, "ws_CO_1")
    assert caught.value.kind is kind
    if operation == "push":
        assert len(sandbox.accepted_pushes(CallBackURL=url)) == 1


async def test_waiting_for_a_pooled_connection_too_long_is_retryable_and_nothing_was_sent(
        sandbox, receiver, app_credentials, paybill):
    client = DarajaClient(sandbox.base_url, max_connections=1,
                          timeouts=DarajaTimeouts(connect_s=0.1, pool_s=0.1, read_s=5))
    slow_phone, waiting_phone = await _slow_phone(sandbox, 800), new_phone()
    try:
        await client.fetch_token(app_credentials)
        slow = asyncio.create_task(client.push(app_credentials, paybill, push_request(receiver.new_url(),
                                                                                    phone=slow_phone)))
        while not sandbox.all_pushes(PhoneNumber=slow_phone):  # the slow push holds the only connection
            await asyncio.sleep(0.01)
        with pytest.raises(DarajaError) as caught:
            await client.push(app_credentials, paybill, push_request(receiver.new_url(), phone=waiting_phone))
        await slow
    finally:
        await client.aclose()
    assert caught.value.kind is ErrorKind.RETRYABLE
    assert sandbox.all_pushes(PhoneNumber=waiting_phone) == []


@pytest.mark.parametrize("exc, push_kind", [
    (httpx.ConnectError("x"), ErrorKind.RETRYABLE), (httpx.ConnectTimeout("x"), ErrorKind.RETRYABLE),
    (httpx.PoolTimeout("x"), ErrorKind.RETRYABLE), (httpx.ProxyError("x"), ErrorKind.RETRYABLE),
    (httpx.ReadTimeout("x"), ErrorKind.OUTCOME_UNKNOWN), (httpx.WriteTimeout("x"), ErrorKind.OUTCOME_UNKNOWN),
    (httpx.ReadError("x"), ErrorKind.OUTCOME_UNKNOWN), (httpx.RemoteProtocolError("x"), ErrorKind.OUTCOME_UNKNOWN),
    (httpx.UnsupportedProtocol("x"), ErrorKind.PERMANENT), (httpx.LocalProtocolError("x"), ErrorKind.PERMANENT),
])
def test_transport_error_classification(exc, push_kind):
    assert transport_error("push", exc).kind is push_kind
    query_kind = ErrorKind.PERMANENT if push_kind is ErrorKind.PERMANENT else ErrorKind.RETRYABLE
    assert transport_error("query", exc).kind is query_kind


async def test_observer_sees_each_call_with_its_outcome(sandbox, receiver, app_credentials, paybill):
    seen = []
    client = DarajaClient(sandbox.base_url, observer=lambda op, outcome, s: seen.append((op, outcome, s >= 0)))
    try:
        accepted = await client.push(app_credentials, paybill, push_request(receiver.new_url()))
        await client.query(app_credentials, paybill, accepted.checkout_request_id)
        with pytest.raises(DarajaError):
            await client.push(app_credentials, Shortcode("999999"), push_request(receiver.new_url()))
    finally:
        await client.aclose()
    assert [(op, outcome) for op, outcome, _ in seen] == [
        ("oauth", "ok"), ("push", "ok"), ("query", "final_success"), ("push", "500.001.1001")]


async def test_no_secret_in_logs_exceptions_or_tracebacks(sandbox, receiver, caplog):
    """Goal: every failure path that handles credentials leaves no secret behind.
    Method: run a success, a refused token refresh, bad credentials, a wrong passkey and a fault
    whose body echoes every secret; search every log record and every exception rendering."""
    caplog.set_level(logging.DEBUG)
    good = AppCredentials(DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY)
    wrong_secret = AppCredentials(DEMO_CONSUMER_KEY, "wrong-secret-value", SANDBOX_PASSKEY)
    wrong_passkey = AppCredentials(DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, "wrong-passkey-value")
    client = DarajaClient(sandbox.base_url)
    errors: list[DarajaError] = []
    try:
        token = (await client.fetch_token(good)).value
        accepted = await client.push(good, Shortcode("174379"), push_request(receiver.new_url()))
        sandbox.state.expire_tokens()
        await client.query(good, Shortcode("174379"), accepted.checkout_request_id)  # refresh path
        current_token = sandbox.state.apps[DEMO_CONSUMER_KEY].token  # the one the client now sends
        echo = " ".join([current_token, DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY])
        sandbox.state.add_fault(Fault("push", status=401, body=f'{{"errorCode": "401.003.01", '
                                                               f'"errorMessage": "Invalid Access Token - {echo}"}}'))
        for app, action in ((good, "push"), (wrong_secret, "token"), (wrong_passkey, "push")):
            try:
                if action == "token":
                    await client.fetch_token(app)
                else:
                    await client.push(app, Shortcode("174379"), push_request(receiver.new_url()))
            except DarajaError as exc:
                errors.append(exc)
    finally:
        await client.aclose()
    assert len(errors) == 3
    rendered = [r.getMessage() + repr(r.args) for r in caplog.records]
    rendered += [f"{e} {e!r} {e.reason}" + "".join(traceback.format_exception(e)) for e in errors]
    password_prefix = stk_password("174379", SANDBOX_PASSKEY, "")  # every Password starts like this
    secrets = [DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY, "wrong-secret-value", "wrong-passkey-value",
               token, current_token, password_prefix[:40], SANDBOX_PASSKEY[:20], SANDBOX_PASSKEY[-20:]]
    leaks = [(s, text) for s in secrets for text in rendered if s in text]
    assert leaks == []
    assert any("daraja token obtained" in r.getMessage() for r in caplog.records)  # logging did happen


async def test_a_callers_httpx_client_can_be_used_instead(sandbox, receiver, app_credentials, paybill):
    async with httpx.AsyncClient(timeout=DarajaTimeouts(read_s=0.2).to_httpx(), trust_env=False) as http:
        client = DarajaClient(sandbox.base_url, http=http)
        accepted = await client.push(app_credentials, paybill, push_request(receiver.new_url()))
        assert (await client.query(app_credentials, paybill, accepted.checkout_request_id)).result_code == "0"
        with pytest.raises(DarajaError) as caught:
            await client.push(app_credentials, paybill, push_request(receiver.new_url(),
                                                                     phone=await _slow_phone(sandbox, 1000)))
        await client.aclose()  # does not close the caller's client
        assert not http.is_closed
    assert caught.value.kind is ErrorKind.OUTCOME_UNKNOWN


async def test_fake_daraja_on_httpx_mock_transport(app_credentials, paybill):
    def fake_daraja(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/v1/generate":
            return httpx.Response(200, json={"access_token": "T" * 28, "expires_in": "3599"})
        if request.url.path == "/mpesa/stkpush/v1/processrequest":
            raise httpx.ReadError("connection reset", request=request)
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(fake_daraja)) as http:
        client = DarajaClient("https://sandbox.safaricom.co.ke", http=http)
        with pytest.raises(DarajaError) as pushed:
            await client.push(app_credentials, paybill, push_request("https://example.com/cb"))
        with pytest.raises(DarajaError) as queried:
            await client.query(app_credentials, paybill, "ws_CO_1")
    assert (pushed.value.kind, queried.value.kind) == (ErrorKind.OUTCOME_UNKNOWN, ErrorKind.RETRYABLE)


@pytest.mark.parametrize("exc, expected", [
    (aiohttp.ConnectionTimeoutError(), httpx.ConnectTimeout),
    # The connection key only goes into the message, which these cases do not read.
    (aiohttp.ClientConnectorError(None, OSError(111, "refused")), httpx.ConnectError),  # type: ignore[arg-type]
    (aiohttp.SocketTimeoutError(), httpx.ReadTimeout),
    (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
    (aiohttp.ClientConnectionResetError(), httpx.WriteError),
    (aiohttp.ClientOSError(104, "reset"), httpx.ReadError),
    (aiohttp.InvalidURL("x"), httpx.UnsupportedProtocol),
])
def test_aiohttp_failures_speak_httpx(exc, expected):
    assert type(as_httpx_error(exc)) is expected
