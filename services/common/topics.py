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


@dataclass(frozen=True)
class Access:
    """What one service's Kafka principal reads and writes, and the prefix of its consumer groups."""
    reads: tuple[Topic, ...] = ()
    writes: tuple[Topic, ...] = ()
    group_prefix: str | None = None

    @property
    def topics(self) -> tuple[Topic, ...]:
        return tuple(dict.fromkeys((*self.reads, *self.writes)))


# README's topic table, per service principal. Every consumer writes the dead-letter topic
# (ConsumerLoop sets events it cannot read or apply aside there). infra/kafka_acl.py turns this
# into the broker's ACLs, and each service creates only these topics at start.
ACCESS = {
    "ingress": Access(writes=(PAYMENT_REQUESTED,)),
    "webhook-gateway": Access(writes=(CALLBACK_RAW, CALLBACK_REJECTED)),
    "stk-worker": Access(reads=(PAYMENT_REQUESTED, STK_QUERY_REQUESTED),
                         writes=(STK_PUSH_RESULT, STK_QUERY_RESULT, DEAD_LETTER), group_prefix="stk-worker"),
    "ledger": Access(reads=(PAYMENT_REQUESTED, STK_PUSH_RESULT, CALLBACK_RAW, STK_QUERY_RESULT),
                     writes=(PAYMENT_STATUS, STK_QUERY_REQUESTED, DEAD_LETTER), group_prefix="ledger"),
}
