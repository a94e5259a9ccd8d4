"""Async Daraja client: OAuth with one shared token per app, STK push and STK query over httpx.

The client never retries on its own except once, after Daraja refuses a token (404.001.03): a
fresh token is fetched and the call repeated (docs/daraja.md §1). Everything else surfaces as a
DarajaError whose `kind` tells the caller whether to back off and retry, give up, or reconcile.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol, TypeGuard, TypeVar

import aiohttp
import httpx

from services.daraja import metrics
from services.daraja.errors import DarajaError, ErrorKind
from services.daraja.models import (
    AccessToken,
    AppCredentials,
    PushAccepted,
    QueryResult,
    QueryStatus,
    Shortcode,
    StkPushRequest,
)
from services.daraja.parsing import (
    QUERY_PENDING_ERROR_CODE,
    parse_push_response,
    parse_query_response,
    parse_token_response,
)
from services.daraja.payloads import build_push_payload, build_query_payload, nairobi_timestamp
from services.daraja.transport import AiohttpSender, HttpxSender

log = logging.getLogger(__name__)

TOKEN_PATH = "/oauth/v1/generate?grant_type=client_credentials"
PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
QUERY_PATH = "/mpesa/stkpushquery/v1/query"
# After a failed token request, callers queued behind it get the same error for this long
# instead of each trying again in turn (hundreds of pushes waiting on one app's token).
TOKEN_FAILURE_HOLD_S = 2.0

Result = TypeVar("Result")
# (operation, outcome, seconds): outcome is "ok", a QueryStatus value, a Daraja error code or an error kind.
CallObserver = Callable[[str, str, float], None]


@dataclass(frozen=True)
class DarajaTimeouts:
    connect_s: float = 5.0
    read_s: float = 30.0
    write_s: float = 10.0
    pool_s: float = 10.0  # waiting for a free connection; nothing has been sent yet

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect_s, read=self.read_s, write=self.write_s, pool=self.pool_s)

    def to_aiohttp(self) -> aiohttp.ClientTimeout:
        # aiohttp's `connect` covers waiting for a pooled connection plus opening one; it has no
        # write timeout (a push body is a few hundred bytes).
        return aiohttp.ClientTimeout(total=None, connect=self.connect_s + self.pool_s, sock_connect=self.connect_s,
                                     sock_read=self.read_s)


class SharedTokens(Protocol):
    """Where several processes calling Daraja for the same apps share one token per app
    (services/stk_worker/tokens.py); a process alone needs none."""

    async def obtain(self, app: AppCredentials, refused: str | None, mint: Callable[[], Awaitable[AccessToken]],
                     min_remaining_s: float) -> AccessToken: ...


@dataclass(frozen=True)
class _CachedToken:
    value: str
    consumer_secret: str  # a rotated secret means a new token
    refresh_at: float  # monotonic seconds


@dataclass(frozen=True)
class _TokenFailure:
    error: DarajaError
    consumer_secret: str
    at: float


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class DarajaClient:
    """One per process; safe for any number of concurrent calls across any number of apps."""

    def __init__(self, base_url: str, *, http: httpx.AsyncClient | None = None,
                 timeouts: DarajaTimeouts = DarajaTimeouts(), token_refresh_margin_s: float = 300.0,
                 max_connections: int = 100, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], datetime] = _utc_now, observer: CallObserver | None = None,
                 shared_tokens: SharedTokens | None = None):
        base_url = base_url.rstrip("/")
        self._urls = {path: base_url + path for path in (TOKEN_PATH, PUSH_PATH, QUERY_PATH)}
        # aiohttp unless the caller brings an httpx client (transport.py says why); a caller's client
        # keeps its own timeouts (DarajaTimeouts.to_httpx() builds matching ones).
        self._sender: AiohttpSender | HttpxSender = HttpxSender(http) if http is not None else AiohttpSender(
            timeout=timeouts.to_aiohttp(), max_connections=max_connections, keepalive_expiry_s=5.0)
        self._margin_s = token_refresh_margin_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._observer = observer
        self._tokens: dict[str, _CachedToken] = {}
        self._token_failures: dict[str, _TokenFailure] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._shared = shared_tokens

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> DarajaClient:
        """Builds a client from services.daraja.settings.DarajaSettings."""
        timeouts = DarajaTimeouts(connect_s=settings.connect_timeout_s, read_s=settings.read_timeout_s)
        return cls(settings.base_url, timeouts=timeouts, token_refresh_margin_s=settings.token_refresh_margin_s,
                   max_connections=settings.max_connections, **kwargs)

    async def aclose(self) -> None:
        await self._sender.aclose()

    async def __aenter__(self) -> DarajaClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def fetch_token(self, app: AppCredentials) -> AccessToken:
        """Asks Daraja for a new token now (e.g. to validate credentials at onboarding) and caches it.

        Note: each new token may invalidate the app's previous one (docs/daraja.md §1), which is why
        everything else goes through the shared cache.
        """
        async with self._lock_for(app):
            return await self._mint(app)

    async def push(self, app: AppCredentials, shortcode: Shortcode, request: StkPushRequest) -> PushAccepted:
        """Sends one STK push. OUTCOME_UNKNOWN errors mean a prompt may exist: do not push again.

        Cancelling this coroutine after the request went out leaves the outcome unknown as well.
        """
        def payload() -> dict:
            return build_push_payload(shortcode, request, app.passkey, self._timestamp())
        return await self._authorised_call(app, "push", PUSH_PATH, payload, parse_push_response)

    async def query(self, app: AppCredentials, shortcode: Shortcode, checkout_request_id: str) -> QueryResult:
        """Asks for the outcome of a push; idempotent, so every failure here is safe to retry."""
        def payload() -> dict:
            return build_query_payload(shortcode, checkout_request_id, app.passkey, self._timestamp())
        return await self._authorised_call(app, "query", QUERY_PATH, payload, parse_query_response)

    def _timestamp(self) -> str:
        return nairobi_timestamp(self._wall_clock())

    async def _authorised_call(self, app: AppCredentials, operation: str, path: str,
                               payload: Callable[[], dict], parse: Callable[[int, bytes], Result]) -> Result:
        token = await self._token(app)
        try:
            return await self._post(app, operation, path, token, payload(), parse)
        except DarajaError as error:
            if not error.is_invalid_token:
                raise
            # Another process may have minted a newer token for this app, which invalidates ours
            # (docs/daraja.md §1). Refresh once and repeat: the refused call reached no customer.
            log.info("daraja refused the token of app %s; refreshing once", app.key_id,
                     extra={"error_code": error.error_code})
        token = await self._replace_refused_token(app, token)
        return await self._post(app, operation, path, token, payload(), parse)

    async def _post(self, app: AppCredentials, operation: str, path: str, token: str, payload: dict,
                    parse: Callable[[int, bytes], Result]) -> Result:
        secrets = (token, app.consumer_secret, app.passkey, app.consumer_key, payload.get("Password", ""))
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                   "Accept": "application/json"}
        body = json.dumps(payload, separators=(",", ":")).encode()
        started = self._clock()
        try:
            answer = await self._sender.request("POST", self._urls[path], headers, body)
        except httpx.HTTPError as exc:
            # `from None`: httpx exceptions hold the request, and the request holds the token.
            raise self._observed_error(operation, transport_error(operation, exc), started,
                                       metrics.transport_outcome(exc)) from None
        try:
            result = parse(answer.status, answer.body)
        except DarajaError as error:
            raise self._observed_error(operation, error.redacted(secrets), started,
                                       metrics.answer_outcome(error)) from None
        self._observe(operation, result.status.value if isinstance(result, QueryResult) else "ok", started,
                      "ok", _code_of(result))
        return result

    async def _token(self, app: AppCredentials) -> str:
        cached = self._tokens.get(app.consumer_key)
        if self._usable(cached, app):
            return cached.value
        async with self._lock_for(app):
            # One refresh at a time: whoever waited on the lock finds the new token here.
            cached = self._tokens.get(app.consumer_key)
            if self._usable(cached, app):
                return cached.value
            self._raise_recent_failure(app)
            return (await self._obtain(app, None)).value

    async def _replace_refused_token(self, app: AppCredentials, refused: str) -> str:
        async with self._lock_for(app):
            cached = self._tokens.get(app.consumer_key)
            if self._usable(cached, app) and cached.value != refused:
                return cached.value  # a concurrent call already replaced it
            self._tokens.pop(app.consumer_key, None)
            self._raise_recent_failure(app)
            return (await self._obtain(app, refused)).value

    async def _obtain(self, app: AppCredentials, refused: str | None) -> AccessToken:
        """A new token for this process: minted, or the one another process shares (not `refused`)."""
        if self._shared is None:
            return await self._mint(app)
        token = await self._shared.obtain(app, refused, lambda: self._mint(app), self._margin_s)
        self._cache(app, token)
        return token

    async def _mint(self, app: AppCredentials) -> AccessToken:
        basic = base64.b64encode(f"{app.consumer_key}:{app.consumer_secret}".encode()).decode("ascii")
        started = self._clock()
        try:
            answer = await self._sender.request("GET", self._urls[TOKEN_PATH],
                                                {"Authorization": f"Basic {basic}"}, None)
            token = parse_token_response(answer.status, answer.body)
        except (httpx.HTTPError, DarajaError) as exc:
            error = exc if isinstance(exc, DarajaError) else transport_error("oauth", exc)
            outcome = metrics.answer_outcome(exc) if isinstance(exc, DarajaError) else metrics.transport_outcome(exc)
            error = error.redacted((basic, app.consumer_secret, app.consumer_key, app.passkey))
            self._token_failures[app.consumer_key] = _TokenFailure(error, app.consumer_secret, self._clock())
            raise self._observed_error("oauth", error, started, outcome) from None
        self._observe("oauth", "ok", started, "ok")
        self._token_failures.pop(app.consumer_key, None)
        self._cache(app, token)
        log.info("daraja token obtained for app %s", app.key_id)
        return token

    def _cache(self, app: AppCredentials, token: AccessToken) -> None:
        self._tokens[app.consumer_key] = _CachedToken(token.value, app.consumer_secret,
                                                      self._clock() + self._refresh_after_s(token.expires_in_s))

    def _refresh_after_s(self, expires_in_s: int) -> float:
        # Refresh `margin` early, but never later than half-way through a short-lived token.
        return expires_in_s - min(self._margin_s, expires_in_s / 2)

    def _usable(self, cached: _CachedToken | None, app: AppCredentials) -> TypeGuard[_CachedToken]:
        return (cached is not None and cached.consumer_secret == app.consumer_secret
                and self._clock() < cached.refresh_at)

    def _raise_recent_failure(self, app: AppCredentials) -> None:
        failure = self._token_failures.get(app.consumer_key)
        if failure is not None and failure.consumer_secret == app.consumer_secret \
                and self._clock() - failure.at < TOKEN_FAILURE_HOLD_S:
            raise failure.error.copy()

    def _lock_for(self, app: AppCredentials) -> asyncio.Lock:
        lock = self._locks.get(app.consumer_key)
        if lock is None:
            lock = self._locks[app.consumer_key] = asyncio.Lock()
        return lock

    def _observed_error(self, operation: str, error: DarajaError, started: float, call_outcome: str) -> DarajaError:
        self._observe(operation, error.error_code or error.kind.value, started, call_outcome, error.error_code)
        return error

    def _observe(self, operation: str, outcome: str, started: float, call_outcome: str,
                 code: str | None = None) -> None:
        """`outcome` is the observer's detail; `call_outcome` (ok|refused|timeout|error) and `code`
        (what Daraja answered, if anything) are the metrics' (services/daraja/metrics.py)."""
        seconds = self._clock() - started
        metrics.record(operation, call_outcome, seconds, code)
        if self._observer is not None:
            self._observer(operation, outcome, seconds)


def _code_of(result: object) -> str | None:
    """The code a usable answer carried: a push's ResponseCode, a query's ResultCode, or the errorCode
    of a query Daraja is still processing (500.001.1001 answered as 'not yet')."""
    if isinstance(result, PushAccepted):
        return result.response_code
    if isinstance(result, QueryResult):
        return result.result_code or (QUERY_PENDING_ERROR_CODE if result.status is QueryStatus.STILL_PROCESSING
                                      else None)
    return None


_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)
_OUR_BUG = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)


def transport_error(operation: str, exc: Exception) -> DarajaError:
    """Classifies an httpx failure by whether the request can have reached Daraja."""
    reason = f"transport error {type(exc).__name__}"
    if isinstance(exc, _NOT_SENT):
        return DarajaError(ErrorKind.RETRYABLE, operation, reason + " before the request was sent")
    if isinstance(exc, _OUR_BUG):
        return DarajaError(ErrorKind.PERMANENT, operation, reason + " (request could not be sent)")
    if operation == "push":
        # Read timeout, reset or a dropped connection after sending: Daraja may have prompted the phone.
        return DarajaError(ErrorKind.OUTCOME_UNKNOWN, operation, reason + " after the request was sent")
    return DarajaError(ErrorKind.RETRYABLE, operation, reason)

