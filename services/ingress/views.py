"""The read side of the API: a payment as the ledger records it, for GET /api/payments/{paymentId}.

The ledger is the only writer of state; between Kafka's acknowledgement and the ledger's commit a
payment exists only as the ingress's record of the request, shown as Requested with no history yet.
"""
from __future__ import annotations

from datetime import datetime

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.ingress.idempotency import IdempotencyStore

_PAYMENT = """
SELECT payment_id, channel_id, state, amount, account_reference, order_reference, merchant_request_id,
       checkout_request_id, mpesa_receipt, transaction_time, result_code, result_desc, requested_at, updated_at
FROM payments WHERE payment_id = %s
"""
_HISTORY = "SELECT state, previous, reason, at FROM payment_history WHERE payment_id = %s ORDER BY id"
_STATE = "SELECT state FROM payments WHERE payment_id = %s"


class PaymentViews:
    def __init__(self, pool: AsyncConnectionPool, store: IdempotencyStore):
        self._pool = pool
        self._store = store

    async def payment(self, payment_id: str) -> dict | None:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_PAYMENT, (payment_id,))
            row = await cur.fetchone()
            if row is not None:
                await cur.execute(_HISTORY, (payment_id,))
                return payment_view(row, await cur.fetchall())
        requested = await self._store.request(payment_id)
        return None if requested is None else requested_view(requested)

    async def state(self, payment_id: str) -> str:
        """The current state; Requested until the ledger has recorded the payment."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(_STATE, (payment_id,))
            row = await cur.fetchone()
        return row[0] if row else "Requested"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def payment_view(row: dict, history: list[dict]) -> dict:
    return {
        "paymentId": row["payment_id"], "channelId": row["channel_id"], "state": row["state"],
        "amount": row["amount"], "accountReference": row["account_reference"],
        "orderReference": row["order_reference"],
        "mpesa": {"merchantRequestId": row["merchant_request_id"], "checkoutRequestId": row["checkout_request_id"],
                  "receiptNumber": row["mpesa_receipt"], "transactionTime": _iso(row["transaction_time"]),
                  "resultCode": row["result_code"], "resultDesc": row["result_desc"]},
        "requestedAt": _iso(row["requested_at"]), "updatedAt": _iso(row["updated_at"]),
        "history": [{"state": h["state"], "previous": h["previous"], "reason": h["reason"], "at": _iso(h["at"])}
                    for h in history],
    }


def requested_view(row: dict) -> dict:
    return {
        "paymentId": row["payment_id"], "channelId": row["channel_id"], "state": "Requested",
        "amount": row["amount"], "accountReference": row["account_reference"],
        "orderReference": row["order_reference"],
        "mpesa": {"merchantRequestId": None, "checkoutRequestId": None, "receiptNumber": None,
                  "transactionTime": None, "resultCode": None, "resultDesc": None},
        "requestedAt": _iso(row["occurred_at"]), "updatedAt": _iso(row["occurred_at"]),
        "history": [],
    }
