"""Contract tests: the Daraja client against the sandbox, one case of docs/daraja.md at a time.

Each test drives the real client over HTTP against the in-process sandbox and checks both what the
client returned or raised and what the sandbox saw (pushes recorded, tokens issued, callbacks sent).
Cases the client itself cannot produce (decimal amounts, wrong content types) are sent raw with the
client's token, and the sandbox's answer is fed to the client's parser.
"""
from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest

from services.daraja.client import DarajaClient
from services.daraja.errors import DarajaError, ErrorKind
from services.daraja.models import AppCredentials, QueryStatus, Shortcode
from services.daraja.parsing import parse_push_response, parse_token_response
from services.daraja.payloads import build_push_payload, nairobi_timestamp
from services.daraja_sandbox.responses import INVALID_TOKEN, error_body
from services.daraja_sandbox.scenarios import FAILURE_CODES, RESULT_CATALOGUE, Overrides, named_scenario
from services.daraja_sandbox.settings import DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY
from services.daraja_sandbox.state import Fault
from tests.daraja.conftest import (
    NO_PRODUCT_KEY,
    NO_PRODUCT_SECRET,
    TILL_KEY,
    TILL_NUMBER,
    TILL_PASSKEY,
    TILL_SECRET,
    TILL_STORE,
    new_phone,
    push_request,
)

PUSH_PATH = "/mpesa/stkpush/v1/processrequest"


def tokens_issued(sandbox, key: str = DEMO_CONSUMER_KEY) -> int:
    return sandbox.state.apps[key].tokens_issued


def callback_json(received) -> dict:
    return json.loads(received.body)["Body"]["stkCallback"]


# --- OAuth -------------------------------------------------------------------------------------


async def test_token_is_28_characters_and_lives_3599_seconds(client, app_credentials):
    token = await client.fetch_token(app_credentials)
    assert (len(token.value), token.expires_in_s) == (28, 3599)


async def test_wrong_consumer_secret_is_permanent_and_never_echoed(client, sandbox):
    app = AppCredentials(DEMO_CONSUMER_KEY, "not-the-secret", SANDBOX_PASSKEY)
    with pytest.raises(DarajaError) as caught:
        await client.fetch_token(app)
    assert (caught.value.kind, caught.value.error_code, caught.value.http_status) == \
        (ErrorKind.PERMANENT, "400.008.01", 400)
    assert "not-the-secret" not in str(caught.value) and DEMO_CONSUMER_KEY not in str(caught.value)


async def test_wrong_grant_type_is_refused_400_008_02(sandbox, raw_http):
    response = await raw_http.get(f"{sandbox.base_url}/oauth/v1/generate?grant_type=password",
                                  auth=(DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET))
    with pytest.raises(DarajaError) as caught:
        parse_token_response(response.status_code, response.content)
    assert (caught.value.error_code, caught.value.kind) == ("400.008.02", ErrorKind.PERMANENT)


async def test_concurrent_calls_share_one_token_request(client, sandbox, receiver, app_credentials, paybill):
    before = tokens_issued(sandbox)
    url = receiver.new_url()
    await asyncio.gather(*(client.push(app_credentials, paybill, push_request(url)) for _ in range(30)))
    assert tokens_issued(sandbox) == before + 1
    assert len(sandbox.accepted_pushes(CallBackURL=url)) == 30


async def test_token_is_refreshed_before_it_expires(sandbox, receiver, app_credentials, paybill):
    now = [1000.0]
    client = DarajaClient(sandbox.base_url, clock=lambda: now[0], token_refresh_margin_s=300)
    try:
        url = receiver.new_url()
        await client.push(app_credentials, paybill, push_request(url))
        before = tokens_issued(sandbox)
        now[0] += 3599 - 300 + 1  # inside the refresh margin, before Daraja's expiry
        await client.push(app_credentials, paybill, push_request(url))
    finally:
        await client.aclose()
    assert tokens_issued(sandbox) == before + 1
    assert sandbox.all_pushes(CallBackURL=url, status="rejected") == []


async def test_expired_token_is_refreshed_once_and_the_push_retried(client, sandbox, receiver, app_credentials,
                                                                    paybill):
    url = receiver.new_url()
    await client.push(app_credentials, paybill, push_request(url))
    sandbox.state.expire_tokens(DEMO_CONSUMER_KEY)
    accepted = await client.push(app_credentials, paybill, push_request(url, reference="SECOND"))
    rejected = sandbox.all_pushes(AccountReference="SECOND", status="rejected")
    assert [p["errorCode"] for p in rejected] == ["404.001.03"]
    assert [p["CheckoutRequestID"] for p in sandbox.accepted_pushes(AccountReference="SECOND")] == \
        [accepted.checkout_request_id]


async def test_token_invalidated_by_a_newer_token_for_the_same_app(client, sandbox, receiver, app_credentials,
                                                                   paybill):
    url = receiver.new_url()
    await client.push(app_credentials, paybill, push_request(url))
    other_process = DarajaClient(sandbox.base_url)
    await other_process.fetch_token(app_credentials)  # docs/daraja.md §1: invalidates our cached token
    await other_process.aclose()
    before = tokens_issued(sandbox)
    results = await asyncio.gather(*(client.push(app_credentials, paybill, push_request(url, reference="AFTER"))
                                     for _ in range(20)))
    assert len({r.checkout_request_id for r in results}) == 20
    assert tokens_issued(sandbox) == before + 1  # twenty refusals, one refresh
    assert {p["errorCode"] for p in sandbox.all_pushes(AccountReference="AFTER", status="rejected")} == {"404.001.03"}


async def test_token_refused_again_after_one_refresh_is_permanent(client, sandbox, receiver, app_credentials,
                                                                  paybill):
    refusal = error_body("b4f2-4bdd", INVALID_TOKEN).decode()
    sandbox.state.add_fault(Fault("push", remaining=2, status=404, body=refusal))
    before = tokens_issued(sandbox)
    with pytest.raises(DarajaError) as caught:
        await client.push(app_credentials, paybill, push_request(receiver.new_url()))
    assert (caught.value.kind, caught.value.error_code) == (ErrorKind.PERMANENT, "404.001.03")
    assert tokens_issued(sandbox) == before + 2  # the first token, then exactly one refresh


async def test_app_without_the_stk_product_is_permanent_401_003_01(client, receiver, paybill):
    app = AppCredentials(NO_PRODUCT_KEY, NO_PRODUCT_SECRET, SANDBOX_PASSKEY)
    with pytest.raises(DarajaError) as caught:
        await client.push(app, paybill, push_request(receiver.new_url()))
    assert (caught.value.kind, caught.value.error_code, caught.value.http_status) == \
        (ErrorKind.PERMANENT, "401.003.01", 401)


# --- STK push: synchronous refusals --------------------------------------------------------------


async def test_wrong_passkey_is_permanent_wrong_credentials(client, sandbox, receiver, paybill):
    app = AppCredentials(DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, "not-the-passkey")
    with pytest.raises(DarajaError) as caught:
        await client.push(app, paybill, push_request(receiver.new_url(), reference="BADPASS"))
    assert (caught.value.kind, caught.value.error_code, caught.value.reason) == \
        (ErrorKind.PERMANENT, "500.001.1001", "Wrong credentials")
    assert "not-the-passkey" not in str(caught.value)
    assert sandbox.accepted_pushes(AccountReference="BADPASS") == []


async def test_unknown_shortcode_is_permanent_merchant_does_not_exist(client, receiver, app_credentials):
    with pytest.raises(DarajaError) as caught:
        await client.push(app_credentials, Shortcode("999999"), push_request(receiver.new_url()))
    assert (caught.value.kind, caught.value.reason) == (ErrorKind.PERMANENT, "Merchant does not exist")


async def test_clock_three_hours_off_gets_invalid_timestamp(sandbox, receiver, app_credentials, paybill):
    # The classic bug: a UTC server formatting its own clock (docs/daraja.md §2 Timestamp).
    utc_as_if_nairobi = lambda: datetime.now(timezone.utc) - timedelta(hours=3)  # noqa: E731
    client = DarajaClient(sandbox.base_url, wall_clock=utc_as_if_nairobi)
    try:
        with pytest.raises(DarajaError) as caught:
            await client.push(app_credentials, paybill, push_request(receiver.new_url()))
    finally:
        await client.aclose()
    assert (caught.value.kind, caught.value.error_code, caught.value.reason) == \
        (ErrorKind.PERMANENT, "400.002.02", "Bad Request - Invalid Timestamp")


async def test_second_prompt_to_a_busy_phone_is_retryable_after_a_minute(client, sandbox, receiver,
                                                                         app_credentials, paybill):
    sandbox.state.update_settings({"callback_delay_ms": 60_000})  # the first prompt stays open
    phone, url = new_phone(), receiver.new_url()
    await client.push(app_credentials, paybill, push_request(url, phone=phone))
    with pytest.raises(DarajaError) as caught:
        await client.push(app_credentials, paybill, push_request(url, phone=phone))
    error = caught.value
    assert (error.kind, error.error_code, error.retry_after_s) == (ErrorKind.RETRYABLE, "500.001.1001", 60)
    assert "Unable to lock subscriber" in error.reason
    assert len(sandbox.accepted_pushes(PhoneNumber=phone)) == 1


async def test_spike_arrest_is_retryable(client, sandbox, receiver, app_credentials, paybill):
    await client.fetch_token(app_credentials)
    sandbox.state.update_settings({"rate_limit_per_s": 0.1, "rate_limit_burst": 1})  # one now, next in 10 s
    url = receiver.new_url()
    outcomes = await asyncio.gather(*(client.push(app_credentials, paybill, push_request(url)) for _ in range(5)),
                                    return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, DarajaError)]
    assert len(refused) == 4 and len(sandbox.accepted_pushes(CallBackURL=url)) == 1
    assert {(e.kind, e.error_code, e.reason) for e in refused} == \
        {(ErrorKind.RETRYABLE, "500.003.02", "Error Occurred: Spike Arrest Violation")}


def _valid_payload(callback_url: str) -> dict:
    return build_push_payload(Shortcode("174379"), push_request(callback_url), SANDBOX_PASSKEY,
                              nairobi_timestamp(datetime.now(timezone.utc)))


@pytest.mark.parametrize("field, value, message", [
    ("Amount", "1.00", "Invalid Amount"), ("Amount", 1.5, "Invalid Amount"), ("Amount", 0, "Invalid Amount"),
    ("Amount", 250_001, "Invalid Amount"), ("PhoneNumber", "0712345678", "Invalid PhoneNumber"),
    ("PartyA", "254812345678", "Invalid PartyA"), ("CallBackURL", "https://exa mple.com/cb", "Invalid CallBackURL"),
    ("CallBackURL", "not a url", "Invalid CallBackURL"), ("AccountReference", "A" * 13, "Invalid AccountReference"),
    ("TransactionDesc", "D" * 14, "Invalid TransactionDesc"),
    ("TransactionType", "CustomerPayMerchant", "Invalid TransactionType"),
    ("BusinessShortCode", "17437X", "Invalid BusinessShortCode"),
    ("Timestamp", "2026-01-01 10:00", "Invalid Timestamp"),
    ("Timestamp", "20261301000000", "Invalid Timestamp"),
])
async def test_invalid_fields_are_permanent_400_002_02(client, sandbox, receiver, raw_http, app_credentials,
                                                       field, value, message):
    token = (await client.fetch_token(app_credentials)).value
    payload = {**_valid_payload(receiver.new_url()), field: value}
    response = await raw_http.post(f"{sandbox.base_url}{PUSH_PATH}", json=payload,
                                   headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(DarajaError) as caught:
        parse_push_response(response.status_code, response.content)
    assert (caught.value.kind, caught.value.error_code, caught.value.reason) == \
        (ErrorKind.PERMANENT, "400.002.02", f"Bad Request - {message}")


async def test_localhost_callback_is_refused_when_configured_like_real_daraja(client, sandbox, receiver,
                                                                              app_credentials, paybill):
    sandbox.state.update_settings({"reject_localhost": True})
    localhost_url = receiver.new_url().replace("127.0.0.1", "localhost")
    with pytest.raises(DarajaError) as caught:
        await client.push(app_credentials, paybill, push_request(localhost_url))
    assert caught.value.reason == "Bad Request - Invalid CallBackURL"
    await client.push(app_credentials, paybill, push_request(receiver.new_url()))  # 127.0.0.1 is fine


@pytest.mark.parametrize("headers, content, code", [
    ({"Content-Type": "text/plain"}, None, "400.002.02"),  # documented cause of Invalid BusinessShortCode
    ({"Content-Type": "application/json"}, b"{not json", "400.002.05"),
])
async def test_malformed_requests(client, sandbox, receiver, raw_http, app_credentials, headers, content, code):
    token = (await client.fetch_token(app_credentials)).value
    body = content if content is not None else json.dumps(_valid_payload(receiver.new_url())).encode()
    response = await raw_http.post(f"{sandbox.base_url}{PUSH_PATH}", content=body,
                                   headers={**headers, "Authorization": f"Bearer {token}"})
    with pytest.raises(DarajaError) as caught:
        parse_push_response(response.status_code, response.content)
    assert (caught.value.error_code, caught.value.kind) == (code, ErrorKind.PERMANENT)


@pytest.mark.parametrize("method, headers, code", [
    ("POST", {}, "404.001.04"), ("POST", {"Authorization": "Bearer not-a-token"}, "404.001.03"),
    ("GET", {}, "405.001"),
])
async def test_gateway_refusals(sandbox, raw_http, method, headers, code):
    response = await raw_http.request(method, f"{sandbox.base_url}{PUSH_PATH}", json={}, headers=headers)
    with pytest.raises(DarajaError) as caught:
        parse_push_response(response.status_code, response.content)
    assert (caught.value.error_code, caught.value.kind) == (code, ErrorKind.PERMANENT)


# --- Outcomes: callbacks and queries -------------------------------------------------------------


async def test_success_callback_carries_receipt_and_query_agrees(client, receiver, app_credentials, paybill):
    url, phone = receiver.new_url(), new_phone()
    accepted = await client.push(app_credentials, paybill, push_request(url, phone=phone, amount=150))
    [callback] = await receiver.wait_for(url)
    stk = callback_json(callback)
    items = {item["Name"]: item.get("Value") for item in stk["CallbackMetadata"]["Item"]}
    assert (stk["CheckoutRequestID"], stk["MerchantRequestID"], stk["ResultCode"]) == \
        (accepted.checkout_request_id, accepted.merchant_request_id, 0)
    assert (items["Amount"], items["PhoneNumber"], len(items["MpesaReceiptNumber"])) == (150, int(phone), 10)
    result = await client.query(app_credentials, paybill, accepted.checkout_request_id)
    assert (result.status, result.result_code) == (QueryStatus.FINAL_SUCCESS, "0")


@pytest.mark.parametrize("code", FAILURE_CODES)
async def test_each_failure_result_code_reaches_callback_and_query(client, receiver, app_credentials, paybill, code):
    selector = 5006 if code == "SFC_IC0003" else code  # phone 25470000SSSS selects the scenario
    url = receiver.new_url()
    accepted = await client.push(app_credentials, paybill, push_request(url, phone=f"25470000{selector:04d}"))
    [callback] = await receiver.wait_for(url)
    stk = callback_json(callback)
    assert stk["ResultCode"] == code  # an int, or the string "SFC_IC0003", exactly as Daraja sends it
    assert stk["ResultDesc"] == RESULT_CATALOGUE[code].callback_desc
    assert "CallbackMetadata" not in stk
    result = await client.query(app_credentials, paybill, accepted.checkout_request_id)
    assert (result.status, result.result_code) == (QueryStatus.FINAL_FAILURE, str(code))


async def test_public_test_msisdn_times_out_as_on_the_real_sandbox(client, receiver, app_credentials, paybill):
    url = receiver.new_url()
    accepted = await client.push(app_credentials, paybill, push_request(url, phone="254708374149"))
    [callback] = await receiver.wait_for(url)
    assert (callback_json(callback)["ResultCode"], callback_json(callback)["ResultDesc"]) == \
        (1037, "No response from user.")
    result = await client.query(app_credentials, paybill, accepted.checkout_request_id)
    assert (result.result_code, result.result_desc) == ("1037", "DS timeout user cannot be reached.")


async def test_amount_selects_a_scenario_too(client, receiver, app_credentials, paybill):
    url = receiver.new_url()
    await client.push(app_credentials, paybill, push_request(url, amount=91_032))
    [callback] = await receiver.wait_for(url)
    assert callback_json(callback)["ResultCode"] == 1032


@pytest.mark.parametrize("style", ["4999", "being_processed", "empty", "mixed"])
async def test_query_says_still_processing_in_every_pending_form(client, sandbox, receiver, app_credentials,
                                                                  paybill, style):
    sandbox.state.update_settings({"callback_delay_ms": 60_000, "pending_query_style": style})
    accepted = await client.push(app_credentials, paybill, push_request(receiver.new_url()))
    answers = [await client.query(app_credentials, paybill, accepted.checkout_request_id) for _ in range(3)]
    assert {a.status for a in answers} == {QueryStatus.STILL_PROCESSING}
    described = {a.result_desc for a in answers}
    expected = {"4999": {"The transaction is still under processing"},
                "being_processed": {"The transaction is being processed"}, "empty": {""},
                "mixed": {"The transaction is still under processing", "The transaction is being processed", ""}}
    assert described == expected[style]


async def test_query_turns_final_once_the_outcome_exists(client, sandbox, receiver, app_credentials, paybill):
    sandbox.state.update_settings({"callback_delay_ms": 800})
    url = receiver.new_url()
    accepted = await client.push(app_credentials, paybill, push_request(url))
    early = await client.query(app_credentials, paybill, accepted.checkout_request_id)
    await receiver.wait_for(url)
    late = await client.query(app_credentials, paybill, accepted.checkout_request_id)
    assert (early.status, late.status) == (QueryStatus.STILL_PROCESSING, QueryStatus.FINAL_SUCCESS)


async def test_query_for_an_unknown_checkout_is_not_a_verdict(client, app_credentials, paybill):
    result = await client.query(app_credentials, paybill, "ws_CO_01012026000000000712345678")
    assert (result.status, result.result_desc) == (QueryStatus.STILL_PROCESSING, "The transaction does not Exist")


async def _push_with_scenario(client, sandbox, receiver, app, shortcode, scenario: str, **timings):
    phone, url = new_phone(), receiver.new_url()
    sandbox.state.overrides.by_phone[phone] = named_scenario(scenario, **timings)
    return await client.push(app, shortcode, push_request(url, phone=phone)), url


async def test_no_callback_scenario_leaves_only_the_query(client, sandbox, receiver, app_credentials, paybill):
    accepted, url = await _push_with_scenario(client, sandbox, receiver, app_credentials, paybill, "no_callback")
    result = await client.query(app_credentials, paybill, accepted.checkout_request_id)
    await asyncio.sleep(0.2)
    assert result.status is QueryStatus.FINAL_SUCCESS and receiver.for_url(url) == []


async def test_duplicate_callback_scenario_sends_the_same_bytes_twice(client, sandbox, receiver, app_credentials,
                                                                      paybill):
    _, url = await _push_with_scenario(client, sandbox, receiver, app_credentials, paybill, "duplicate_callback")
    first, second = await receiver.wait_for(url, count=2)
    assert first.body == second.body and callback_json(first)["ResultCode"] == 0


async def test_late_callback_comes_only_after_the_query_answered(client, sandbox, receiver, app_credentials,
                                                                 paybill):
    accepted, url = await _push_with_scenario(client, sandbox, receiver, app_credentials, paybill, "late_callback")
    await asyncio.sleep(0.2)
    assert receiver.for_url(url) == []
    result = await client.query(app_credentials, paybill, accepted.checkout_request_id)
    [callback] = await receiver.wait_for(url)
    assert result.status is QueryStatus.FINAL_SUCCESS and callback_json(callback)["ResultCode"] == 0


async def test_query_can_contradict_the_callback(client, sandbox, receiver, app_credentials, paybill):
    accepted, url = await _push_with_scenario(client, sandbox, receiver, app_credentials, paybill,
                                              "query_contradicts")
    [callback] = await receiver.wait_for(url)
    result = await client.query(app_credentials, paybill, accepted.checkout_request_id)
    assert callback_json(callback)["ResultCode"] == 0 and "CallbackMetadata" in callback_json(callback)
    assert (result.status, result.result_code) == (QueryStatus.FINAL_FAILURE, "1032")


async def test_delayed_callback_scenario(client, sandbox, receiver, app_credentials, paybill):
    started = asyncio.get_running_loop().time()
    accepted, url = await _push_with_scenario(client, sandbox, receiver, app_credentials, paybill, "slow_callback",
                                              callback_delay_ms=800)
    assert (await client.query(app_credentials, paybill, accepted.checkout_request_id)).status \
        is QueryStatus.STILL_PROCESSING
    await receiver.wait_for(url)
    assert asyncio.get_running_loop().time() - started >= 0.8


# --- Till and Paybill --------------------------------------------------------------------------

TILL_APP = AppCredentials(TILL_KEY, TILL_SECRET, TILL_PASSKEY)


async def test_till_push_succeeds_with_store_number_and_till(client, receiver):
    url = receiver.new_url()
    await client.push(TILL_APP, Shortcode(TILL_STORE, "till", TILL_NUMBER), push_request(url))
    [callback] = await receiver.wait_for(url)
    assert callback_json(callback)["ResultCode"] == 0
    assert callback.headers["BusinessShortCode"] == TILL_STORE


async def test_till_store_pushed_as_a_paybill_fails_with_string_code_sfc_ic0003(client, receiver):
    url = receiver.new_url()
    accepted = await client.push(TILL_APP, Shortcode(TILL_STORE), push_request(url))
    [callback] = await receiver.wait_for(url)
    assert callback_json(callback)["ResultCode"] == "SFC_IC0003"
    result = await client.query(TILL_APP, Shortcode(TILL_STORE), accepted.checkout_request_id)
    assert (result.status, result.result_code) == (QueryStatus.FINAL_FAILURE, "SFC_IC0003")


async def test_paybill_pushed_as_buy_goods_fails_with_2028(client, receiver, app_credentials):
    url = receiver.new_url()
    await client.push(app_credentials, Shortcode("174379", "till", "174379"), push_request(url))
    [callback] = await receiver.wait_for(url)
    assert callback_json(callback)["ResultCode"] == 2028


async def test_till_number_used_as_shortcode_does_not_exist(client, receiver):
    with pytest.raises(DarajaError) as caught:
        await client.push(TILL_APP, Shortcode(TILL_NUMBER), push_request(receiver.new_url()))
    assert caught.value.reason == "Merchant does not exist"


# --- Malformed answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault, kind, pushes_accepted", [
    (Fault("push", status=200, body="<html>ok</html>", content_type="text/html", process=True),
     ErrorKind.OUTCOME_UNKNOWN, 1),
    (Fault("push", status=200, body='{"ResponseCode": "0"}', process=True), ErrorKind.OUTCOME_UNKNOWN, 1),
    (Fault("push", status=502, body="<html>Bad Gateway</html>", content_type="text/html"),
     ErrorKind.OUTCOME_UNKNOWN, 0),
    (Fault("push", status=500, body=json.dumps({"Envelope": {"Body": {"Fault": {
        "faultstring": "Execution of ServiceCallout callout_ussd failed"}}}})), ErrorKind.OUTCOME_UNKNOWN, 0),
    (Fault("push", status=403, body="<html>Request unsuccessful. Incapsula incident ID</html>",
           content_type="text/html"), ErrorKind.RETRYABLE, 0),
    (Fault("push", status=500, body=json.dumps({"requestId": "", "errorCode": "500.003.03",
                                                "errorMessage": "Quota Violation"})), ErrorKind.RETRYABLE, 0),
    (Fault("push", status=500, body=json.dumps({"requestId": "", "errorCode": "500.003.01",
                                                "errorMessage": ""})), ErrorKind.RETRYABLE, 0),
])
async def test_malformed_push_answers(client, sandbox, receiver, app_credentials, paybill, fault, kind,
                                      pushes_accepted):
    sandbox.state.add_fault(fault)
    url = receiver.new_url()
    with pytest.raises(DarajaError) as caught:
        await client.push(app_credentials, paybill, push_request(url))
    assert caught.value.kind is kind
    assert len(sandbox.accepted_pushes(CallBackURL=url)) == pushes_accepted  # never pushed twice


@pytest.mark.parametrize("operation", ["query", "oauth"])
async def test_garbage_from_idempotent_calls_is_retryable(client, sandbox, app_credentials, paybill, operation):
    if operation == "query":
        await client.fetch_token(app_credentials)
    sandbox.state.add_fault(Fault(operation, status=200, body="Unable to identify proxy for host",
                                  content_type="text/plain"))
    with pytest.raises(DarajaError) as caught:
        if operation == "query":
            await client.query(app_credentials, paybill, "ws_CO_x")
        else:
            await client.fetch_token(app_credentials)
    assert (caught.value.kind, caught.value.operation) == (ErrorKind.RETRYABLE, operation)


async def test_overrides_do_not_leak_between_tests(sandbox):
    assert sandbox.state.overrides == Overrides.empty()
