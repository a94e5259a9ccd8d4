"""Admin API under /sandbox/: apps, settings, scenarios, injected faults, the push log and reset.

Not part of Daraja. Every route but /sandbox/health needs `Authorization: Bearer <token>`, the
token given in DARAJA_SANDBOX_ADMIN_TOKEN; without one the admin API is closed. It can register
apps, make every push fail and read the push log, so it is as sensitive as the callback URLs. The
push log shows each CallBackURL with its last path segment and its query replaced by `<token>`:
that is where a callback token lives, the pipeline's and most integrators' (docs/callback-edge.md).

  GET    /sandbox/health                (no token: a liveness probe that says nothing else)
  GET    /sandbox/settings              PATCH /sandbox/settings {"latency_ms": 300, ...}
  GET    /sandbox/apps                  POST  /sandbox/apps {"consumer_key", "consumer_secret",
                                              "shortcode"?, "passkey"?, "shortcode_type"?, "till_number"?,
                                              "products_enabled"?}
  POST   /sandbox/tokens/expire {"consumer_key"?}   expire tokens (all, or one app's)
  GET    /sandbox/scenarios             POST  /sandbox/scenarios {"scenario": name, one of "phone",
                                              "amount", "default": true; optional "callback_delay_ms",
                                              "latency_ms"}          DELETE /sandbox/scenarios
  GET    /sandbox/pushes?AccountReference=..&PhoneNumber=..&CallBackURL=..&status=accepted
                                        each accepted push with `callbacks` (each delivery's HTTP status
                                        or error) and `callbacksSentAt` (when each delivery started)
  POST   /sandbox/faults {"operation": "push", "status": 503, "body": "...", "content_type": "text/html",
                          "remaining": 1, "process": false, "drop_connection": false}
  DELETE /sandbox/faults
  GET    /sandbox/stats
  POST   /sandbox/reset                 forget pushes, outcomes, locks, overrides, faults, settings changes
"""
from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from services.daraja_sandbox.keys import SANDBOX, SENDER
from services.daraja_sandbox.scenarios import SCENARIOS, SELECTORS, named_scenario
from services.daraja_sandbox.settings import AppConfig
from services.daraja_sandbox.state import Fault

TOKEN_PLACEHOLDER = "<token>"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_admin_routes(app: web.Application, admin_token: str | None) -> None:
    guard = _bearer_guard(admin_token)
    router = app.router
    router.add_get("/sandbox/health", health)
    for method, path, handler in (
            ("GET", "/sandbox/settings", get_settings), ("PATCH", "/sandbox/settings", patch_settings),
            ("GET", "/sandbox/apps", list_apps), ("POST", "/sandbox/apps", add_app),
            ("POST", "/sandbox/tokens/expire", expire_tokens),
            ("GET", "/sandbox/scenarios", list_scenarios), ("POST", "/sandbox/scenarios", set_scenario),
            ("DELETE", "/sandbox/scenarios", clear_scenarios),
            ("GET", "/sandbox/pushes", list_pushes),
            ("POST", "/sandbox/faults", add_fault), ("DELETE", "/sandbox/faults", clear_faults),
            ("GET", "/sandbox/stats", stats), ("POST", "/sandbox/reset", reset)):
        router.add_route(method, path, guard(handler))


def _bearer_guard(admin_token: str | None) -> Callable[[Handler], Handler]:
    """Wraps admin handlers so that they run only for the admin token. Digests are compared, in
    constant time, so that neither the token's bytes nor its length show in the timing."""
    expected = hashlib.sha256(admin_token.encode()).digest() if admin_token else None

    def guard(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
            digest = hashlib.sha256(presented.strip().encode("utf-8", "replace")).digest()
            if expected is None or scheme.lower() != "bearer" or not hmac.compare_digest(digest, expected):
                return _unauthorized(closed=expected is None)
            return await handler(request)
        return guarded
    return guard


def _unauthorized(closed: bool) -> web.Response:
    message = ("the admin API is closed: start the sandbox with DARAJA_SANDBOX_ADMIN_TOKEN set" if closed
               else "the admin API needs Authorization: Bearer <DARAJA_SANDBOX_ADMIN_TOKEN>")
    return web.json_response({"error": message}, status=401,
                             headers={"WWW-Authenticate": 'Bearer realm="daraja-sandbox-admin"'})


def redact_callback_url(url: Any) -> str:
    """`url` with its last non-empty path segment and its query replaced by <token>, and any user
    info dropped: what a push log may show of a callback URL. Whatever is not a URL is hidden whole."""
    if not isinstance(url, str):
        return TOKEN_PLACEHOLDER
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return TOKEN_PLACEHOLDER
    segments = parts.path.split("/")
    last = max((i for i, segment in enumerate(segments) if segment), default=None)
    if last is not None:
        segments[last] = TOKEN_PLACEHOLDER
    return urlunsplit((parts.scheme, host, "/".join(segments), TOKEN_PLACEHOLDER if parts.query else "", ""))


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def get_settings(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[SANDBOX].settings))


async def patch_settings(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    changes = await _json_object(request)
    try:
        sandbox.update_settings(changes)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    return web.json_response(asdict(sandbox.settings))


async def list_apps(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    apps = [{"consumer_key": key, "products_enabled": app.config.products_enabled,
             "tokens_issued": app.tokens_issued, "shortcode": app.config.shortcode}
            for key, app in sandbox.apps.items()]  # secrets and passkeys are never listed
    shortcodes = [{"shortcode": s.shortcode, "shortcode_type": s.shortcode_type, "till_number": s.till_number}
                  for s in sandbox.shortcodes.values()]
    return web.json_response({"apps": apps, "shortcodes": shortcodes})


async def add_app(request: web.Request) -> web.Response:
    try:
        config = AppConfig.from_json(await _json_object(request))
    except (ValueError, TypeError) as exc:
        raise _bad_request(str(exc)) from None
    request.app[SANDBOX].register_app(config)
    return web.json_response({"consumer_key": config.consumer_key, "shortcode": config.shortcode}, status=201)


async def expire_tokens(request: web.Request) -> web.Response:
    body = await _json_object(request)
    expired = request.app[SANDBOX].expire_tokens(body.get("consumer_key"))
    return web.json_response({"expired": expired})


async def list_scenarios(request: web.Request) -> web.Response:
    overrides = request.app[SANDBOX].overrides
    return web.json_response({
        "scenarios": {name: asdict(s) for name, s in SCENARIOS.items()},
        "selectors": {str(k): v for k, v in SELECTORS.items()},
        "overrides": {"phone": {p: asdict(s) for p, s in overrides.by_phone.items()},
                      "amount": {str(a): asdict(s) for a, s in overrides.by_amount.items()},
                      "default": asdict(overrides.default)},
    })


async def set_scenario(request: web.Request) -> web.Response:
    body = await _json_object(request)
    scenario = _scenario_from(body)
    overrides = request.app[SANDBOX].overrides
    targets = [k for k in ("phone", "amount", "default") if k in body]
    if len(targets) != 1:
        raise _bad_request("give exactly one of phone, amount or default")
    if "phone" in body:
        overrides.by_phone[str(body["phone"])] = scenario
    elif "amount" in body:
        if isinstance(body["amount"], bool) or not isinstance(body["amount"], int):
            raise _bad_request("amount must be a whole number")
        overrides.by_amount[body["amount"]] = scenario
    else:
        overrides.default = scenario
    return web.json_response(asdict(scenario), status=201)


def _scenario_from(body: dict[str, Any]):
    timings = {k: body.get(k) for k in ("callback_delay_ms", "latency_ms")}
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0) for v in timings.values()):
        raise _bad_request("callback_delay_ms and latency_ms must be non-negative whole numbers")
    try:
        return named_scenario(str(body.get("scenario")), **timings)
    except KeyError:
        raise _bad_request(f"unknown scenario; known: {sorted(SCENARIOS)}") from None


async def clear_scenarios(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    sandbox.overrides = type(sandbox.overrides).empty()
    return web.json_response({"cleared": True})


async def list_pushes(request: web.Request) -> web.Response:
    try:
        pushes = request.app[SANDBOX].pushes_matching(request.query)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    rendered = [{**p, "receivedAt": _iso(p["receivedAt"]),
                 **({"CallBackURL": redact_callback_url(p["CallBackURL"])} if "CallBackURL" in p else {}),
                 **({"callbacksSentAt": [_iso(t) for t in p["callbacksSentAt"]]} if "callbacksSentAt" in p else {})}
                for p in pushes]
    return web.json_response({"count": len(rendered), "pushes": rendered})


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat()


async def add_fault(request: web.Request) -> web.Response:
    try:
        fault = Fault(**await _json_object(request))
    except (TypeError, ValueError) as exc:
        raise _bad_request(f"bad fault: {exc}") from None
    request.app[SANDBOX].add_fault(fault)
    return web.json_response(asdict(fault), status=201)


async def clear_faults(request: web.Request) -> web.Response:
    request.app[SANDBOX].faults.clear()
    return web.json_response({"cleared": True})


async def stats(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    return web.json_response({**sandbox.counters, "callbacks_pending": request.app[SENDER].pending,
                              "transactions": len(sandbox.transactions)})


async def reset(request: web.Request) -> web.Response:
    request.app[SENDER].cancel_pending()
    request.app[SANDBOX].reset()
    return web.json_response({"reset": True})


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: a deeply nested body
        raise _bad_request("body must be JSON") from None
    if not isinstance(value, dict):
        raise _bad_request("body must be a JSON object")
    return value


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")
