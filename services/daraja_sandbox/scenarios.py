"""How the sandbox decides what happens to an accepted STK push (pure, no I/O).

A *scenario* fixes the ResultCode, the callback plan and optional timings. It is chosen, first
match wins, by:

1. an admin override for the phone number (`POST /sandbox/scenarios {"phone": ..., "scenario": ...}`);
2. an admin override for the amount (`{"amount": ..., "scenario": ...}`);
3. the built-in table below;
4. the default scenario (`{"default": true, "scenario": ...}`), initially `success`.

Built-in table. A *selector* is read from the phone number or the amount:
phone ``25470000SSSS`` gives selector SSSS, an amount ``9SSSS`` (90000-99999) gives selector SSSS.
Phone 254708374149, the public sandbox's test MSISDN, always times out (1037) as on the real
sandbox (docs/daraja.md §6). Selectors not listed fall through to the default.

======== =========================== ==========================================================
selector scenario                    what happens
======== =========================== ==========================================================
0        success                     callback 0 with receipt, query 0
1        insufficient_funds          ResultCode 1
2        below_minimum               ResultCode 2
3        above_maximum               ResultCode 3
4        daily_limit                 ResultCode 4
8        balance_limit               ResultCode 8
17       rule_limited                ResultCode 17
26       system_busy                 ResultCode 26
1001     subscriber_locked           ResultCode 1001
1019     expired                     ResultCode 1019
1025     push_error                  ResultCode 1025
1032     cancelled                   ResultCode 1032 (callback and query texts differ, as observed)
1036     smsc_timeout                ResultCode 1036
1037     unreachable                 ResultCode 1037 ("No response from user." / "DS timeout …")
1101     prompt_prefix_too_long      ResultCode 1101
1102     prompt_too_long             ResultCode 1102
2001     wrong_pin                   ResultCode 2001
2028     not_permitted               ResultCode 2028
8006     pin_locked                  ResultCode 8006
9999     push_failed                 ResultCode 9999
5001     no_callback                 success, but no callback is ever sent (only the query tells)
5002     duplicate_callback          success, the same callback is sent twice
5003     late_callback               success; the callback is sent only after a query has
                                     returned the final answer
5004     query_contradicts           callback 0 with receipt, but the query says 1032
5005     slow_callback               success, callback after 5 s (override with callback_delay_ms)
5006     operator_missing            ResultCode "SFC_IC0003" (a string, as Daraja sends it)
5007     slow_response               success, the push is answered after 5 s (latency_ms)
5008     contradicted_late_callback  the query says 1032; the callback (0 with receipt) comes
                                     only after that answer: money moved after a "cancel"
5009     masked_phone                success; the callback's PhoneNumber is masked, a string such
                                     as "25470****149", the form Daraja's C2B confirmations use
======== =========================== ==========================================================

Independently of the scenario, a push whose TransactionType/PartyB do not fit the shortcode
(docs/daraja.md §2 "Till vs Paybill") fails in the callback: a till store pushed as a paybill gets
"SFC_IC0003", any other mismatch gets 2028.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

TEST_MSISDN = "254708374149"
SELECTOR_PHONE_PREFIX = "25470000"
SELECTOR_AMOUNT_BASE = 90_000
PAYBILL_TRANSACTION = "CustomerPayBillOnline"
TILL_TRANSACTION = "CustomerBuyGoodsOnline"

CallbackPlan = Literal["once", "none", "twice", "after_query"]


@dataclass(frozen=True)
class ResultText:
    callback_desc: str
    query_desc: str


def _same(text: str) -> ResultText:
    return ResultText(text, text)


SUCCESS_DESC = "The service request is processed successfully."
# docs/daraja.md §3 "ResultCode catalogue". The prose varies by channel and era; where the callback and
# the query were observed to say different things for one code, both are kept.
RESULT_CATALOGUE: dict[int | str, ResultText] = {
    0: _same(SUCCESS_DESC),
    1: _same("The balance is insufficient for the transaction."),
    2: _same("Declined due to limit rule: less than the minimum transaction amount."),
    3: _same("Declined due to limit rule: greater than the maximum transaction amount."),
    4: _same("Declined due to limit rule: would exceed daily transfer limit."),
    8: _same("Declined due to limit rule: would exceed the maximum balance."),
    17: _same("Rule limited."),
    26: _same("System busy. The service request is rejected."),
    1001: _same("Unable to lock subscriber, a transaction is already in process for the current subscriber"),
    1019: _same("Transaction has expired."),
    1025: _same("An error occurred while sending a push request."),
    1032: ResultText("Request cancelled by user", "Request Cancelled by user."),
    1036: _same("SMSC ACK timeout."),
    1037: ResultText("No response from user.", "DS timeout user cannot be reached."),
    1101: _same("Invalid Input parameter 'Prompt message prefix', length should be less than 94 characters"),
    1102: _same("Invalid Input parameter 'Prompt message prefix', combined length should be less than 93"),
    2001: _same("The initiator information is invalid."),
    2028: _same("The request is not permitted according to product assignment."),
    8006: _same("The security credential is locked."),
    9999: _same("An error occurred while sending a push request."),
    "SFC_IC0003": _same("The operator does not exist."),
}
FAILURE_CODES = tuple(code for code in RESULT_CATALOGUE if code != 0)


@dataclass(frozen=True)
class Scenario:
    name: str
    result_code: int | str = 0  # as sent in the callback: an int, or "SFC_IC0003"
    callback: CallbackPlan = "once"
    query_result_code: int | str | None = None  # set only to contradict the callback
    callback_delay_ms: int | None = None  # None: the sandbox-wide setting
    latency_ms: int | None = None  # extra wait before the push is answered; None: none
    masked_phone: bool = False  # the success callback's PhoneNumber masked ("25470****149"), as a string

    @property
    def answered_query_code(self) -> int | str:
        return self.result_code if self.query_result_code is None else self.query_result_code


_FAILURE_NAMES: dict[int | str, str] = {
    1: "insufficient_funds", 2: "below_minimum", 3: "above_maximum", 4: "daily_limit", 8: "balance_limit",
    17: "rule_limited", 26: "system_busy", 1001: "subscriber_locked", 1019: "expired", 1025: "push_error",
    1032: "cancelled", 1036: "smsc_timeout", 1037: "unreachable", 1101: "prompt_prefix_too_long",
    1102: "prompt_too_long", 2001: "wrong_pin", 2028: "not_permitted", 8006: "pin_locked", 9999: "push_failed",
    "SFC_IC0003": "operator_missing",
}
SCENARIOS: dict[str, Scenario] = {
    "success": Scenario("success"),
    **{name: Scenario(name, code) for code, name in _FAILURE_NAMES.items()},
    "no_callback": Scenario("no_callback", callback="none"),
    "duplicate_callback": Scenario("duplicate_callback", callback="twice"),
    "late_callback": Scenario("late_callback", callback="after_query"),
    "query_contradicts": Scenario("query_contradicts", query_result_code=1032),
    "slow_callback": Scenario("slow_callback", callback_delay_ms=5000),
    "slow_response": Scenario("slow_response", latency_ms=5000),
    "contradicted_late_callback": Scenario("contradicted_late_callback", callback="after_query",
                                           query_result_code=1032),
    "masked_phone": Scenario("masked_phone", masked_phone=True),
}
SELECTORS: dict[int, str] = {
    0: "success",
    **{code: name for code, name in _FAILURE_NAMES.items() if isinstance(code, int)},
    5001: "no_callback", 5002: "duplicate_callback", 5003: "late_callback", 5004: "query_contradicts",
    5005: "slow_callback", 5006: "operator_missing", 5007: "slow_response", 5008: "contradicted_late_callback",
    5009: "masked_phone",
}


@dataclass
class Overrides:
    """Admin choices; mutable because the admin API edits them while the sandbox runs."""

    by_phone: dict[str, Scenario]
    by_amount: dict[int, Scenario]
    default: Scenario

    @classmethod
    def empty(cls) -> Overrides:
        return cls({}, {}, SCENARIOS["success"])


def choose_scenario(phone: str, amount: int, overrides: Overrides) -> Scenario:
    return (overrides.by_phone.get(phone) or overrides.by_amount.get(amount)
            or built_in_scenario(phone, amount) or overrides.default)


def built_in_scenario(phone: str, amount: int) -> Scenario | None:
    if phone == TEST_MSISDN:
        return SCENARIOS["unreachable"]
    if phone.startswith(SELECTOR_PHONE_PREFIX) and len(phone) == 12:
        return _by_selector(int(phone[-4:]))
    if SELECTOR_AMOUNT_BASE <= amount < SELECTOR_AMOUNT_BASE + 10_000:
        return _by_selector(amount - SELECTOR_AMOUNT_BASE)
    return None


def _by_selector(selector: int) -> Scenario | None:
    name = SELECTORS.get(selector)
    return SCENARIOS[name] if name else None


def named_scenario(name: str, *, callback_delay_ms: int | None = None, latency_ms: int | None = None) -> Scenario:
    """A catalogue scenario with optional timing overrides; KeyError for an unknown name."""
    scenario = SCENARIOS[name]
    if callback_delay_ms is not None:
        scenario = replace(scenario, callback_delay_ms=callback_delay_ms)
    if latency_ms is not None:
        scenario = replace(scenario, latency_ms=latency_ms)
    return scenario


def misconfiguration_result(shortcode_type: str, business_shortcode: str, till_number: str | None,
                            transaction_type: str, party_b: str) -> int | str | None:
    """The callback ResultCode a Till/Paybill mix-up earns, or None when the push fits the shortcode."""
    if shortcode_type == "till":
        if transaction_type != TILL_TRANSACTION:
            return "SFC_IC0003"
        return None if party_b == till_number else 2028
    if transaction_type != PAYBILL_TRANSACTION:
        return 2028
    return None if party_b == business_shortcode else 2028


def with_result(scenario: Scenario, result_code: int | str) -> Scenario:
    return replace(scenario, name="misconfigured", result_code=result_code, query_result_code=None)
