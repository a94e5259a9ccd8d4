"""RFC 9457 problem details, the one error shape of every HTTP API here."""
from __future__ import annotations

from aiohttp import web

PROBLEM_JSON = "application/problem+json"


def problem(status: int, title: str, detail: str = "", *, errors: dict[str, str] | None = None,
            type_: str = "about:blank", headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": type_, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if errors:
        body["errors"] = [{"field": field, "message": message} for field, message in errors.items()]
    return web.json_response(body, status=status, content_type=PROBLEM_JSON, headers=headers)
