"""The sandbox's HTTP face: Daraja's OAuth, STK push and STK query paths, plus the admin API.

Per-request work is kept small (no per-request logging, no per-request tasks) because the sandbox
must answer thousands of pushes a second and send their callbacks from one core.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from services.daraja_sandbox import responses
from services.daraja_sandbox.admin import add_admin_routes
from services.daraja_sandbox.callbacks import CallbackJob, CallbackSender
from services.daraja_sandbox.keys import SANDBOX, SENDER
from services.daraja_sandbox.responses import Failure
from services.daraja_sandbox.settings import DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, AppConfig, SandboxSettings
from services.daraja_sandbox.state import Fault, Sandbox, Transaction
from services.daraja_sandbox.validation import validate_push, validate_query

TOKEN_PATH = "/oauth/v1/generate"
PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
QUERY_PATH = "/mpesa/stkpushquery/v1/query"
MAX_BODY_BYTES = 64 * 1024
DUPLICATE_CALLBACK_GAP_S = 0.05
LATE_CALLBACK_AFTER_QUERY_S = 0.05
_JSON = "application/json"


def create_app(settings: SandboxSettings = SandboxSettings(), apps: Iterable[AppConfig] = (), *,
               demo_app: bool = True, admin_token: str | None = None) -> web.Application:
    """The sandbox; its admin API answers only `Authorization: Bearer <admin_token>` (None: closed)."""
    configs = [AppConfig(DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET)] if demo_app else []
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SANDBOX] = Sandbox(settings, [*configs, *apps])
    app.cleanup_ctx.append(_callback_sender)
    app.router.add_route("*", TOKEN_PATH, oauth)
    app.router.add_route("*", PUSH_PATH, stk_push)
    app.router.add_route("*", QUERY_PATH, stk_query)
    add_admin_routes(app, admin_token)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def _callback_sender(app: web.Application):
    sandbox = app[SANDBOX]
    sender = CallbackSender(concurrency=sandbox.settings.callback_concurrency,
                            timeout_s=sandbox.settings.callback_timeout_s, on_delivery=sandbox.record_delivery)
    await sender.start()
    app[SENDER] = sender
    yield
    await sender.close()


async def oauth(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[SANDBOX]
    if request.method != "GET":
        return _reply(*sandbox.error(responses.METHOD_NOT_ALLOWED))
    fault = sandbox.take_fault("oauth")
    if fault is not None and not fault.process:
        return await _fault_answer(request, fault)
    status, body = _token_answer(request, sandbox)
    await _wait(sandbox.settings.latency_ms / 1000)
    return await _fault_answer(request, fault) if fault else _reply(status, body)


def _token_answer(request: web.Request, sandbox: Sandbox) -> tuple[int, bytes]:
    if request.query.get("grant_type") != "client_credentials":
        return sandbox.error(responses.OAUTH_INVALID_GRANT)
    credentials = _basic_credentials(request.headers.get("Authorization", ""))
    app = sandbox.app_for_basic(*credentials) if credentials else None
    if app is None:
        return sandbox.error(responses.OAUTH_INVALID_AUTH)
    return 200, responses.token_body(sandbox.issue_token(app), sandbox.settings.token_ttl_s)


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme != "Basic":
        return None
    try:
        key, sep, secret = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (key, secret) if sep else None


async def stk_push(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[SANDBOX]
    if request.method != "POST":
        return _reply(*sandbox.error(responses.METHOD_NOT_ALLOWED))
    fault = sandbox.take_fault("push")
    if fault is not None and not fault.process:
        return await _fault_answer(request, fault)
    raw = await request.read()
    outcome = _handle_push(request, sandbox, raw)
    if isinstance(outcome, Transaction):
        _send_callbacks(request.app[SENDER], sandbox, outcome)
        status, body = 200, responses.push_accepted_body(outcome.merchant_request_id, outcome.checkout_request_id)
        await _wait(sandbox.push_latency_s(outcome.scenario))
    else:
        status, body = sandbox.error(outcome)
        await _wait(sandbox.push_latency_s(None))
    return await _fault_answer(request, fault) if fault else _reply(status, body)


def _handle_push(request: web.Request, sandbox: Sandbox, raw: bytes) -> Transaction | Failure:
    """Checks in Daraja's order, records the push whatever the answer, accepts it if all pass."""
    body = _decode(raw)
    outcome = _push_outcome(request, sandbox, body)
    sandbox.record_push(body, outcome)
    return outcome


def _push_outcome(request: web.Request, sandbox: Sandbox, body: Any) -> Transaction | Failure:
    refused = _gatekeeper(request, sandbox, body)
    if refused is not None:
        return refused
    fields = validate_push(body, sandbox.rules())
    if isinstance(fields, Failure):
        return fields
    account = sandbox.merchant_for(fields.business_shortcode, fields.password, fields.timestamp)
    if isinstance(account, Failure):
        return account
    return sandbox.check_subscriber(fields.phone) or sandbox.accept_push(fields, account)


def _gatekeeper(request: web.Request, sandbox: Sandbox, body: Any) -> Failure | None:
    """What the API gateway refuses before the payload is looked at: rate, token, content type, JSON."""
    if not sandbox.allow_request():
        return responses.SPIKE_ARREST
    app = sandbox.app_for_bearer(request.headers.get("Authorization", ""))
    if isinstance(app, Failure):
        return app
    if request.content_type != _JSON:
        # A missing or wrong Content-Type is a documented cause of this answer (docs/daraja.md §2).
        return responses.invalid_field("BusinessShortCode")
    return None if isinstance(body, dict) else responses.INVALID_PAYLOAD


def _send_callbacks(sender: CallbackSender, sandbox: Sandbox, txn: Transaction) -> None:
    plan = txn.scenario.callback
    if plan in ("none", "after_query"):
        return
    delay_s = sandbox.callback_delay_s(txn.scenario)
    sender.send(_job(txn), delay_s)
    if plan == "twice":
        sender.send(_job(txn), delay_s + DUPLICATE_CALLBACK_GAP_S)


def _job(txn: Transaction) -> CallbackJob:
    return CallbackJob(txn.checkout_request_id, txn.callback_url, txn.callback_body, txn.business_shortcode)


async def stk_query(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[SANDBOX]
    if request.method != "POST":
        return _reply(*sandbox.error(responses.METHOD_NOT_ALLOWED))
    fault = sandbox.take_fault("query")
    if fault is not None and not fault.process:
        return await _fault_answer(request, fault)
    status, body, answered = _query_answer(request, sandbox, _decode(await request.read()))
    if answered is not None and answered.scenario.callback == "after_query" and not answered.late_callback_released:
        answered.late_callback_released = True
        request.app[SENDER].send(_job(answered), LATE_CALLBACK_AFTER_QUERY_S)
    await _wait(sandbox.settings.latency_ms / 1000)
    return await _fault_answer(request, fault) if fault else _reply(status, body)


def _query_answer(request: web.Request, sandbox: Sandbox, body: Any) -> tuple[int, bytes, Transaction | None]:
    refused = _gatekeeper(request, sandbox, body)
    if refused is not None:
        return sandbox.error(refused) + (None,)
    fields = validate_query(body, sandbox.rules())
    if isinstance(fields, Failure):
        return sandbox.error(fields) + (None,)
    account = sandbox.merchant_for(fields.business_shortcode, fields.password, fields.timestamp)
    if isinstance(account, Failure):
        return sandbox.error(account) + (None,)
    return sandbox.query_answer(fields)


async def not_found(request: web.Request) -> web.Response:
    return _reply(*request.app[SANDBOX].error(responses.RESOURCE_NOT_FOUND))


async def _fault_answer(request: web.Request, fault: Fault) -> web.StreamResponse:
    if fault.drop_connection:
        # Closing the socket mid-request is what a client sees as "server disconnected".
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=204)  # never written: the connection is already gone
    return web.Response(status=fault.status, body=fault.body.encode(), headers={"Content-Type": fault.content_type})


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _reply(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON)


async def _wait(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)
