"""The topics of the pipeline and the one record type each carries (design.md, "The flow")."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    name: str
    schema: str  # schema file stem in schemas/


PAYMENT_REQUESTED = Topic("mpesa.payment.requested.v1", "payment_requested")
STK_PUSH_RESULT = Topic("mpesa.stk.push-result.v1", "stk_push_result")
CALLBACK_RAW = Topic("mpesa.callback.raw.v1", "callback_raw")
CALLBACK_REJECTED = Topic("mpesa.callback.rejected.v1", "callback_raw")  # forensics only; nothing consumes it
STK_QUERY_REQUESTED = Topic("mpesa.stk.query-requested.v1", "stk_query_requested")
STK_QUERY_RESULT = Topic("mpesa.stk.query-result.v1", "stk_query_result")
PAYMENT_STATUS = Topic("mpesa.payment.status.v1", "payment_status")
DEAD_LETTER = Topic("mpesa.dead-letter.v1", "dead_letter")

ALL_TOPICS = (PAYMENT_REQUESTED, STK_PUSH_RESULT, CALLBACK_RAW, CALLBACK_REJECTED, STK_QUERY_REQUESTED,
              STK_QUERY_RESULT, PAYMENT_STATUS, DEAD_LETTER)
