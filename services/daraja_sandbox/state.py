"""The sandbox's memory and rules: apps and tokens, shortcodes, accepted pushes and their outcomes,
the log of every push received, subscriber locks, the rate limiter and injected faults.

No I/O here; time comes from the two clocks given, so all of it can be tested directly.
"""
from __future__ import annotations

import random
import secrets
import string
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from services.common.payment import NAIROBI
from services.common.ratelimit import RateLimiter
from services.daraja.result_codes import STILL_PROCESSING_CODE
from services.daraja_sandbox import responses
from services.daraja_sandbox.callbacks import failure_callback, success_callback
from services.daraja_sandbox.responses import Failure
from services.daraja_sandbox.scenarios import (
    RESULT_CATALOGUE,
    Overrides,
    Scenario,
    choose_scenario,
    misconfiguration_result,
    with_result,
)
from services.daraja_sandbox.settings import SANDBOX_PASSKEY, SANDBOX_SHORTCODE, AppConfig, SandboxSettings
from services.daraja_sandbox.validation import PushFields, QueryFields, Rules, password_matches

_TOKEN_ALPHABET = string.ascii_letters + string.digits
_DAY_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUV"
_RECEIPT_ALPHABET = string.ascii_uppercase + string.digits
PUSH_FIELDS = ("BusinessShortCode", "Timestamp", "TransactionType", "Amount", "PartyA", "PartyB", "PhoneNumber",
               "CallBackURL", "AccountReference", "TransactionDesc")  # Password is never kept
PUSH_FILTERS = frozenset(PUSH_FIELDS) | {"CheckoutRequestID", "MerchantRequestID", "status", "errorCode", "scenario"}
_LOCK_PRUNE_AT = 100_000
_EVERY_CALLER = "all"  # spike arrest counts every caller together, as one proxy's limit


def nairobi_now() -> datetime:
    return datetime.now(NAIROBI)


def _compact_time(moment: datetime) -> str:
    """YYYYMMDDHHmmss (strftime costs several times more, and this runs on every push)."""
    return (f"{moment.year:04d}{moment.month:02d}{moment.day:02d}"
            f"{moment.hour:02d}{moment.minute:02d}{moment.second:02d}")


@dataclass
class App:
    config: AppConfig
    token: str | None = None
    tokens_issued: int = 0


@dataclass(frozen=True)
class ShortcodeAccount:
    shortcode: str
    passkey: str
    shortcode_type: str = "paybill"
    till_number: str | None = None


@dataclass
class Transaction:
    """An accepted push: its fixed outcome, when that outcome exists, and what was delivered."""

    merchant_request_id: str
    checkout_request_id: str
    business_shortcode: str
    phone: str
    amount: int
    callback_url: str
    scenario: Scenario
    decided_at: float  # monotonic; before it the query says "still processing"
    callback_body: bytes
    query_polls: int = 0
    late_callback_released: bool = False
    deliveries: list = field(default_factory=list)  # HTTP status or error name, one per attempt
    delivery_times: list = field(default_factory=list)  # when each attempt started (epoch seconds)


@dataclass
class Fault:
    """The next `remaining` calls of `operation` answer with this instead of the real thing."""

    operation: str  # oauth | push | query
    remaining: int = 1
    status: int = 500
    body: str = ""
    content_type: str = "application/json"
    process: bool = False  # handle the request for real (a push is accepted), then answer with this
    drop_connection: bool = False  # close the connection without any answer

    def __post_init__(self) -> None:
        if self.operation not in ("oauth", "push", "query"):
            raise ValueError("operation must be oauth, push or query")
        if self.remaining < 1 or not 100 <= self.status <= 599:
            raise ValueError("remaining must be >= 1 and status an HTTP status")


class Sandbox:
    def __init__(self, settings: SandboxSettings, apps: Iterable[AppConfig] = (), *,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], datetime] = nairobi_now,
                 rng: random.Random | None = None):
        settings.check()
        self.initial_settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        self._rng = rng or random.Random()
        self.apps: dict[str, App] = {}
        self.shortcodes: dict[str, ShortcodeAccount] = {
            SANDBOX_SHORTCODE: ShortcodeAccount(SANDBOX_SHORTCODE, SANDBOX_PASSKEY)}
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (consumer key, expiry)
        self._sequence = self._rng.randrange(10_000_000, 99_999_999)
        for app in apps:
            self.register_app(app)
        self.reset()

    # --- admin -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets pushes, outcomes, locks, overrides and faults; apps and tokens stay."""
        self.settings = self.initial_settings
        self.transactions: dict[str, Transaction] = {}
        self.pushes: deque[dict[str, Any]] = deque(maxlen=self.settings.max_transactions)
        self.locks: dict[str, float] = {}
        self.overrides = Overrides.empty()
        self.faults: list[Fault] = []
        self.counters = {"pushes_received": 0, "pushes_accepted": 0, "callbacks_delivered": 0,
                         "callbacks_failed": 0}
        self.spike_arrest = self._spike_arrest()

    def update_settings(self, changes: dict[str, Any]) -> None:
        self.settings = self.settings.updated(changes)
        self.spike_arrest = self._spike_arrest()

    def _spike_arrest(self) -> RateLimiter | None:
        """A token bucket standing in for Apigee's spike arrest (docs/daraja.md §6); None when off."""
        if self.settings.rate_limit_per_s <= 0:
            return None
        return RateLimiter(self.settings.rate_limit_per_s, self.settings.effective_burst, clock=self.clock)

    def allow_request(self) -> bool:
        """Whether spike arrest lets one more push or query through; one bucket for every caller."""
        return self.spike_arrest is None or self.spike_arrest.take(_EVERY_CALLER) == 0.0

    def register_app(self, config: AppConfig) -> None:
        previous = self.apps.get(config.consumer_key)
        self.apps[config.consumer_key] = App(config, previous.token if previous else None,
                                             previous.tokens_issued if previous else 0)
        if config.shortcode is not None:
            assert config.passkey is not None  # AppConfig.check: a shortcode comes with its passkey
            self.shortcodes[config.shortcode] = ShortcodeAccount(
                config.shortcode, config.passkey, config.shortcode_type, config.till_number)

    def expire_tokens(self, consumer_key: str | None = None) -> int:
        doomed = [t for t, (key, _) in self._tokens.items() if consumer_key in (None, key)]
        for token in doomed:
            del self._tokens[token]
        return len(doomed)

    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def take_fault(self, operation: str) -> Fault | None:
        for fault in self.faults:
            if fault.operation == operation:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.faults.remove(fault)
                return fault
        return None

    def pushes_matching(self, filters: Mapping[str, str]) -> list[dict[str, Any]]:
        unknown = set(filters) - PUSH_FILTERS
        if unknown:
            raise ValueError(f"unknown filters {sorted(unknown)}; use {sorted(PUSH_FILTERS)}")
        return [p for p in self.pushes if all(str(p.get(k)) == v for k, v in filters.items())]

    # --- OAuth -----------------------------------------------------------------------------

    def app_for_basic(self, key: str, secret: str) -> App | None:
        app = self.apps.get(key)
        if app is None or not secrets.compare_digest(app.config.consumer_secret.encode(), secret.encode()):
            return None
        return app

    def issue_token(self, app: App) -> str:
        token = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(28))  # 28 chars as observed (docs/daraja.md §1)
        if self.settings.invalidate_previous_tokens and app.token is not None:
            self._tokens.pop(app.token, None)
        self._tokens[token] = (app.config.consumer_key, self.clock() + self.settings.token_ttl_s)
        app.token = token
        app.tokens_issued += 1
        return token

    def app_for_bearer(self, authorization: str) -> App | Failure:
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token.strip():
            return responses.INVALID_AUTH_HEADER
        entry = self._tokens.get(token.strip())
        if entry is None:
            return responses.INVALID_TOKEN
        if entry[1] <= self.clock():
            del self._tokens[token.strip()]
            return responses.INVALID_TOKEN
        app = self.apps.get(entry[0])
        if app is None:
            return responses.INVALID_TOKEN
        return app if app.config.products_enabled else responses.NO_API_PRODUCT

    # --- STK push --------------------------------------------------------------------------

    def rules(self) -> Rules:
        return Rules(self.wall_clock().replace(tzinfo=None), self.settings.timestamp_tolerance_s,
                     self.settings.max_amount, self.settings.reject_localhost)

    def merchant_for(self, shortcode: str, password: str, timestamp: str) -> ShortcodeAccount | Failure:
        account = self.shortcodes.get(shortcode)
        if account is None:
            return responses.MERCHANT_MISSING
        if not password_matches(password, shortcode, account.passkey, timestamp):
            return responses.WRONG_CREDENTIALS
        return account

    def check_subscriber(self, phone: str) -> Failure | None:
        if self.settings.subscriber_lock and self.locks.get(phone, 0.0) > self.clock():
            return responses.SUBSCRIBER_LOCKED
        return None

    def accept_push(self, push: PushFields, account: ShortcodeAccount) -> Transaction:
        scenario = choose_scenario(push.phone, push.amount, self.overrides)
        misconfigured = misconfiguration_result(account.shortcode_type, account.shortcode, account.till_number,
                                                push.transaction_type, push.party_b)
        if misconfigured is not None:
            scenario = with_result(scenario, misconfigured)
        delay_s = self.callback_delay_s(scenario)
        now, wall = self.clock(), self.wall_clock()
        checkout_request_id = self._checkout_request_id(wall, push.phone)
        merchant_request_id = self._merchant_request_id()
        txn = Transaction(merchant_request_id, checkout_request_id, push.business_shortcode, push.phone,
                          push.amount, push.callback_url, scenario, now + delay_s,
                          self._callback_body(scenario, merchant_request_id, checkout_request_id, push,
                                              wall + timedelta(seconds=delay_s)))
        self._remember(txn)
        if self.settings.subscriber_lock:
            self.locks[push.phone] = txn.decided_at
        return txn

    def callback_delay_s(self, scenario: Scenario) -> float:
        delay_ms = self.settings.callback_delay_ms if scenario.callback_delay_ms is None else scenario.callback_delay_ms
        return delay_ms / 1000

    def push_latency_s(self, scenario: Scenario | None) -> float:
        latency_ms = self.settings.latency_ms
        if scenario is not None and scenario.latency_ms is not None:
            latency_ms = scenario.latency_ms
        return latency_ms / 1000

    def record_push(self, body: Any, outcome: Transaction | Failure) -> None:
        self.counters["pushes_received"] += 1
        record: dict[str, Any] = {"receivedAt": time.time()}  # epoch seconds; rendered by the admin API
        if isinstance(body, dict):
            record.update((name, body[name]) for name in PUSH_FIELDS if name in body)
        if isinstance(outcome, Transaction):
            self.counters["pushes_accepted"] += 1
            record.update(status="accepted", MerchantRequestID=outcome.merchant_request_id,
                          CheckoutRequestID=outcome.checkout_request_id, scenario=outcome.scenario.name,
                          ResultCode=outcome.scenario.result_code, callbacks=outcome.deliveries,
                          callbacksSentAt=outcome.delivery_times)
        else:
            record.update(status="rejected", errorCode=outcome.code, errorMessage=outcome.message)
        self.pushes.append(record)

    def record_delivery(self, checkout_request_id: str, result: int | str, sent_at: float) -> None:
        delivered = isinstance(result, int) and 200 <= result < 300
        self.counters["callbacks_delivered" if delivered else "callbacks_failed"] += 1
        txn = self.transactions.get(checkout_request_id)
        if txn is not None:
            txn.deliveries.append(result)
            txn.delivery_times.append(sent_at)

    # --- STK query -------------------------------------------------------------------------

    def query_answer(self, query: QueryFields) -> tuple[int, bytes, Transaction | None]:
        """(HTTP status, body, the transaction when its final answer was given)."""
        txn = self.transactions.get(query.checkout_request_id)
        if txn is None or txn.business_shortcode != query.business_shortcode:
            return self.error(responses.QUERY_UNKNOWN_CHECKOUT, request_id=query.checkout_request_id) + (None,)
        txn.query_polls += 1
        if self.clock() < txn.decided_at:
            return self._pending_answer(txn) + (None,)
        code = txn.scenario.answered_query_code
        body = responses.query_answer_body(txn.merchant_request_id, txn.checkout_request_id, code,
                                           RESULT_CATALOGUE[code].query_desc)
        return 200, body, txn

    def _pending_answer(self, txn: Transaction) -> tuple[int, bytes]:
        style = self.settings.pending_query_style
        if style == "mixed":  # the sandbox alternates between these for one payment (docs/daraja.md §4)
            style = ("4999", "being_processed", "empty")[(txn.query_polls - 1) % 3]
        if style == "4999":
            return 200, responses.query_answer_body(txn.merchant_request_id, txn.checkout_request_id,
                                                    STILL_PROCESSING_CODE, responses.STILL_PROCESSING_DESC)
        failure = responses.QUERY_BEING_PROCESSED if style == "being_processed" else responses.QUERY_PENDING_EMPTY
        # The 2018 pending answer carried the CheckoutRequestID as requestId (docs/daraja.md §4).
        return self.error(failure, request_id=txn.checkout_request_id)

    # --- helpers ---------------------------------------------------------------------------

    def error(self, failure: Failure, request_id: str | None = None) -> tuple[int, bytes]:
        return failure.status, responses.error_body(request_id or self._request_id(), failure)

    def _request_id(self) -> str:
        bits = self._rng.getrandbits(96)
        hexed = f"{bits:024x}"
        return f"{hexed[:4]}-{hexed[4:8]}-{hexed[8:12]}-{hexed[12:24]}{self._rng.randrange(1000000, 9999999)}"

    def _merchant_request_id(self) -> str:
        self._sequence += 1  # shape of observed ids: "68441-128341933-1"
        return f"{self._rng.randrange(1000, 99999)}-{self._sequence}-1"

    def _checkout_request_id(self, wall: datetime, phone: str) -> str:
        # ws_CO_ + DDMMYYYYHHMMSS + milliseconds + MSISDN without 254, Nairobi time (docs/daraja.md §2).
        stamp = f"{wall.day:02d}{wall.month:02d}{wall.year:04d}{wall.hour:02d}{wall.minute:02d}{wall.second:02d}"
        millis = wall.microsecond // 1000
        for step in range(1000):
            candidate = f"ws_CO_{stamp}{(millis + step) % 1000:03d}{phone[3:]}"
            if candidate not in self.transactions:
                return candidate
        self._sequence += 1
        return f"ws_CO_{stamp}{millis:03d}{phone[3:]}{self._sequence}"

    def _receipt(self, paid_at: datetime) -> str:
        # Observed receipts start with year, month and day letters: QKH94M1Z11 = 2022-11-17.
        head = chr(ord("A") + (paid_at.year - 2006) % 26) + chr(ord("A") + paid_at.month - 1) + _DAY_DIGITS[paid_at.day]
        return head + "".join(self._rng.choices(_RECEIPT_ALPHABET, k=7))

    def _callback_body(self, scenario: Scenario, merchant_request_id: str, checkout_request_id: str,
                       push: PushFields, paid_at: datetime) -> bytes:
        text = RESULT_CATALOGUE[scenario.result_code].callback_desc
        if scenario.result_code != 0:
            return failure_callback(merchant_request_id, checkout_request_id, scenario.result_code, text)
        return success_callback(merchant_request_id, checkout_request_id, push.amount, self._receipt(paid_at),
                                _compact_time(paid_at), push.phone, text, masked_phone=scenario.masked_phone)

    def _remember(self, txn: Transaction) -> None:
        self.transactions[txn.checkout_request_id] = txn
        if len(self.transactions) > self.settings.max_transactions:
            del self.transactions[next(iter(self.transactions))]
        if len(self.locks) > _LOCK_PRUNE_AT:
            now = self.clock()
            self.locks = {phone: until for phone, until in self.locks.items() if until > now}
