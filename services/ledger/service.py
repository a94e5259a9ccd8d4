"""The ledger's consumer: applies each batch of facts in one PostgreSQL transaction.

Every event id is recorded in processed_events in the same transaction as its effect, with the
audit entries and the outbox rows; the consumer loop commits Kafka offsets only after this
returns, so a redelivered event is a no-op and nothing is published before the commit.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

import psycopg
import psycopg.errors
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from services.common.avro import Codec, DecodeError
from services.common.payment import mask_phone
from services.common.kafka import ConsumedEvent, Rejection, Transient, new_event_fields
from services.common.text import untrusted
from services.common.topics import PAYMENT_STATUS, STK_QUERY_REQUESTED
from services.ledger import state_machine as sm
from services.ledger import store
from services.ledger.callbacks import CallbackParseError
from services.ledger.facts import NotAFact, fact_of
from services.ledger.policies import POLICIES, ChannelPolicies
from services.ledger.relay import OutboxRow

log = logging.getLogger(__name__)

TRANSITIONS = Counter("ledger_transitions_total", "Payment state transitions applied", ["to_state"])
VERDICTS = Counter("ledger_facts_total", "Facts by verdict", ["fact", "verdict"])
ALERTS = Counter("ledger_contradictions_total", "Contradictions: sent to Review, or recorded on a final payment "
                 "(alert on any increase)", ["kind"])
REFUSED = Counter("ledger_callbacks_refused_total", "Callbacks refused without effect (expired URL)", ["reason"])
CHANNEL_MISMATCHES = Counter("ledger_channel_mismatches_total",
                             "Events naming another channel than their payment's, rejected (alert on any)", ["topic"])
CONFIRMATIONS = Counter("ledger_confirmation_queries_total", "STK queries asked at once to confirm a success callback")
FINAL_STATES = ("Settled", "Cancelled", "Failed")


# A batch this big means the ledger is behind: the next one may be applied beside it. Smaller batches
# (a ledger keeping up) go one after the other, which is faster for each (bench/settle_bench.py).
OVERLAP_FROM = 100


@dataclass(frozen=True)
class LedgerSettings:
    first_query_after: timedelta = timedelta(seconds=90)   # Pending this long: start STK queries
    query_backoff_max: timedelta = timedelta(seconds=120)  # queries back off up to this interval
    review_after: timedelta = timedelta(minutes=15)        # still no final answer: Review, not a guess
    callback_ttl_after_final: timedelta = timedelta(hours=24)  # callbacks for a payment final longer: refused
    channel_cache_ttl_s: float = 5.0                       # how long a channel's confirm-by-query setting is trusted


def next_query_delay(attempt: int, settings: LedgerSettings) -> timedelta:
    """15 s, 30 s, 60 s ... capped: the query is rate-limited like everything else."""
    return min(timedelta(seconds=15 * 2 ** (attempt - 1)), settings.query_backoff_max)


class Ledger:
    def __init__(self, pool: AsyncConnectionPool, codec: Codec, settings: LedgerSettings = LedgerSettings(),
                 on_commit: Callable[[list[OutboxRow]], None] = lambda rows: None):
        self.pool = pool
        self.codec = codec
        self.settings = settings
        self.on_commit = on_commit  # hands each committed transaction's outbox rows to the relay

    async def handle_batch(self, events: list[ConsumedEvent]) -> list[Rejection]:
        try:
            rejections = await self._apply_refusing_alone(events)
        except psycopg.Error as exc:  # the database's own trouble, not an event's: see _is_the_events_fault
            raise Transient(f"database error no event caused: {type(exc).__name__}: {untrusted(str(exc))}") from exc
        for r in rejections:
            if not isinstance(r.error, (NotAFact, CallbackParseError)):  # those say why; the rest may be a bug
                _log_poison(r.event, r.error)
        return rejections

    async def _apply_refusing_alone(self, events: list[ConsumedEvent]) -> list[Rejection]:
        """An event that cannot be applied must not block the rest of its batch: the halves are
        applied in turn (keeping the order) until it stands alone, so k bad events among n cost
        about 2k·log2(n) transactions, not n. Alone, it is rejected (dead-lettered) with its error."""
        try:
            return await self._apply_in_one_transaction(events)
        except Exception as exc:
            if isinstance(exc, Transient) or not _is_the_events_fault(exc):
                raise
            if len(events) == 1:
                return [Rejection(events[0], exc)]
        half = len(events) // 2
        return await self._apply_refusing_alone(events[:half]) + await self._apply_refusing_alone(events[half:])

    async def _apply_in_one_transaction(self, events: list[ConsumedEvent]) -> list[Rejection]:
        unique = _first_of_each(events)
        rejections, facts = [], []
        for e in unique:
            try:
                facts.append((e, *fact_of(e)))
            except Exception as exc:  # fact_of is pure: whatever it raises is this event's fault
                rejections.append(Rejection(e, exc))  # dead-lettered with its reason; payment untouched
        async with self.pool.connection() as conn, conn.transaction():
            batch = FactBatch(conn, self.codec, self.settings)
            fresh = await batch.prefetch([payment_id for _, payment_id, _ in facts], _receipts(facts),
                                         events=[(e.value["event_id"], e.topic) for e in unique],
                                         checkout_ids=_checkout_ids(facts))
            for e, payment_id, fact in facts:
                if e.value["event_id"] in fresh:
                    await batch.apply(e, payment_id, fact)
            await batch.flush()
        try:
            batch.committed(self.on_commit)
        except Exception:  # never blamed on the events, which are applied: the relay's scan sends the outbox
            log.exception("after-commit work failed")
        VERDICTS.labels("replay", "duplicate").inc(len(events) - len(fresh))
        return [r for r in rejections if r.event.value["event_id"] in fresh]


def _is_the_events_fault(exc: Exception) -> bool:
    """Whether an exception raised while applying a batch can be blamed on one of its events, which
    is then isolated and dead-lettered. The database refusing a value (a constraint, a malformed
    value) is; so is any other error of ours (TypeError, ArithmeticError...) raised by what an event
    carries. Every other database error is not: the connection or the server is down, or our SQL,
    schema or grants are wrong (a missing GRANT is a ProgrammingError). Each event would fail the
    same way, and dead-lettering them all would turn a bad deploy into a pile of events to replay:
    the consumer retries instead and readiness reports the stall."""
    if isinstance(exc, psycopg.Error):
        # ProgramLimitExceeded: a value too big for an index entry or a row, which an event carried.
        return isinstance(exc, (psycopg.IntegrityError, psycopg.DataError, psycopg.errors.ProgramLimitExceeded))
    return True


def _log_poison(event: ConsumedEvent, exc: Exception) -> None:
    """The error's type and where the event sits; its text may quote the event, so it is made safe."""
    log.error("event %s[%d]@%d cannot be applied, dead-lettered: %s: %s", event.topic, event.partition,
              event.offset, type(exc).__name__, untrusted(str(exc)),
              extra={"event_id": untrusted(event.value.get("event_id"), 64)})


class FactBatch:
    """One transaction's work. Payments are locked and read once, changed in memory, and written
    with the history, audit, outbox and parked rows in a few pipelined statements at flush."""

    def __init__(self, conn, codec: Codec, settings: LedgerSettings, policies: ChannelPolicies = POLICIES):
        self.conn, self.codec, self.settings, self.policies = conn, codec, settings, policies
        self.payments: dict[str, dict | None] = {}
        self.dirty: set[str] = set()
        self.parked: dict[str, list[ConsumedEvent]] = {}  # payment_id -> the facts it keeps waiting, oldest first
        self.parked_before: set[str] = set()  # event ids that have a parked_facts row already
        self.receipts: dict[str, str] = {}  # receipt -> the payment it proves
        self.checkouts: dict[str, str] = {}  # CheckoutRequestID -> the payment whose push it is
        self.receipts_read: set[str] = set()  # receipts whose owners were read
        self.checkouts_read: set[str] = set()  # CheckoutRequestIDs whose owners were read
        self.history: list[tuple] = []
        self.audit: list[dict] = []
        self.outbox: list[tuple[str, bytes, bytes]] = []
        self.outbox_rows: list[OutboxRow] = []  # the outbox as written, with ids
        self.counts: collections.Counter = collections.Counter()  # (metric, labels) -> increments, recorded after commit

    async def prefetch(self, payment_ids: list[str], receipts: list[str] = (),
                       events: list[tuple[str, str]] = (), checkout_ids: list[str] = ()) -> set[str]:
        """Locks and reads the batch's payments, and records its events (event_id, topic) as
        processed; returns the ids of those that were not already."""
        start = await store.open_batch(self.conn, list(events), payment_ids, list(receipts), list(checkout_ids))
        self.payments.update({pid: start.payments.get(pid) for pid in payment_ids})
        # Known payments keep facts too: a callback waits for its push result (on_callback).
        self.parked = {pid: self._parked_events(rows) for pid, rows in start.parked.items()}
        self.parked_before = {e.value["event_id"] for events in self.parked.values() for e in events}
        self.receipts, self.checkouts = start.receipts, start.checkouts
        self.receipts_read, self.checkouts_read = set(receipts), set(checkout_ids)
        return start.fresh_events

    def _parked_events(self, rows: list[tuple[str, str, bytes]]) -> list[ConsumedEvent]:
        events = []
        for event_id, topic, payload in rows:
            try:
                schema, value = self.codec.decode(payload)
            except DecodeError as exc:  # left parked (flush deletes only what it read) and shown by the gauges
                log.error("parked fact %s cannot be decoded, left parked: %s", event_id, untrusted(str(exc)))
                continue
            events.append(ConsumedEvent(topic, -1, -1, None, schema, value, payload))
        return events

    def set(self, payment_id: str, changes: dict) -> None:
        self.payments[payment_id].update(changes)
        self.dirty.add(payment_id)

    async def apply(self, event: ConsumedEvent, payment_id: str, fact: sm.Fact) -> sm.Decision:
        fact, decision = await self._decide(event, payment_id, fact)
        return await self._record(event, payment_id, fact, decision)

    async def _decide(self, event: ConsumedEvent, payment_id: str, fact: sm.Fact) -> tuple[sm.Fact, sm.Decision]:
        row = self.payments.get(payment_id)
        claimed = event.value.get("channel_id")  # the reconciler's own facts name none
        if row is not None and claimed is not None and claimed != row["channel_id"]:
            return fact, self._other_channel(event, payment_id, row)
        if isinstance(fact, sm.CallbackReceived):
            fact = await self._with_owners(payment_id, fact)
        elif isinstance(fact, sm.PushAccepted):
            await self._read_owners([], [fact.checkout_request_id])
        decision = self._receipt_checked(payment_id, sm.decide(await self._snapshot(row, fact), fact))
        return fact, self._checkout_checked(payment_id, row, decision)

    def _other_channel(self, event: ConsumedEvent, payment_id: str, row: dict) -> sm.Decision:
        """An event that names another channel than its payment's changes nothing. It is rejected
        here, with an audit entry on the payment, rather than dead-lettered: it is not unreadable
        (replaying it would only be rejected again) but a sign of a misrouted or forged event
        (a callback posted under channel A for channel B's payment, a producer's bug), and the
        operator looking into that payment finds it in the payment's own audit trail, next to the
        facts it tried to contradict; the metric and the log line make it alertable."""
        self.counts[(CHANNEL_MISMATCHES, event.topic)] += 1
        # Both foreign: a request produced straight to the topic chose its payment's channel id too.
        claimed, owner = untrusted(event.value["channel_id"], 64), untrusted(row["channel_id"], 64)
        log.warning("%s event names channel %s, its payment is %s's: rejected", event.schema, claimed, owner,
                    extra={"payment_id": payment_id})
        return sm.rejected(f"event for channel {claimed}, but the payment belongs to {owner}")

    async def _record(self, event: ConsumedEvent, payment_id: str, fact: sm.Fact, decision: sm.Decision) -> sm.Decision:
        row = self.payments.get(payment_id)
        self.counts[(VERDICTS, type(fact).__name__, decision.verdict.value)] += 1
        if decision.refusal:
            self.counts[(REFUSED, decision.refusal)] += 1
        self._audit(payment_id, event.value["event_id"], fact, decision, row)
        if decision.verdict is sm.Verdict.PARKED:
            self.parked.setdefault(payment_id, []).append(event)  # what it waits for may follow in this batch
        elif decision.verdict is sm.Verdict.APPLIED:
            self._persist(event.value, payment_id, row, decision)
            if self.parked.get(payment_id):  # a waiting fact may apply now (its payment or push result came)
                await self._unpark(payment_id)
        return decision

    async def _with_owners(self, payment_id: str, fact: sm.CallbackReceived) -> sm.CallbackReceived:
        """The callback with the other payments its receipt and CheckoutRequestID already belong to."""
        cb = fact.callback
        await self._read_owners([cb.receipt] if cb.receipt else [], [cb.checkout_request_id])
        receipt_owner = self.receipts.get(cb.receipt) if cb.receipt else None
        checkout_owner = self.checkouts.get(cb.checkout_request_id)
        return dataclasses.replace(fact, receipt_owner=receipt_owner if receipt_owner != payment_id else None,
                                   checkout_owner=checkout_owner if checkout_owner != payment_id else None)

    async def _read_owners(self, receipts: list[str], checkouts: list[str]) -> None:
        """Reads who holds these receipts and CheckoutRequestIDs unless the batch read them already."""
        receipts = [r for r in receipts if r not in self.receipts_read]
        checkouts = [c for c in checkouts if c not in self.checkouts_read]
        if receipts or checkouts:  # a fact un-parked from an earlier batch: not in the batch's first read
            held, pushed = await store.owners(self.conn, receipts, checkouts)
            self.receipts = {**held, **self.receipts}  # this batch's own changes win
            self.checkouts = {**pushed, **self.checkouts}
            self.receipts_read.update(receipts)
            self.checkouts_read.update(checkouts)

    async def _snapshot(self, row: dict | None, fact: sm.Fact) -> sm.Payment | None:
        if row is None:
            return None
        final_for = datetime.now(timezone.utc) - row["final_at"] if row["final_at"] else None
        confirm = (isinstance(fact, sm.CallbackReceived) and fact.callback.succeeded and row["state"] in sm.OPEN
                   and await self.policies.confirm_by_query(self.conn, row["channel_id"],
                                                           self.settings.channel_cache_ttl_s))
        return sm.Payment(row["state"], row["amount"], row["phone"], row["checkout_request_id"], row["mpesa_receipt"],
                          row["result_code"], row["push_unknown"], row["candidate_receipt"],
                          row["candidate_checkout_request_id"], row["candidate_transaction_time"],
                          row["candidate_result_code"],
                          confirm_by_query=bool(confirm),
                          callbacks_closed=final_for is not None and final_for > self.settings.callback_ttl_after_final)

    def _persist(self, v: dict, payment_id: str, row: dict | None, d: sm.Decision) -> None:
        previous = row["state"] if row else None
        changes = {**d.changes, **self._reconciliation_changes(d)}
        if d.new_state:
            changes["state"] = d.new_state
        if d.new_state in FINAL_STATES and d.new_state != previous:
            changes["final_at"] = datetime.now(timezone.utc)
        if d.alert:
            self.counts[(ALERTS, d.alert)] += 1
            if d.new_state == "Review":
                changes["review_reason"] = d.reason
                log.warning("payment sent to review: %s", d.reason, extra={"payment_id": payment_id})
            else:
                log.warning("contradiction recorded, state kept: %s", d.reason, extra={"payment_id": payment_id})
        if row is None:
            self.payments[payment_id] = store.new_payment_row(v)
        self.set(payment_id, changes)
        row = self.payments[payment_id]
        self.receipts.update({row[c]: payment_id for c in store.RECEIPT_COLUMNS if row.get(c)})
        self.checkouts.update({row[c]: payment_id for c in store.CHECKOUT_COLUMNS if row.get(c)})
        if d.query:
            self._ask_query(row, d.query)
        if d.new_state and d.new_state != previous:
            self.counts[(TRANSITIONS, d.new_state)] += 1
            self.history.append((payment_id, d.new_state, previous, d.reason, v["event_id"]))
            self.outbox.append(self._status_event(row, previous, d.reason))

    def _ask_query(self, row: dict, checkout_request_id: str) -> None:
        """At once, through the outbox; the reconciler asks again with back-off if it stays unanswered."""
        attempt = row["query_attempts"] + 1
        self.set(row["payment_id"], {"query_attempts": attempt, "next_query_at": datetime.now(timezone.utc)
                                     + next_query_delay(attempt, self.settings)})
        self.counts[(CONFIRMATIONS,)] += 1
        self.outbox.append(query_request(self.codec, row, checkout_request_id, attempt, "CONFIRM_CALLBACK"))

    def _receipt_checked(self, payment_id: str, d: sm.Decision) -> sm.Decision:
        """One receipt proves one payment: a receipt already used elsewhere is a case for review."""
        receipt = d.changes.get("mpesa_receipt")
        other = self.receipts.get(receipt) if receipt else None
        if other is None or other == payment_id:
            return d
        changes = {k: v for k, v in d.changes.items() if k not in ("mpesa_receipt", *sm.CANDIDATE_CLEARED)}
        return sm.review("receipt_reused", f"receipt {receipt} already proves payment {other}", **changes)

    def _checkout_checked(self, payment_id: str, row: dict | None, d: sm.Decision) -> sm.Decision:
        """One CheckoutRequestID is one push. An accepted push whose id another payment holds already
        (a callback for a payment whose push outcome was unknown named it) is a contradiction: written,
        it would break the unique index and dead-letter whichever event applied it, even an innocent
        one that un-parked it. A final payment stays final."""
        checkout = d.changes.get("checkout_request_id")
        other = self.checkouts.get(checkout) if checkout else None
        if other is None or other == payment_id:
            return d
        reason = f"CheckoutRequestID {untrusted(checkout)} already belongs to payment {other}"
        if row is not None and row["state"] in FINAL_STATES:
            return sm.contradiction("checkout_reused", f"{reason}; the payment stays {row['state']}")
        changes = {k: v for k, v in d.changes.items() if k not in ("checkout_request_id", "merchant_request_id")}
        return sm.review("checkout_reused", reason, **changes)

    def _reconciliation_changes(self, d: sm.Decision) -> dict:
        now = datetime.now(timezone.utc)
        if d.new_state == "Pending" or d.changes.get("push_unknown"):
            return {"pending_since": now, "next_query_at": now + self.settings.first_query_after}
        if d.new_state == "Requested":  # a push result may never come (its request dead-lettered): a deadline
            return {"next_query_at": now + self.settings.review_after}
        if d.new_state in ("Settled", "Cancelled", "Failed", "Review"):
            return {"next_query_at": None}
        return {}

    async def _unpark(self, payment_id: str) -> None:
        """Decides the payment's waiting facts again, oldest first; those still waiting stay parked."""
        for early in self.parked.pop(payment_id, []):
            try:
                _, fact = fact_of(early)
                fact, decision = await self._decide(early, payment_id, fact)
            except Exception as exc:
                # Read and parked by an earlier version, unreadable now: blaming the fact being applied
                # would dead-letter it, and with it its payment's progress. The fact stays parked, where
                # the parked-fact gauges show it to an operator.
                log.error("parked fact %s cannot be applied, left parked: %s", early.value["event_id"],
                          type(exc).__name__, extra={"payment_id": payment_id})
                self.parked.setdefault(payment_id, []).append(early)
                continue
            await self._record(early, payment_id, fact, decision)

    def _audit(self, payment_id: str, event_id: str | None, fact: sm.Fact, d: sm.Decision, row: dict | None) -> None:
        before = row["state"] if row else None
        self.audit.append({"payment_id": payment_id, "event_id": event_id, "fact": type(fact).__name__,
                           "verdict": d.verdict.value, "from_state": before, "to_state": d.new_state or before,
                           "detail": d.reason or ""})

    def _status_event(self, row: dict, previous: str | None, reason: str | None) -> tuple[str, bytes, bytes]:
        record = {**new_event_fields(row["channel_id"], row["payment_id"]), "status": row["state"],
                  "previous_status": previous, "amount": row["amount"], "phone_masked": mask_phone(row["phone"]),
                  "order_reference": row["order_reference"], "checkout_request_id": row["checkout_request_id"],
                  "mpesa_receipt": row["mpesa_receipt"], "transaction_time": row["transaction_time"],
                  "result_code": row["result_code"], "reason": reason,
                  "metadata": {str(k): str(v) for k, v in (row["metadata"] or {}).items()}}
        return PAYMENT_STATUS.name, row["channel_id"].encode(), self.codec.encode(PAYMENT_STATUS.schema, record)

    def committed(self, hand_over: Callable[[list[OutboxRow]], None]) -> None:
        """After the commit: metrics are recorded (a batch that rolled back is applied again and must
        not count twice) and the outbox rows go to the relay."""
        for (metric, *labels), n in self.counts.items():
            (metric.labels(*labels) if labels else metric).inc(n)
        hand_over(self.outbox_rows)

    async def flush(self) -> None:
        waiting = {e.value["event_id"]: (pid, e) for pid, events in self.parked.items() for e in events}
        unparked = sorted(self.parked_before - waiting.keys())
        to_park = [(event_id, pid, e.topic, e.raw if e.raw is not None else self.codec.encode(e.schema, e.value))
                   for event_id, (pid, e) in waiting.items() if event_id not in self.parked_before]
        await store.write_payments(self.conn, [self.payments[pid] for pid in sorted(self.dirty)], unparked)
        await store.add_history(self.conn, self.history)
        await store.park(self.conn, to_park)
        self.outbox_rows = await store.enqueue(self.conn, self.outbox)
        await store.append_audit(self.conn, self.audit)  # last: it holds the chain's lock until commit


def _receipts(facts) -> list[str]:
    return [f.callback.receipt for _, _, f in facts if isinstance(f, sm.CallbackReceived) and f.callback.receipt]


def _checkout_ids(facts) -> list[str]:
    return [f.callback.checkout_request_id if isinstance(f, sm.CallbackReceived) else f.checkout_request_id
            for _, _, f in facts if isinstance(f, (sm.CallbackReceived, sm.PushAccepted))]


def query_request(codec: Codec, row: dict, checkout_request_id: str, attempt: int, reason: str) -> tuple[str, bytes, bytes]:
    """An outbox row asking the STK worker to query Daraja under the channel's credentials."""
    record = {**new_event_fields(row["channel_id"], row["payment_id"]), "checkout_request_id": checkout_request_id,
              "attempt": attempt, "reason": reason}
    return STK_QUERY_REQUESTED.name, row["channel_id"].encode(), codec.encode(STK_QUERY_REQUESTED.schema, record)


def _first_of_each(events) -> list[ConsumedEvent]:
    """Drops repeats of one event id inside a batch (a producer retry can duplicate it)."""
    unique = {}
    for e in events:
        unique.setdefault(e.value["event_id"], e)
    return list(unique.values())
