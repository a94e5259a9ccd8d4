"""The topics of the pipeline and the one record type each carries (docs/design.md, "The flow")."""
from __future__ import annotations

import re
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
# An operator's query or resolution of one payment (the admin API, `mpesa-pipeline payments`), applied by the ledger.
OPERATOR_COMMAND = Topic("mpesa.operator.command.v1", "operator_command")

ALL_TOPICS = (PAYMENT_REQUESTED, STK_PUSH_RESULT, CALLBACK_RAW, CALLBACK_REJECTED, STK_QUERY_REQUESTED,
              STK_QUERY_RESULT, PAYMENT_STATUS, DEAD_LETTER, OPERATOR_COMMAND)


# Upstream services that produce payment requests to Kafka themselves each write a topic of their
# own; the ingress re-authorises every request against the channels that producer may use before
# it reaches PAYMENT_REQUESTED (services/ingress/upstream.py). Kafka does not tell a consumer who
# produced a message, so the topic is what names the producer: only its principal may write it.
UPSTREAM_PREFIX = "mpesa.upstream."
_UPSTREAM_PRINCIPAL = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # no dots: the topic name stays unambiguous
_CHANNEL_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # the ingress's rule


def upstream_requested_topic(principal: str) -> Topic:
    return Topic(f"{UPSTREAM_PREFIX}{principal}.payment-requested.v1", PAYMENT_REQUESTED.schema)


def parse_upstream_producers(raw: str) -> dict[str, frozenset[str]]:
    """`shop-erp:shop-1,shop-2;partner:shop-3` -> {principal: channels it may request payments for}."""
    producers: dict[str, frozenset[str]] = {}
    for entry in filter(None, (e.strip() for e in raw.split(";"))):
        principal, sep, channels = entry.partition(":")
        principal = principal.strip()
        if not sep or not _UPSTREAM_PRINCIPAL.fullmatch(principal):
            raise ValueError("must be principal:channel[,channel...][;principal:...] with principals of "
                             "lower-case letters, digits and dashes")
        if principal in ACCESS or principal in ("admin", "broker") or principal in producers:
            raise ValueError(f"principal {principal} is a service's, the admin's, or listed twice")
        names = frozenset(c.strip() for c in channels.split(","))
        if not names or not all(_CHANNEL_ID.fullmatch(c) for c in names):
            raise ValueError(f"principal {principal} needs channel ids (lower-case letters, digits, _ and -)")
        producers[principal] = names
    return producers


@dataclass(frozen=True)
class Access:
    """What one service's Kafka principal reads and writes, and the prefix of its consumer groups.
    read_prefix: it also reads (and creates) every topic whose name starts so."""
    reads: tuple[Topic, ...] = ()
    writes: tuple[Topic, ...] = ()
    group_prefix: str | None = None
    read_prefix: str | None = None

    @property
    def topics(self) -> tuple[Topic, ...]:
        return tuple(dict.fromkeys((*self.reads, *self.writes)))


# README's topic table, per service principal. Every consumer writes the dead-letter topic
# (ConsumerLoop sets events it cannot read or apply aside there). infra/kafka_acl.py turns this
# into the broker's ACLs, and each service creates only these topics at start.
ACCESS = {
    "ingress": Access(writes=(PAYMENT_REQUESTED, DEAD_LETTER), group_prefix="ingress", read_prefix=UPSTREAM_PREFIX),
    "webhook-gateway": Access(writes=(CALLBACK_RAW, CALLBACK_REJECTED)),
    "stk-worker": Access(reads=(PAYMENT_REQUESTED, STK_QUERY_REQUESTED),
                         writes=(STK_PUSH_RESULT, STK_QUERY_RESULT, DEAD_LETTER), group_prefix="stk-worker"),
    "ledger": Access(reads=(PAYMENT_REQUESTED, STK_PUSH_RESULT, CALLBACK_RAW, STK_QUERY_RESULT, OPERATOR_COMMAND),
                     writes=(PAYMENT_STATUS, STK_QUERY_REQUESTED, DEAD_LETTER), group_prefix="ledger"),
    "notifier": Access(reads=(PAYMENT_STATUS,), writes=(DEAD_LETTER,), group_prefix="notifier"),
    # The admin API's process and the `payments` commands: operators' instructions, nothing else.
    "onboarding-api": Access(writes=(OPERATOR_COMMAND,)),
}
