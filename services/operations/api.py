"""The review desk's admin routes, mounted by the onboarding API (services/channels/api.py create_app)
behind its admin token, body limit and problem details; documented in services/operations/openapi.json.

    GET  /admin/payments                       search, newest first, paged by an opaque cursor
    GET  /admin/payments/{paymentId}           one payment, its history, audit entries and raw callbacks
    POST /admin/payments/{paymentId}/query     ask the ledger for an STK query now
    POST /admin/payments/{paymentId}/resolve   settle (with the M-Pesa receipt) or cancel a payment in Review

The admin token is shared, so an instruction names its operator (`operator` in the body); the audit
trail records "<operator> via admin-api from <address>". No answer carries a payer's full number.
"""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from services.ingress.upstream import PAYMENT_ID
from services.operations.desk import Outcome, ReviewDesk
from services.operations.model import (
    DeskError,
    Instruction,
    InvalidInput,
    NotFound,
    actor_of,
    parse_query_instruction,
    parse_resolution,
    parse_search,
)

DESK = web.AppKey("review_desk", ReviewDesk)
_OUTCOME_STATUS = {"applied": 200, "rejected": 409, "accepted": 202}


def add_routes(app: web.Application, desk: ReviewDesk) -> None:
    app[DESK] = desk
    app.router.add_get("/admin/payments", search_payments)
    app.router.add_get("/admin/payments/{paymentId}", show_payment)
    app.router.add_post("/admin/payments/{paymentId}/query", query_payment)
    app.router.add_post("/admin/payments/{paymentId}/resolve", resolve_payment)


async def search_payments(request: web.Request) -> web.Response:
    repeated = frozenset(name for name in request.query if len(request.query.getall(name)) > 1)
    search, errors = parse_search(request.query, repeated)
    if search is None:
        raise InvalidInput("the search is not valid", errors)
    return web.json_response(await request.app[DESK].search(search))


async def show_payment(request: web.Request) -> web.Response:
    return web.json_response(await request.app[DESK].payment(_payment_id(request)))


async def query_payment(request: web.Request) -> web.Response:
    payment_id = _payment_id(request)
    instruction, errors = parse_query_instruction(await json_body(request))
    return await _instruct(request, payment_id, instruction, errors)


async def resolve_payment(request: web.Request) -> web.Response:
    payment_id = _payment_id(request)
    instruction, errors = parse_resolution(await json_body(request))
    return await _instruct(request, payment_id, instruction, errors)


async def _instruct(request: web.Request, payment_id: str, instruction: Instruction | None,
                    errors: dict[str, str]) -> web.Response:
    if instruction is None:
        raise InvalidInput("the instruction is not valid; nothing was sent to the ledger", errors)
    actor = actor_of(instruction.operator, f"admin-api from {request.remote or 'unknown'}")
    outcome: Outcome = await request.app[DESK].instruct(payment_id, instruction, actor)
    return web.json_response(outcome.view(), status=_OUTCOME_STATUS[outcome.status])


def _payment_id(request: web.Request) -> str:
    payment_id = request.match_info["paymentId"]
    if not PAYMENT_ID.fullmatch(payment_id):  # refused here: a NUL byte would make PostgreSQL fail the lookup
        raise NotFound("no such payment")
    return payment_id


async def json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise _Refusal(415, "Unsupported media type", "send the body as application/json")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _Refusal(413, "Request too large", "the body is larger than the admin API accepts") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # bad UTF-8 is a ValueError; RecursionError: nested too deep
        raise InvalidInput("the body is not valid JSON") from None  # never echoed: may hold a phone number


class _Refusal(DeskError):
    def __init__(self, status: int, title: str, detail: str):
        super().__init__(detail)
        self.status, self.title = status, title
