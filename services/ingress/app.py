"""The ingress HTTP API: upstream services ask for payments and read their state."""
from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

from aiohttp import web
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.common.kafka import EventProducer, PublishError, new_event_fields
from services.common.observability import Health, add_ops_routes, http_metrics
from services.common.problems import problem
from services.common.topics import PAYMENT_REQUESTED
from services.ingress.validation import PaymentRequest, parse_payment_request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024


@dataclass
class IngressDeps:
    producer: EventProducer
    pool: AsyncConnectionPool


def create_app(deps: IngressDeps, health: Health | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[http_metrics])
    app["deps"] = deps
    app.router.add_post("/api/payments", create_payment)
    app.router.add_get("/api/payments/{paymentId}", get_payment)
    add_ops_routes(app, health or Health())
    return app


async def create_payment(request: web.Request) -> web.Response:
    body, error = await _read_json(request)
    if error:
        return error
    payment, errors = parse_payment_request(body)
    if errors:
        return problem(400, "Invalid payment request", "one or more fields are invalid", errors=errors)
    payment_id = str(uuid.uuid4())
    try:
        await request.app["deps"].producer.publish(PAYMENT_REQUESTED, _requested_event(payment, payment_id))
    except PublishError:
        log.error("payment request not acknowledged by Kafka", extra={"channel_id": payment.channel_id})
        return problem(503, "Service unavailable", "the payment could not be recorded; retry with the same request")
    return web.json_response({"paymentId": payment_id, "state": "Requested"}, status=202,
                             headers={"Location": f"/api/payments/{payment_id}"})


def _requested_event(p: PaymentRequest, payment_id: str) -> dict:
    return {**new_event_fields(p.channel_id, payment_id), "amount": p.amount, "phone": p.phone,
            "account_reference": p.account_reference, "description": p.description,
            "order_reference": p.order_reference, "idempotency_key": None, "metadata": p.metadata,
            "source": "API"}


async def _read_json(request: web.Request):
    if request.content_type != "application/json":
        return None, problem(415, "Unsupported media type", "send the request as application/json")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None, problem(413, "Request too large", f"the body must be at most {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw), None
    except (ValueError, UnicodeDecodeError):
        return None, problem(400, "Malformed JSON", "the body is not valid JSON")


async def get_payment(request: web.Request) -> web.Response:
    payment_id = request.match_info["paymentId"]
    try:
        uuid.UUID(payment_id)
    except ValueError:
        return problem(404, "Payment not found", f"no payment {payment_id!r}")
    async with request.app["deps"].pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "SELECT payment_id, channel_id, state, amount, account_reference, order_reference, merchant_request_id,"
            " checkout_request_id, mpesa_receipt, transaction_time, result_code, result_desc, requested_at,"
            " updated_at FROM payments WHERE payment_id = %s", (payment_id,))
        row = await cur.fetchone()
        if row is None:
            return problem(404, "Payment not found", f"no payment {payment_id!r}")
        await cur.execute("SELECT state, previous, reason, at FROM payment_history WHERE payment_id = %s ORDER BY id",
                          (payment_id,))
        history = await cur.fetchall()
    return web.json_response(_payment_view(row, history))


def _payment_view(row: dict, history: list[dict]) -> dict:
    iso = lambda t: t.isoformat() if t else None  # noqa: E731
    return {
        "paymentId": row["payment_id"], "channelId": row["channel_id"], "state": row["state"],
        "amount": row["amount"], "accountReference": row["account_reference"],
        "orderReference": row["order_reference"],
        "mpesa": {"merchantRequestId": row["merchant_request_id"], "checkoutRequestId": row["checkout_request_id"],
                  "receiptNumber": row["mpesa_receipt"], "transactionTime": iso(row["transaction_time"]),
                  "resultCode": row["result_code"], "resultDesc": row["result_desc"]},
        "requestedAt": iso(row["requested_at"]), "updatedAt": iso(row["updated_at"]),
        "history": [{"state": h["state"], "previous": h["previous"], "reason": h["reason"], "at": iso(h["at"])}
                    for h in history],
    }
