"""The ingress HTTP API: upstream services ask for payments and read their state (issue #5).

POST /api/payments            202 once Kafka acknowledged the PaymentRequested event
GET  /api/payments/{id}       the payment as the ledger records it
GET  /api/openapi.json        the contract (services/ingress/openapi.json)

Every error is application/problem+json (RFC 9457) with a `type` naming the case and, for field
errors, `errors: [{field, message}]`. Checks run cheapest first and nothing is published unless
all of them pass.
"""
from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import web
from psycopg import Error as DatabaseError
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.channels.apikeys import ApiKey, ApiKeyAuthenticator
from services.common.avro import Codec
from services.common.kafka import Publisher
from services.common.observability import Health, add_ops_routes, http_metrics
from services.common.payment import AMOUNT_MAX, parse_payment_request, validate_channel_id
from services.common.problems import problem
from services.common.text import untrusted
from services.ingress.access import ChannelDirectory, ChannelStatus, authenticate
from services.ingress.payments import IdempotencyConflict, PaymentIntake, Unavailable
from services.ingress.validation import parse_idempotency_key
from services.ingress.views import PaymentViews

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
PROBLEM = "urn:mpesa-pipeline:problem:"  # + one slug per case, listed in openapi.json
RETRY_AFTER_S = "1"


class OwnPublisher(Publisher, Protocol):
    """The ingress's own producer: it publishes, says whether it can (readiness), and is flushed and
    closed at shutdown."""

    def ready(self) -> bool: ...

    def close(self, timeout: float = 10.0) -> None: ...


@dataclass
class IngressDeps:
    producer: OwnPublisher
    pool: AsyncConnectionPool
    authenticator: ApiKeyAuthenticator
    channels: ChannelDirectory
    intake: PaymentIntake
    views: PaymentViews
    marks_pool: AsyncConnectionPool | None = None
    codec: Codec | None = None  # the one open_deps opened (with its registry session), closed with it


DEPS = web.AppKey("deps", IngressDeps)
BODY_LIMIT = web.AppKey("body_limit", int)
OPENAPI = web.AppKey("openapi", bytes)


def create_app(deps: IngressDeps, health: Health | None = None, *,
               max_body_bytes: int = MAX_BODY_BYTES) -> web.Application:
    # client_max_size is a second fence for chunked bodies that announce no length.
    app = web.Application(client_max_size=max_body_bytes, middlewares=[http_metrics, problems_for_errors])
    app[DEPS] = deps
    app[BODY_LIMIT] = max_body_bytes
    app[OPENAPI] = OPENAPI_PATH.read_bytes()
    app.router.add_post("/api/payments", create_payment)
    app.router.add_get("/api/payments/{paymentId}", get_payment)
    app.router.add_get("/api/openapi.json", openapi_document)
    add_ops_routes(app, health or Health())
    return app


async def create_payment(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    caller = await authenticate(request, deps.authenticator)
    if caller is None:
        return _unauthenticated()
    idempotency_key, key_error = parse_idempotency_key(request.headers.get("Idempotency-Key"))
    if key_error:
        return problem(400, "Idempotency-Key required", f"the Idempotency-Key header {key_error}",
                       errors={"Idempotency-Key": key_error}, type_=PROBLEM + "idempotency-key-required")
    assert idempotency_key is not None, "a key or why not"
    body, refused = await _read_json(request)
    if refused is not None:
        return refused
    if not isinstance(body, dict):
        return _invalid({"body": "must be a JSON object"})
    channel_id = body.get("channelId")
    channel_error = validate_channel_id(channel_id)
    if channel_error or not isinstance(channel_id, str):
        return _invalid(parse_payment_request(body)[1])  # every field's error at once
    channel = await _channel_for(deps, caller, channel_id)
    if isinstance(channel, web.Response):
        return channel
    payment, errors = parse_payment_request(body, min(channel.max_amount or AMOUNT_MAX, AMOUNT_MAX))
    if payment is None:
        return _invalid(errors)
    try:
        accepted = await deps.intake.submit(payment, idempotency_key, caller.key_id)
    except IdempotencyConflict:
        return problem(409, "Idempotency-Key reused with a different request",
                       "this Idempotency-Key already names a payment with different details; use a new key "
                       "for a new payment", errors={"Idempotency-Key": "was used before with a different body"},
                       type_=PROBLEM + "idempotency-conflict")
    except Unavailable as exc:
        return _unavailable(exc.dependency)
    state = await deps.views.state(accepted.payment_id) if accepted.replayed else "Requested"
    # Formatted, not json.dumps'd: every value is a UUID, a channel id or a state name, none of
    # which needs escaping, and this runs for every accepted payment.
    body = f'{{"paymentId": "{accepted.payment_id}", "channelId": "{payment.channel_id}", "state": "{state}"}}'
    return web.Response(
        body=body.encode(), status=202, content_type="application/json",
        headers={"Location": f"/api/payments/{accepted.payment_id}",
                 "Idempotent-Replayed": "true" if accepted.replayed else "false"})


async def _channel_for(deps: IngressDeps, caller: ApiKey, channel_id: str
                       ) -> ChannelStatus | web.Response:
    """The channel if this caller may ask it for a payment now, else the refusal."""
    # Scope first: a key learns nothing about channels it is not scoped to, not even whether they exist.
    if not caller.allows(channel_id):
        return problem(403, "API key not valid for this channel",
                       f"this API key may not act for channel {channel_id!r}",
                       errors={"channelId": "is not a channel this API key is scoped to"},
                       type_=PROBLEM + "channel-not-allowed")
    channel = await deps.channels.get(channel_id)
    if channel is None:
        return problem(422, "Unknown channel", f"there is no channel {channel_id!r}",
                       errors={"channelId": "names no channel"}, type_=PROBLEM + "unknown-channel")
    if channel.status == "suspended":
        return problem(403, "Channel suspended", f"channel {channel_id!r} is suspended and takes no payments",
                       errors={"channelId": "is suspended"}, type_=PROBLEM + "channel-suspended")
    if not channel.is_active:
        return problem(403, "Channel not active", f"channel {channel_id!r} is still being onboarded",
                       errors={"channelId": "is not active yet"}, type_=PROBLEM + "channel-not-active")
    return channel


async def get_payment(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    caller = await authenticate(request, deps.authenticator)
    if caller is None:
        return _unauthenticated()
    payment_id = request.match_info["paymentId"]
    view = await deps.views.payment(payment_id) if _is_uuid(payment_id) else None
    # Another channel's payment is answered exactly like a missing one: its existence is not told.
    if view is None or not caller.allows(view["channelId"]):
        return problem(404, "Payment not found", f"no payment {untrusted(payment_id, 64)!r} for this API key",
                       type_=PROBLEM + "payment-not-found")
    return web.json_response(view)


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def _read_json(request: web.Request) -> tuple[object, web.Response | None]:
    if request.content_type != "application/json":
        return None, problem(415, "Unsupported media type", "send the request body as application/json",
                             headers={"Accept-Post": "application/json"}, type_=PROBLEM + "unsupported-media-type")
    limit = request.app[BODY_LIMIT]
    if request.content_length is not None and request.content_length > limit:
        return None, _too_large(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None, _too_large(limit)
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicate_names, parse_constant=_no_constants), None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        detail = str(exc) if isinstance(exc, _DuplicateName) else "the body is not valid JSON"
        return None, problem(400, "Malformed JSON", detail, type_=PROBLEM + "malformed-json")


class _DuplicateName(ValueError):
    pass


def _no_duplicate_names(pairs: list[tuple[str, object]]) -> dict:
    # {"amount": 1, "amount": 100000} means different things to different parsers: refuse it.
    result = dict(pairs)
    if len(result) != len(pairs):
        names = [name for name, _ in pairs]
        twice = sorted({n for n in names if names.count(n) > 1})
        raise _DuplicateName(f"the body names {', '.join(repr(untrusted(n, 64)) for n in twice)} more than once")
    return result


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _too_large(limit: int) -> web.Response:
    return problem(413, "Request too large", f"the body must be at most {limit} bytes",
                   type_=PROBLEM + "request-too-large")


def _invalid(errors: dict[str, str]) -> web.Response:
    return problem(400, "Invalid payment request", "one or more fields are invalid", errors=errors,
                   type_=PROBLEM + "invalid-request")


def _unauthenticated() -> web.Response:
    return problem(401, "API key required",
                   "send a valid API key as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'",
                   headers={"WWW-Authenticate": 'Bearer realm="mpesa-pipeline"'},
                   type_=PROBLEM + "unauthenticated")


def _unavailable(dependency: str) -> web.Response:
    return problem(503, "Service unavailable",
                   f"the payment could not be recorded ({dependency} did not answer); nothing was accepted, "
                   "retry with the same Idempotency-Key", headers={"Retry-After": RETRY_AFTER_S},
                   type_=PROBLEM + "unavailable")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) == 36


@web.middleware
async def problems_for_errors(request: web.Request, handler):
    """Routing errors and failures the handlers did not answer become problem+json too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem(exc.status, exc.reason, type_=PROBLEM + _slug(exc.status),
                       headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    except (DatabaseError, PoolTimeout) as exc:
        log.error("database unavailable: %s: %s", type(exc).__name__, untrusted(str(exc)))
        return _unavailable("postgresql")
    except Exception:
        log.exception("unhandled error on %s %s", untrusted(request.method, 16), untrusted(request.path))
        return problem(500, "Internal error", "the request failed unexpectedly; it is safe to retry with the "
                       "same Idempotency-Key", type_=PROBLEM + "internal-error")


def _slug(status: int) -> str:
    return {404: "not-found", 405: "method-not-allowed", 413: "request-too-large"}.get(status, f"http-{status}")
