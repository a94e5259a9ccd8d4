"""A payer's requests on the admin API (README.md, "Payers' data: access and erasure"), mounted by the
onboarding API (services/channels/api.py create_app) behind its admin token, body limit and problem
details when it has a privacy pool; documented in services/operations/openapi.json.

    POST /admin/payers/export   what we hold about one payer (subject access)
    POST /admin/payers/erase    erase one payer's data, keeping the money records

The number travels in the JSON body, never the URL (URLs end up in access logs and proxies).
"""
from __future__ import annotations

from aiohttp import web

from services.operations.api import json_body
from services.operations.model import InvalidInput, actor_of
from services.privacy.payers import Payers, parse_request

PAYERS = web.AppKey("payers", Payers)
NO_STORE = {"Cache-Control": "no-store"}  # an export is personal data: kept by no cache


def add_routes(app: web.Application, payers: Payers) -> None:
    app[PAYERS] = payers
    app.router.add_post("/admin/payers/export", export_payer)
    app.router.add_post("/admin/payers/erase", erase_payer)


async def export_payer(request: web.Request) -> web.Response:
    return await _handle(request, "export")


async def erase_payer(request: web.Request) -> web.Response:
    return await _handle(request, "erase")


async def _handle(request: web.Request, kind: str) -> web.Response:
    payer_request, errors = parse_request(kind, await json_body(request))
    if payer_request is None:
        raise InvalidInput(f"the {kind} request is not valid; nothing was done", errors)
    actor = actor_of(payer_request.operator, f"admin-api from {request.remote or 'unknown'}")
    payers = request.app[PAYERS]
    answer = await (payers.export if kind == "export" else payers.erase)(payer_request, actor)
    return web.json_response(answer, headers=NO_STORE)
