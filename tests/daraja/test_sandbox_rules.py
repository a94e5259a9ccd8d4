"""The sandbox's rules without HTTP: field checks, scenario choice, tokens, subscriber locks, the rate
limiter, the push log and settings. Time is driven by fake clocks."""
from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from services.daraja.payloads import stk_password
from services.daraja_sandbox import responses
from services.daraja_sandbox.scenarios import (
    SCENARIOS,
    Overrides,
    choose_scenario,
    misconfiguration_result,
    named_scenario,
)
from services.daraja_sandbox.settings import SANDBOX_PASSKEY, AppConfig, SandboxSettings
from services.daraja_sandbox.state import Fault, Sandbox, ShortcodeAccount, Transaction
from services.daraja_sandbox.validation import PushFields, QueryFields, Rules, validate_push, validate_query

NAIROBI = ZoneInfo("Africa/Nairobi")
NOW = datetime(2026, 9, 18, 15, 30, 0)  # Nairobi wall clock
RULES = Rules(NOW, timestamp_tolerance_s=900, max_amount=250_000, reject_localhost=False)


def push_body(**changes) -> dict:
    body = {"BusinessShortCode": 174379, "Password": "cGFzcw==", "Timestamp": "20260918153000",
            "TransactionType": "CustomerPayBillOnline", "Amount": "1", "PartyA": "254712345678", "PartyB": "174379",
            "PhoneNumber": "254712345678", "CallBackURL": "https://example.invalid/nkap/mpesa",
            "AccountReference": "nkap-live-1", "TransactionDesc": "Payment"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def test_documented_example_body_is_valid():
    fields = validate_push(push_body(), RULES)
    assert isinstance(fields, PushFields)
    assert (fields.business_shortcode, fields.amount, fields.party_b) == ("174379", 1, "174379")


def test_transaction_desc_is_optional():
    assert isinstance(validate_push(push_body(TransactionDesc=None), RULES), PushFields)


@pytest.mark.parametrize("field, value", [
    ("BusinessShortCode", None), ("BusinessShortCode", "1743"), ("Password", ""), ("Timestamp", "20260918"),
    ("Timestamp", "20260918123000"),  # three hours off: UTC sent as Nairobi
    ("Timestamp", "20260918154600"),  # 16 minutes ahead
    ("TransactionType", "CustomerPayBill"), ("Amount", "1.00"), ("Amount", 1.0), ("Amount", True), ("Amount", -1),
    ("Amount", 250_001), ("PartyA", "0712345678"), ("PartyB", "till"), ("PhoneNumber", 254812345678),
    ("CallBackURL", " https://example.com/cb"), ("CallBackURL", "https://example.com/c b"), ("CallBackURL", "mailto:x"),
    ("AccountReference", ""), ("AccountReference", "ABCDEFGHIJKLM"), ("TransactionDesc", "ABCDEFGHIJKLMN"),
])
def test_each_invalid_field_is_named_in_a_400_002_02(field, value):
    failure = validate_push(push_body(**{field: value}), RULES)
    assert failure == responses.invalid_field(field)


def test_timestamp_tolerance_is_inclusive():
    assert isinstance(validate_push(push_body(Timestamp="20260918154500"), RULES), PushFields)


def test_localhost_callbacks_refused_only_when_configured():
    body = push_body(CallBackURL="http://localhost:8080/cb")
    assert isinstance(validate_push(body, RULES), PushFields)
    strict = Rules(NOW, 900, 250_000, reject_localhost=True)
    assert validate_push(body, strict) == responses.invalid_field("CallBackURL")
    assert isinstance(validate_push(push_body(CallBackURL="http://127.0.0.1:8080/cb"), strict), PushFields)


def test_query_fields():
    body = {"BusinessShortCode": "174379", "Password": "x", "Timestamp": "20260918153000", "CheckoutRequestID": " "}
    assert validate_query(body, RULES) == responses.invalid_field("CheckoutRequestID")
    query = validate_query({**body, "CheckoutRequestID": "ws_CO_1"}, RULES)
    assert isinstance(query, QueryFields) and query.checkout_request_id == "ws_CO_1"


def test_scenario_choice_order():
    overrides = Overrides.empty()
    assert choose_scenario("254712345678", 1, overrides).name == "success"
    assert choose_scenario("254700001032", 1, overrides).name == "cancelled"
    assert choose_scenario("254712345678", 91_037, overrides).name == "unreachable"
    assert choose_scenario("254708374149", 1, overrides).name == "unreachable"  # public test MSISDN
    assert choose_scenario("254700005006", 1, overrides).result_code == "SFC_IC0003"
    assert choose_scenario("254700009998", 1, overrides).name == "success"  # unlisted selector
    overrides.default = SCENARIOS["insufficient_funds"]
    assert choose_scenario("254712345678", 1, overrides).name == "insufficient_funds"
    overrides.by_amount[91_037] = SCENARIOS["expired"]
    assert choose_scenario("254700001032", 91_037, overrides).name == "expired"  # admin choices beat the table
    overrides.by_phone["254700001032"] = SCENARIOS["wrong_pin"]
    assert choose_scenario("254700001032", 91_037, overrides).name == "wrong_pin"
    assert choose_scenario("254799999999", 91_037, overrides).name == "expired"


def test_named_scenario_timings():
    scenario = named_scenario("cancelled", callback_delay_ms=10, latency_ms=20)
    assert (scenario.result_code, scenario.callback_delay_ms, scenario.latency_ms) == (1032, 10, 20)
    with pytest.raises(KeyError):
        named_scenario("nope")


@pytest.mark.parametrize("shortcode_type, till, transaction_type, party_b, result", [
    ("till", "600200", "CustomerBuyGoodsOnline", "600200", None),
    ("till", "600200", "CustomerPayBillOnline", "600200", "SFC_IC0003"),
    ("till", "600200", "CustomerBuyGoodsOnline", "600100", 2028),
    ("paybill", None, "CustomerPayBillOnline", "174379", None),
    ("paybill", None, "CustomerBuyGoodsOnline", "174379", 2028),
    ("paybill", None, "CustomerPayBillOnline", "174380", 2028),
])
def test_till_and_paybill_mix_ups(shortcode_type, till, transaction_type, party_b, result):
    store = "600100" if shortcode_type == "till" else "174379"
    assert misconfiguration_result(shortcode_type, store, till, transaction_type, party_b) == result


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_sandbox(**settings) -> tuple[Sandbox, FakeClock]:
    clock = FakeClock()
    sandbox = Sandbox(SandboxSettings(**settings), [AppConfig("key", "secret")], clock=clock,
                      wall_clock=lambda: datetime(2026, 9, 18, 15, 30, tzinfo=NAIROBI))
    return sandbox, clock


def test_new_token_invalidates_the_previous_one():
    sandbox, _ = make_sandbox()
    app = sandbox.apps["key"]
    first = sandbox.issue_token(app)
    second = sandbox.issue_token(app)
    assert sandbox.app_for_bearer(f"Bearer {first}") == responses.INVALID_TOKEN
    assert sandbox.app_for_bearer(f"Bearer {second}") is app
    assert app.tokens_issued == 2


def test_previous_tokens_can_be_kept_valid():
    sandbox, _ = make_sandbox(invalidate_previous_tokens=False)
    app = sandbox.apps["key"]
    first, _ = sandbox.issue_token(app), sandbox.issue_token(app)
    assert sandbox.app_for_bearer(f"Bearer {first}") is app


def test_tokens_expire():
    sandbox, clock = make_sandbox(token_ttl_s=60)
    token = sandbox.issue_token(sandbox.apps["key"])
    clock.now += 59.9
    assert sandbox.app_for_bearer(f"Bearer {token}") is sandbox.apps["key"]
    clock.now += 0.2
    assert sandbox.app_for_bearer(f"Bearer {token}") == responses.INVALID_TOKEN
    assert sandbox.app_for_bearer(token) == responses.INVALID_AUTH_HEADER  # no "Bearer"


def test_basic_credentials_must_match():
    sandbox, _ = make_sandbox()
    assert sandbox.app_for_basic("key", "secret") is sandbox.apps["key"]
    assert sandbox.app_for_basic("key", "secreT") is None
    assert sandbox.app_for_basic("other", "secret") is None


def accept(sandbox: Sandbox, phone: str = "254712345678") -> Transaction:
    fields = validate_push(push_body(PhoneNumber=phone, PartyA=phone), RULES)
    account = sandbox.merchant_for("174379", stk_password("174379", SANDBOX_PASSKEY, "20260918153000"),
                                   "20260918153000")
    assert isinstance(fields, PushFields) and isinstance(account, ShortcodeAccount)
    return sandbox.accept_push(fields, account)


def test_wrong_password_and_unknown_merchant():
    sandbox, _ = make_sandbox()
    assert sandbox.merchant_for("174379", "bad", "20260918153000") == responses.WRONG_CREDENTIALS
    assert sandbox.merchant_for("999999", "bad", "20260918153000") == responses.MERCHANT_MISSING


def test_one_open_prompt_per_phone_until_its_outcome():
    sandbox, clock = make_sandbox(callback_delay_ms=30_000)
    accept(sandbox)
    assert sandbox.check_subscriber("254712345678") == responses.SUBSCRIBER_LOCKED
    assert sandbox.check_subscriber("254799999999") is None
    clock.now += 30
    assert sandbox.check_subscriber("254712345678") is None


def test_subscriber_lock_can_be_switched_off():
    sandbox, _ = make_sandbox(callback_delay_ms=30_000, subscriber_lock=False)
    accept(sandbox)
    assert sandbox.check_subscriber("254712345678") is None


def test_query_is_pending_until_the_outcome_time_then_final():
    sandbox, clock = make_sandbox(callback_delay_ms=10_000, pending_query_style="4999")
    txn = accept(sandbox)
    query = validate_query({"BusinessShortCode": "174379", "Password": "x", "Timestamp": "20260918153000",
                            "CheckoutRequestID": txn.checkout_request_id}, RULES)
    assert isinstance(query, QueryFields)
    status, body, final = sandbox.query_answer(query)
    assert (status, final) == (200, None) and b'"ResultCode":"4999"' in body
    clock.now += 10
    status, body, final = sandbox.query_answer(query)
    assert (status, final) == (200, txn) and b'"ResultCode":"0"' in body


def test_spike_arrest_allows_a_burst_then_the_rate():
    sandbox, clock = make_sandbox(rate_limit_per_s=10, rate_limit_burst=2)
    assert [sandbox.allow_request() for _ in range(3)] == [True, True, False]
    clock.now += 0.11  # one more request's worth at 10 per second
    assert [sandbox.allow_request(), sandbox.allow_request()] == [True, False]
    unlimited, _ = make_sandbox(rate_limit_per_s=0, rate_limit_burst=0)  # 0 = off
    assert all(unlimited.allow_request() for _ in range(100))


def test_spike_arrest_starts_afresh_with_new_settings():
    sandbox, _ = make_sandbox(rate_limit_per_s=10, rate_limit_burst=1)
    assert [sandbox.allow_request() for _ in range(2)] == [True, False]
    sandbox.update_settings({"rate_limit_burst": 3})
    assert [sandbox.allow_request() for _ in range(4)] == [True, True, True, False]
    sandbox.update_settings({"rate_limit_per_s": 0})
    assert all(sandbox.allow_request() for _ in range(100))


def test_push_log_filters_and_refuses_unknown_filters():
    sandbox, _ = make_sandbox(callback_delay_ms=0)
    body = push_body()
    sandbox.record_push(body, accept(sandbox))
    sandbox.record_push(body, responses.SPIKE_ARREST)
    assert len(sandbox.pushes_matching({"AccountReference": "nkap-live-1"})) == 2
    assert [p["errorCode"] for p in sandbox.pushes_matching({"status": "rejected"})] == ["500.003.02"]
    assert "Password" not in sandbox.pushes_matching({})[0]
    with pytest.raises(ValueError):
        sandbox.pushes_matching({"Passwrd": "x"})


def test_oldest_transactions_are_forgotten_beyond_the_cap():
    sandbox, _ = make_sandbox(callback_delay_ms=0, max_transactions=3)
    ids = [accept(sandbox, f"25471234567{i}").checkout_request_id for i in range(5)]
    assert list(sandbox.transactions) == ids[2:]


def test_reset_forgets_state_but_keeps_apps_and_tokens():
    sandbox, _ = make_sandbox(callback_delay_ms=5)
    token = sandbox.issue_token(sandbox.apps["key"])
    sandbox.update_settings({"latency_ms": 300})
    sandbox.overrides.default = SCENARIOS["cancelled"]
    sandbox.add_fault(Fault("push"))
    accept(sandbox)
    sandbox.reset()
    assert (sandbox.transactions, sandbox.locks, sandbox.faults, list(sandbox.pushes)) == ({}, {}, [], [])
    assert sandbox.settings.latency_ms == 0 and sandbox.overrides == Overrides.empty()
    assert sandbox.app_for_bearer(f"Bearer {token}") is sandbox.apps["key"]


@pytest.mark.parametrize("changes", [{"latency_ms": -1}, {"latency_ms": "300"}, {"subscriber_lock": 1},
                                     {"pending_query_style": "sometimes"}, {"callback_concurrency": 5},
                                     {"no_such_setting": 1}, {"token_ttl_s": 0}])
def test_bad_setting_changes_are_refused(changes):
    with pytest.raises(ValueError):
        SandboxSettings().updated(changes)


def test_setting_changes_apply():
    updated = SandboxSettings().updated({"latency_ms": 300, "rate_limit_per_s": 50, "subscriber_lock": False})
    assert (updated.latency_ms, updated.rate_limit_per_s, updated.subscriber_lock) == (300, 50.0, False)
    assert updated.effective_burst == 5


@pytest.mark.parametrize("app", [
    {"consumer_key": "k", "consumer_secret": ""}, {"consumer_key": "k:x", "consumer_secret": "s"},
    {"consumer_key": "k", "consumer_secret": "s", "shortcode": "12"},
    {"consumer_key": "k", "consumer_secret": "s", "shortcode": "600100", "passkey": "p", "shortcode_type": "till"},
    {"consumer_key": "k", "consumer_secret": "s", "shortcode": "600100", "passkey": "p", "till_number": "600200"},
    {"consumer_key": "k", "consumer_secret": "s", "colour": "blue"},
])
def test_bad_app_configs_are_refused(app):
    with pytest.raises(ValueError):
        AppConfig.from_json(app)


@pytest.mark.parametrize("fault", [{"operation": "refund"}, {"operation": "push", "remaining": 0},
                                   {"operation": "push", "status": 99}])
def test_bad_faults_are_refused(fault):
    with pytest.raises(ValueError):
        Fault(**fault)


def test_faults_are_used_up_in_order():
    sandbox, _ = make_sandbox()
    sandbox.add_fault(Fault("push", remaining=2, status=503))
    sandbox.add_fault(Fault("query", status=502))
    assert [f.status if f else None for f in (sandbox.take_fault("push"), sandbox.take_fault("push"),
                                               sandbox.take_fault("push"), sandbox.take_fault("query"))] == \
        [503, 503, None, 502]
