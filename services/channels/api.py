"""The onboarding API under /admin/: channels, their credentials, upstream API keys and webhook
endpoints (README.md, "Webhook endpoints", lists the webhook routes with their commands), and the
review desk's payments (services/operations/api.py; README.md, "Review desk"), and with a privacy pool a
payer's export and erasure (services/privacy/api.py; README.md, "Payers' data: access and erasure").

Authentication is the admin bearer token (`Authorization: Bearer <token>`), a credential apart from
the upstream API keys. Without a bearer token the answer is 401 (with WWW-Authenticate); with a
token that is not the admin token, an upstream API key included, it is 403. /metrics, /healthz and /readyz
are open, as on every service.

Failed logins (a wrong token) are limited per source address by a token bucket that only failures
spend: past the budget every admin request from that address is answered 429 with Retry-After,
before its token is even compared, so the limit cannot be used to tell a right guess from a wrong
one. An address that never fails is never slowed.

Every refusal of a body is a 400 (or 413/415) problem detail: nothing a client sends may make the
API answer 500.

No response carries a secret: credentials show as version and fingerprint, and an API key or a
webhook signing secret is shown once, in the answer that makes it (with Cache-Control: no-store).
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from services.channels.onboarding import NotFound, Onboarding, OnboardingError
from services.channels.settings import AdminToken
from services.channels.webhooks import WebhookManagement
from services.common.observability import Health, add_ops_routes, http_metrics
from services.common.problems import problem
from services.common.ratelimit import RateLimiter, retry_after_header
from services.common.text import untrusted
from services.operations import api as review_desk
from services.operations.desk import ReviewDesk
from services.operations.model import DeskError
from services.operations.statement import Statements, add_statement_route
from services.privacy import api as payer_requests
from services.privacy.payers import Payers

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
# Failed logins per source address: 10 at once, then one every 5 seconds (12 a minute).
LOGIN_FAILURES_BURST = 10
LOGIN_FAILURES_PER_S = 0.2
_API_KEY_ID = re.compile(r"[0-9a-f]{12}")  # apikeys.new_api_key
ONBOARDING = web.AppKey("onboarding", Onboarding)
ADMIN_TOKEN = web.AppKey("admin_token", AdminToken)
WEBHOOKS = web.AppKey("webhooks", WebhookManagement)
SHOWN_ONCE = {"Cache-Control": "no-store"}  # an answer carrying a secret is kept by no cache
LOGIN_FAILURES = web.AppKey("login_failures", RateLimiter)
AUTH_REFUSALS = Counter("admin_auth_refusals_total", "Admin API requests refused", ["reason"])


def create_app(onboarding: Onboarding, admin_token: AdminToken, health: Health | None = None, *,
               login_failures: RateLimiter | None = None,
               webhooks: WebhookManagement | None = None, desk: ReviewDesk | None = None,
               statements: Statements | None = None, payers: Payers | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[http_metrics, require_admin, problems])
    app[ONBOARDING] = onboarding
    app[ADMIN_TOKEN] = admin_token
    if login_failures is None:  # not `or`: a limiter that has seen no one yet has len() 0 and is falsy
        login_failures = RateLimiter(LOGIN_FAILURES_PER_S, LOGIN_FAILURES_BURST)
    app[LOGIN_FAILURES] = login_failures
    r = app.router
    r.add_get("/admin/channels", list_channels)
    r.add_post("/admin/channels", create_channel)
    r.add_get("/admin/channels/compliance", channels_compliance)  # before {channelId}, which would match it
    r.add_get("/admin/channels/{channelId}", show_channel)
    r.add_patch("/admin/channels/{channelId}", update_channel)
    r.add_put("/admin/channels/{channelId}/credentials", set_credentials)
    r.add_post("/admin/channels/{channelId}/credentials/rotate", rotate_credentials)
    r.add_post("/admin/channels/{channelId}/suspend", suspend_channel)
    r.add_post("/admin/channels/{channelId}/resume", resume_channel)
    r.add_get("/admin/api-keys", list_api_keys)
    r.add_post("/admin/api-keys", issue_api_key)
    r.add_post("/admin/api-keys/{keyId}/revoke", revoke_api_key)
    if webhooks is not None:
        app[WEBHOOKS] = webhooks
        _add_webhook_routes(r)
    if desk is not None:
        review_desk.add_routes(app, desk)  # /admin/payments (services/operations/api.py)
    if statements is not None:
        add_statement_route(app, statements)  # README, "Merchant statements"
    if payers is not None:
        payer_requests.add_routes(app, payers)  # /admin/payers (services/privacy/api.py)
    add_ops_routes(app, health or Health())
    return app


@web.middleware
async def require_admin(request: web.Request, handler):
    if not request.path.startswith("/admin/"):
        return await handler(request)
    source, failures = request.remote or "unknown", request.app[LOGIN_FAILURES]
    wait_s = failures.wait_s(source)
    if wait_s > 0:
        AUTH_REFUSALS.labels("rate_limited").inc()  # counted only: logging each would let a flood write logs
        return problem(429, "Too many failed logins", "too many wrong admin tokens from this address; wait and retry",
                       headers={"Retry-After": retry_after_header(wait_s)})
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        AUTH_REFUSALS.labels("missing").inc()
        return problem(401, "Unauthorized", "send the admin token as 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": 'Bearer realm="mpesa-admin"'})
    if not request.app[ADMIN_TOKEN].matches(token.strip()):
        AUTH_REFUSALS.labels("wrong").inc()
        failures.take(source)
        log.warning("admin request refused: the bearer token is not the admin token (from %s)", source)
        return problem(403, "Forbidden", "the bearer token presented is not the admin token")
    return await handler(request)


@web.middleware
async def problems(request: web.Request, handler):
    try:
        return await handler(request)
    except (OnboardingError, DeskError) as error:
        # Details may quote a channel or key id taken from the path: cleaned like any foreign text.
        return problem(error.status, error.title, untrusted(error.detail, 500), errors=error.errors or None)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("admin request failed: %s %s", untrusted(request.method, 16), untrusted(request.path))
        return problem(500, "Internal server error", "the request failed; nothing secret was logged")


def _actor(request: web.Request) -> str:
    return f"admin-api@{request.remote}"


async def _json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise _Problem(415, "Unsupported media type", "send the body as application/json")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _Problem(413, "Request too large", f"the body must be at most {MAX_BODY_BYTES} bytes") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # bad UTF-8 is a ValueError; RecursionError: nested too deep
        raise _Problem(400, "Malformed JSON", "the body is not valid JSON") from None  # never echo: may hold secrets


class _Problem(OnboardingError):
    def __init__(self, status: int, title: str, detail: str):
        super().__init__(detail)
        self.status, self.title = status, title


async def list_channels(request: web.Request) -> web.Response:
    records = await request.app[ONBOARDING].channels()
    return web.json_response({"channels": [r.view() for r in records]})


async def channels_compliance(request: web.Request) -> web.Response:
    return web.json_response(await request.app[ONBOARDING].compliance())


async def create_channel(request: web.Request) -> web.Response:
    record = await request.app[ONBOARDING].create_channel(await _json_body(request), _actor(request))
    return web.json_response(record.view(), status=201,
                             headers={"Location": f"/admin/channels/{record.channel.channel_id}"})


async def show_channel(request: web.Request) -> web.Response:
    record = await request.app[ONBOARDING].channel(request.match_info["channelId"])
    return web.json_response(record.view())


async def update_channel(request: web.Request) -> web.Response:
    record = await request.app[ONBOARDING].update_channel(request.match_info["channelId"], await _json_body(request),
                                                          _actor(request))
    return web.json_response(record.view())


async def set_credentials(request: web.Request) -> web.Response:
    record = await request.app[ONBOARDING].set_credentials(request.match_info["channelId"],
                                                           await _json_body(request), _actor(request))
    return web.json_response(record.view())


async def rotate_credentials(request: web.Request) -> web.Response:
    record = await request.app[ONBOARDING].rotate_credentials(request.match_info["channelId"],
                                                              await _json_body(request), _actor(request))
    return web.json_response(record.view())


async def suspend_channel(request: web.Request) -> web.Response:
    record = await request.app[ONBOARDING].suspend(request.match_info["channelId"], _actor(request))
    return web.json_response(record.view())


async def resume_channel(request: web.Request) -> web.Response:
    record = await request.app[ONBOARDING].resume(request.match_info["channelId"], _actor(request))
    return web.json_response(record.view())


async def list_api_keys(request: web.Request) -> web.Response:
    return web.json_response({"apiKeys": await request.app[ONBOARDING].api_keys()})


async def issue_api_key(request: web.Request) -> web.Response:
    view, api_key = await request.app[ONBOARDING].issue_api_key(await _json_body(request), _actor(request))
    return web.json_response({**view, "apiKey": api_key, "note": "shown once: store it now"}, status=201,
                             headers=SHOWN_ONCE)


async def revoke_api_key(request: web.Request) -> web.Response:
    key_id = request.match_info["keyId"]
    if not _API_KEY_ID.fullmatch(key_id):  # refused here: a NUL byte would make PostgreSQL fail the lookup
        raise NotFound(f"no API key {key_id!r}")
    view = await request.app[ONBOARDING].revoke_api_key(key_id, _actor(request))
    return web.json_response(view)


# Webhook endpoints (services/channels/webhooks.py; docs/webhooks.md, "Managing endpoints")

def _add_webhook_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/admin/channels/{channelId}/webhooks", list_webhooks)
    r.add_post("/admin/channels/{channelId}/webhooks", add_webhook)
    r.add_get("/admin/webhooks/{endpointId}", show_webhook)
    r.add_patch("/admin/webhooks/{endpointId}", update_webhook)
    r.add_delete("/admin/webhooks/{endpointId}", delete_webhook)
    r.add_post("/admin/webhooks/{endpointId}/disable", disable_webhook)
    r.add_post("/admin/webhooks/{endpointId}/enable", enable_webhook)
    r.add_post("/admin/webhooks/{endpointId}/rotate-secret", rotate_webhook_secret)
    r.add_get("/admin/webhooks/{endpointId}/deliveries", list_deliveries)
    r.add_post("/admin/webhooks/{endpointId}/redeliver", redeliver_endpoint)
    r.add_get("/admin/webhook-deliveries/{deliveryId}", show_delivery)
    r.add_get("/admin/webhook-deliveries/{deliveryId}/attempts", list_attempts)
    r.add_post("/admin/webhook-deliveries/{deliveryId}/redeliver", redeliver_delivery)


async def _optional_json_body(request: web.Request) -> Any:
    """The body, or {} when none was sent (the operation's defaults apply)."""
    return await _json_body(request) if request.can_read_body else {}


def _with_secret(view: dict[str, Any], secret: str) -> dict[str, Any]:
    return {**view, "secret": secret, "note": "shown once: store it now; only its fingerprint is kept in view"}


async def list_webhooks(request: web.Request) -> web.Response:
    include_deleted = request.query.get("includeDeleted") == "true"
    records = await request.app[WEBHOOKS].endpoints(request.match_info["channelId"], include_deleted=include_deleted)
    return web.json_response({"endpoints": [r.view() for r in records]})


async def add_webhook(request: web.Request) -> web.Response:
    record, secret = await request.app[WEBHOOKS].add_endpoint(request.match_info["channelId"],
                                                              await _json_body(request), _actor(request))
    return web.json_response(_with_secret(record.view(), secret), status=201,
                             headers={**SHOWN_ONCE, "Location": f"/admin/webhooks/{record.endpoint_id}"})


async def show_webhook(request: web.Request) -> web.Response:
    return web.json_response((await request.app[WEBHOOKS].endpoint(request.match_info["endpointId"])).view())


async def update_webhook(request: web.Request) -> web.Response:
    record = await request.app[WEBHOOKS].update_endpoint(request.match_info["endpointId"], await _json_body(request),
                                                         _actor(request))
    return web.json_response(record.view())


async def delete_webhook(request: web.Request) -> web.Response:
    record = await request.app[WEBHOOKS].delete(request.match_info["endpointId"], _actor(request))
    return web.json_response(record.view())


async def disable_webhook(request: web.Request) -> web.Response:
    record = await request.app[WEBHOOKS].disable(request.match_info["endpointId"], await _json_body(request),
                                                 _actor(request))
    return web.json_response(record.view())


async def enable_webhook(request: web.Request) -> web.Response:
    record = await request.app[WEBHOOKS].enable(request.match_info["endpointId"], _actor(request))
    return web.json_response(record.view())


async def rotate_webhook_secret(request: web.Request) -> web.Response:
    record, secret = await request.app[WEBHOOKS].rotate_secret(request.match_info["endpointId"],
                                                               await _optional_json_body(request), _actor(request))
    return web.json_response(_with_secret(record.view(), secret), headers=SHOWN_ONCE)


async def list_deliveries(request: web.Request) -> web.Response:
    return web.json_response(await request.app[WEBHOOKS].deliveries(request.match_info["endpointId"], request.query))


async def redeliver_endpoint(request: web.Request) -> web.Response:
    return web.json_response(await request.app[WEBHOOKS].redeliver(request.match_info["endpointId"],
                                                                   await _json_body(request), _actor(request)))


async def show_delivery(request: web.Request) -> web.Response:
    return web.json_response(await request.app[WEBHOOKS].delivery(request.match_info["deliveryId"]))


async def list_attempts(request: web.Request) -> web.Response:
    return web.json_response(await request.app[WEBHOOKS].attempts(request.match_info["deliveryId"]))


async def redeliver_delivery(request: web.Request) -> web.Response:
    return web.json_response(await request.app[WEBHOOKS].redeliver_delivery(request.match_info["deliveryId"],
                                                                            _actor(request)))
