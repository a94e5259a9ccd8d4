"""The ledger's application service: applies ledger inputs to payments in units of work.

Two entry points share it: `apply` for the facts the consumer brings (services/ledger/service.py
adapts Kafka's events), `reconcile` for the reconciler's timer (services/ledger/reconciler.py). Each
batch reads and locks its payments once through the unit-of-work port, lets the pure domain decide
(services/ledger/state_machine.py, deadlines.py), and writes the payments with their history,
audit entries, outbox rows and parked facts in one go; metrics are counted after the commit, and
the outbox rows handed to the relay then (docs/design.md).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import Counter

from services.common import config
from services.common.avro import Codec, DecodeError
from services.common.ids import new_id
from services.common.payment import (
    NUMBER_DIGITS_MIN,
    PaymentState,
    fewer_digits_than,
    mask_phone,
    mask_phones_in,
    outside_uuids,
)
from services.common.pseudonyms import CHECKOUT, PHONE, PSEUDONYM_KEY_FILE, Pseudonyms
from services.common.text import untrusted
from services.common.topics import PAYMENT_STATUS, STK_QUERY_REQUESTED
from services.ledger import deadlines, state_machine as sm
from services.ledger.deadlines import LedgerSettings
from services.ledger.facts import RECONCILIATION, LedgerInput, input_of
from services.ledger.ports import Clock, OutboxMessage, OutboxRow, UnitOfWork, UnitOfWorkFactory, Writes
from services.ledger.record import CHECKOUT_COLUMNS, RECEIPT_COLUMNS, PaymentRecord, new_record, snapshot

log = logging.getLogger(__name__)

TRANSITIONS = Counter("ledger_transitions_total", "Payment state transitions applied", ["to_state"])
VERDICTS = Counter("ledger_facts_total", "Facts by verdict", ["fact", "verdict"])
ALERTS = Counter("ledger_contradictions_total", "Contradictions: sent to Review, or recorded on a final payment "
                 "(alert on any increase)", ["kind"])
REFUSED = Counter("ledger_callbacks_refused_total", "Callbacks refused without effect (expired URL)", ["reason"])
CHANNEL_MISMATCHES = Counter("ledger_channel_mismatches_total",
                             "Events naming another channel than their payment's, rejected (alert on any)", ["topic"])
CONFIRMATIONS = Counter("ledger_confirmation_queries_total", "STK queries asked at once to confirm a success callback")
QUERIES = Counter("ledger_reconciliation_queries_total", "STK queries requested by reconciliation")
OPERATOR_QUERIES = Counter("ledger_operator_queries_total", "STK queries an operator asked")
OPERATOR_REFUSED = Counter("ledger_operator_commands_refused_total",
                           "Operator instructions refused without effect, by why", ["reason"])
# A status event's reason is for a dashboard, not a document: longer texts (Daraja's descriptions, an
# operator's words) are cut here so analytics never hold a free-text field of unbounded size.
STATUS_REASON_MAX = 200
# A callback body is kept for the review desk up to the size the gateway accepts (and the column holds).
CALLBACK_BODY_MAX_BYTES = 64 * 1024

HandOver = Callable[[list[OutboxRow]], None]


class LedgerService:
    """Applies ledger inputs through a unit of work; the domain decides, this records the decision."""

    def __init__(self, unit_of_work: UnitOfWorkFactory, codec: Codec, settings: LedgerSettings, clock: Clock,
                 on_commit: HandOver = lambda rows: None, pseudonyms: Pseudonyms | None = None):
        self.unit_of_work = unit_of_work
        # The key of the status topic's checkout_ref; by default the file PSEUDONYM_KEY_FILE names.
        self.pseudonyms = pseudonyms or Pseudonyms.from_file(config.load([PSEUDONYM_KEY_FILE])[PSEUDONYM_KEY_FILE.env])
        self.codec = codec
        self.settings = settings
        self.clock = clock
        self.on_commit = on_commit  # hands each committed transaction's outbox rows to the relay

    async def apply(self, inputs: Sequence[LedgerInput], also_processed: Sequence[tuple[str, str]] = ()) -> set[str]:
        """Applies the inputs in one unit of work; each event id once, ever. also_processed: events
        (event_id, source) marked processed without an input (they are refused by the caller).
        Returns the ids that were not processed before."""
        async with self.unit_of_work() as uow:
            batch = await self.apply_within(uow, inputs, also_processed)
        self.after_commit(batch)
        return batch.fresh

    async def apply_within(self, uow: UnitOfWork, inputs: Sequence[LedgerInput],
                           also_processed: Sequence[tuple[str, str]] = ()) -> Batch:
        """The work of `apply` inside a unit of work the caller owns (and commits)."""
        batch = Batch(uow, self)
        events = [(i.event_id, i.source) for i in inputs] + list(also_processed)
        await batch.open([i.payment_id for i in inputs], events, _receipts(inputs), _checkout_ids(inputs))
        for i in inputs:
            if i.event_id in batch.fresh:
                await batch.apply(i)
        await batch.flush()
        return batch

    async def reconcile(self, payment_ids: Sequence[str]) -> int:
        """The timer's entry: each of these payments that is still due when locked (another ledger
        may have reconciled it meanwhile) gets an STK query, or goes to Review at its deadline.
        Returns how many were due."""
        async with self.unit_of_work() as uow:
            batch = Batch(uow, self)
            await batch.open(list(payment_ids), [], [], [])
            due = 0
            for payment_id in payment_ids:
                record = batch.payments.get(payment_id)
                if record is not None and deadlines.is_due(record, batch.now):
                    due += 1
                    await batch.reconcile(record)
            await batch.flush()
        self.after_commit(batch)
        return due

    def after_commit(self, batch: Batch) -> None:
        """Metrics are recorded after the commit (a batch that rolled back is applied again and must
        not count twice), and the outbox rows go to the relay."""
        try:
            for (metric, *labels), n in batch.counts.items():
                (metric.labels(*labels) if labels else metric).inc(n)
            self.on_commit(batch.outbox_rows)
        except Exception:  # never blamed on the events, which are applied: the relay's scan sends the outbox
            log.exception("after-commit work failed")

    def status_event(self, record: PaymentRecord, previous: str | None, reason: str | None,
                     resolved_by: str | None = None, metadata_keys: frozenset[str] = frozenset()) -> OutboxMessage:
        """The analytics event of a state change, minimised (schemas/README.md, "Personal data"): the
        phone down to its last three digits, the CheckoutRequestID only as its keyed pseudonym (the
        clear field stays null: current ids end in the payer's MSISDN), free texts bounded and with
        payers' numbers masked, and only the metadata keys the channel allow-lists."""
        fields = {"event_id": new_id(), "occurred_at": self.clock.now(), "channel_id": record.channel_id,
                  "payment_id": record.payment_id, "schema_version": 4}
        checkout = record.checkout_request_id
        event = {**fields, "status": record.state, "previous_status": previous, "amount": record.amount,
                 "phone_masked": mask_phone(record.phone),
                 "order_reference": _masked(record.order_reference, None, self.pseudonyms),
                 "checkout_request_id": None, "checkout_ref": _checkout_ref(checkout, self.pseudonyms),
                 "mpesa_receipt": record.mpesa_receipt, "transaction_time": record.transaction_time,
                 "result_code": record.result_code, "reason": _masked(reason, STATUS_REASON_MAX, self.pseudonyms),
                 "metadata": {str(k): _masked(str(v), None, self.pseudonyms) for k, v in (record.metadata or {}).items()
                              if str(k) in metadata_keys},
                 "late_mpesa_receipt": record.late_receipt, "resolved_by": _masked(resolved_by, None, self.pseudonyms)}
        return PAYMENT_STATUS.name, record.channel_id.encode(), self.codec.encode(PAYMENT_STATUS, event)

    def query_request(self, record: PaymentRecord, checkout_request_id: str, attempt: int,
                      reason: str) -> OutboxMessage:
        """An outbox row asking the STK worker to query Daraja under the channel's credentials."""
        event = {"event_id": new_id(), "occurred_at": self.clock.now(), "channel_id": record.channel_id,
                 "payment_id": record.payment_id, "schema_version": 1,
                 "checkout_request_id": checkout_request_id, "attempt": attempt, "reason": reason}
        return (STK_QUERY_REQUESTED.name, record.channel_id.encode(),
                self.codec.encode(STK_QUERY_REQUESTED, event))


class Batch:
    """One unit of work's batch. Payments are locked and read once, changed in memory, and written
    with the history, audit, outbox and parked rows at flush."""

    def __init__(self, uow: UnitOfWork, service: LedgerService):
        self.uow, self.service, self.settings = uow, service, service.settings
        self.now = service.clock.now()  # one time for the whole batch: its decisions are one transaction
        self.fresh: set[str] = set()
        self.payments: dict[str, PaymentRecord | None] = {}
        self.dirty: set[str] = set()
        self.parked: dict[str, list[LedgerInput]] = {}  # payment_id -> the facts it keeps waiting, oldest first
        self.parked_before: set[str] = set()  # event ids that have a parked_facts row already
        self.receipts: dict[str, str] = {}  # receipt -> the payment it proves
        self.checkouts: dict[str, str] = {}  # CheckoutRequestID -> the payment whose push it is
        self.receipts_read: set[str] = set()
        self.checkouts_read: set[str] = set()
        self.writes = Writes()
        self.callback_bodies: dict[str, tuple[str, str, datetime, str, str]] = {}  # event_id -> its row
        self.outbox_rows: list[OutboxRow] = []
        self.counts: collections.Counter[tuple[Any, ...]] = collections.Counter()

    async def open(self, payment_ids: list[str], events: list[tuple[str, str]], receipts: list[str],
                   checkout_ids: list[str]) -> None:
        opened = await self.uow.open(events, payment_ids, receipts, checkout_ids)
        self.fresh = opened.fresh_events
        # Parked facts are read back as consumed: their writer schemas may be registry ids not seen
        # since this process started.
        await self.service.codec.learn(payload for rows in opened.parked.values() for _, _, payload in rows)
        self.payments.update({pid: opened.payments.get(pid) for pid in payment_ids})
        # Known payments keep facts too: a callback waits for its push result (on_callback).
        self.parked = {pid: self._waiting(rows) for pid, rows in opened.parked.items()}
        self.parked_before = {i.event_id for waiting in self.parked.values() for i in waiting}
        self.receipts, self.checkouts = opened.receipts, opened.checkouts
        self.receipts_read, self.checkouts_read = set(receipts), set(checkout_ids)
        waiting = [i for inputs in self.parked.values() for i in inputs]
        if waiting:  # one read for all the facts the batch may un-park, not one round trip each
            await self._read_owners(_receipts(waiting), _checkout_ids(waiting))

    def _waiting(self, rows: list[tuple[str, str, bytes]]) -> list[LedgerInput]:
        waiting = []
        for event_id, topic, payload in rows:
            try:
                schema, value = self.service.codec.decode(payload)
                waiting.append(input_of(topic, schema, value, payload))
            except Exception as exc:
                # Read and parked by an earlier version, unreadable now: blaming the fact being applied
                # would dead-letter it, and with it its payment's progress. The fact stays parked (flush
                # deletes only what it read), where the parked-fact gauges show it to an operator.
                why = untrusted(str(exc)) if isinstance(exc, DecodeError) else type(exc).__name__
                log.error("parked fact %s cannot be read, left parked: %s", event_id, why)
        return waiting

    async def apply(self, i: LedgerInput) -> sm.Decision:
        decision = await self._decide(i)
        return await self._record(i, decision)

    async def _decide(self, i: LedgerInput) -> sm.Decision:
        record = self.payments.get(i.payment_id)
        if record is not None and i.claimed_channel is not None and i.claimed_channel != record.channel_id:
            return self._other_channel(i, record)
        fact = i.fact
        if isinstance(fact, sm.CallbackReceived):
            cb = fact.callback
            await self._read_owners([cb.receipt] if cb.receipt else [], [cb.checkout_request_id])
        elif isinstance(fact, sm.PushAccepted):
            await self._read_owners([], [fact.checkout_request_id])
        elif isinstance(fact, sm.OperatorResolution) and (settling := _receipt_to_check(fact)):
            await self._read_owners([settling], [])
        owners = sm.Owners(i.payment_id, self.receipts, self.checkouts)
        return sm.decide(await self._snapshot(record, fact), fact, owners)

    def _other_channel(self, i: LedgerInput, record: PaymentRecord) -> sm.Decision:
        """An event that names another channel than its payment's changes nothing. It is rejected
        here, with an audit entry on the payment, rather than dead-lettered: it is not unreadable
        (replaying it would only be rejected again) but a sign of a misrouted or forged event
        (a callback posted under channel A for channel B's payment, a producer's bug), and the
        operator looking into that payment finds it in the payment's own audit trail, next to the
        facts it tried to contradict; the metric and the log line make it alertable."""
        self.counts[(CHANNEL_MISMATCHES, i.source)] += 1
        # Both foreign: a request produced straight to the topic chose its payment's channel id too.
        claimed, owner = untrusted(i.claimed_channel, 64), untrusted(record.channel_id, 64)
        log.warning("%s names channel %s, its payment is %s's: rejected", type(i.fact).__name__, claimed, owner,
                    extra={"payment_id": i.payment_id})
        return sm.rejected(f"event for channel {claimed}, but the payment belongs to {owner}")

    async def _record(self, i: LedgerInput, decision: sm.Decision) -> sm.Decision:
        record = self.payments.get(i.payment_id)
        self.counts[(VERDICTS, type(i.fact).__name__, decision.verdict.value)] += 1
        if decision.refusal:
            refused = OPERATOR_REFUSED if isinstance(i.fact, sm.OperatorInstruction) else REFUSED
            self.counts[(refused, decision.refusal)] += 1
        self._audit(i, decision, record)
        # A payment whose payer's data was scrubbed keeps no new copy of it: a callback arriving after the
        # retention or an erasure is decided and audited, its body not kept (services/privacy/scrub.py).
        scrubbed = record is not None and record.phone.startswith(f"{PHONE}_")
        if isinstance(i.fact, sm.CallbackReceived) and decision.verdict is not sm.Verdict.PARKED and not scrubbed:
            self._keep_callback(i, decision)
        if decision.verdict is sm.Verdict.PARKED:
            self.parked.setdefault(i.payment_id, []).append(i)  # what it waits for may follow in this batch
        elif decision.verdict is sm.Verdict.APPLIED:
            await self._persist(i, record, decision)
            if self.parked.get(i.payment_id):  # a waiting fact may apply now (its payment or push result came)
                await self._unpark(i.payment_id)
        return decision

    async def _read_owners(self, receipts: list[str], checkouts: list[str]) -> None:
        """Reads who holds these receipts and CheckoutRequestIDs unless the batch read them already."""
        receipts = [r for r in receipts if r not in self.receipts_read]
        checkouts = [c for c in checkouts if c not in self.checkouts_read]
        if receipts or checkouts:  # a fact un-parked from an earlier batch: not in the batch's first read
            held, pushed = await self.uow.owners(receipts, checkouts)
            self.receipts = {**held, **self.receipts}  # this batch's own changes win
            self.checkouts = {**pushed, **self.checkouts}
            self.receipts_read.update(receipts)
            self.checkouts_read.update(checkouts)

    async def _snapshot(self, record: PaymentRecord | None, fact: sm.Fact) -> sm.Payment | None:
        if record is None:
            return None
        confirm = (isinstance(fact, sm.CallbackReceived) and fact.callback.succeeded
                   and record.state in sm.OPEN and await self.uow.confirm_by_query(record.channel_id))
        payment = snapshot(record, confirm_by_query=bool(confirm),
                           callbacks_closed=deadlines.callbacks_closed(record, self.now, self.settings))
        return self._as_before_scrub(payment, fact)

    def _as_before_scrub(self, payment: sm.Payment, fact: sm.Fact) -> sm.Payment:
        """A payment whose payer's data was scrubbed keeps its push's CheckoutRequestID as a pseudonym
        (services/privacy/scrub.py). A callback naming the id whose pseudonym it is, is about that push:
        the domain sees the id it would have seen, so that a late success after an erased cancel still
        goes to Review with its receipt (money moved) instead of reading as a mismatch."""
        stored = payment.checkout_request_id
        if (isinstance(fact, sm.CallbackReceived) and stored is not None and stored.startswith(f"{CHECKOUT}_")
                and self.service.pseudonyms.checkout(fact.callback.checkout_request_id) == stored):
            return dataclasses.replace(payment, checkout_request_id=fact.callback.checkout_request_id)
        return payment

    async def _persist(self, i: LedgerInput, record: PaymentRecord | None, d: sm.Decision) -> None:
        previous = record.state if record else None
        if record is None:
            assert i.request is not None, "only a payment request creates a payment (decide parks the rest)"
            record = new_record(i.request, self.now)
        after = record.with_changes(d.new_state, d.changes,
                                    deadlines.scheduled(previous, record, d, self.now, self.settings))
        if after.review_reason != record.review_reason or after.contradiction != record.contradiction:
            # Texts kept on the row quote what the facts said (CheckoutRequestIDs, Daraja's words): kept
            # as the chain keeps them, so that a scrub of the payer's data has nothing left to find there.
            after = dataclasses.replace(after, review_reason=self._kept(after.review_reason),
                                        contradiction=self._kept(after.contradiction))
        if d.alert:
            self.counts[(ALERTS, d.alert)] += 1
            said = self._kept(d.reason or "")  # Daraja's texts may quote a payer's number, its ids end in one
            if d.new_state == PaymentState.REVIEW:
                log.warning("payment sent to review: %s", said, extra={"payment_id": i.payment_id})
            else:
                log.warning("contradiction recorded, state kept: %s", said, extra={"payment_id": i.payment_id})
        if d.query:
            after = self._ask_query(after, d.query, d.query_reason)
        self._set(after)
        if d.new_state and d.new_state != previous:
            self.counts[(TRANSITIONS, str(d.new_state))] += 1
            # The chain and the history hold no payer data (docs: schemas/README.md): a number an
            # operator or Daraja wrote into a reason is masked before it is written, never after.
            history_reason = self._kept(d.reason)
            self.writes.history.append((i.payment_id, d.new_state, previous, history_reason, i.event_id))
            resolved_by = i.fact.actor if isinstance(i.fact, sm.OperatorResolution) else None
            keys = await self.uow.analytics_metadata_keys(after.channel_id) if after.metadata else frozenset()
            self.writes.outbox.append(self.service.status_event(after, previous, d.reason, resolved_by, keys))

    def _set(self, record: PaymentRecord) -> None:
        self.payments[record.payment_id] = record
        self.dirty.add(record.payment_id)
        for column in RECEIPT_COLUMNS:
            if value := getattr(record, column):
                self.receipts[value] = record.payment_id
        for column in CHECKOUT_COLUMNS:
            if value := getattr(record, column):
                self.checkouts[value] = record.payment_id

    def _ask_query(self, record: PaymentRecord, checkout_request_id: str, reason: str) -> PaymentRecord:
        """At once, through the outbox; the reconciler asks again with back-off if it stays unanswered
        (a payment in Review is not reconciled: only its attempts are counted)."""
        asked = deadlines.query_asked(record, self.now, self.settings)
        if record.state == PaymentState.REVIEW:
            asked = asked.without("next_query_at")
        record = record.with_changes(None, asked)
        self.counts[(OPERATOR_QUERIES if reason == "OPERATOR" else CONFIRMATIONS,)] += 1
        self.writes.outbox.append(self.service.query_request(record, checkout_request_id, record.query_attempts,
                                                             reason))
        return record

    async def reconcile(self, record: PaymentRecord) -> None:
        """A due payment: at its review deadline the timer's fact goes through the same path as any
        other (decide, audit, history, status event); before it, an STK query with back-off."""
        step = deadlines.reconciliation_step(record, self.now, self.settings)
        if isinstance(step, deadlines.Expire):
            expired = LedgerInput(new_id(), RECONCILIATION, record.payment_id,
                                  sm.ReconciliationExpired(step.age_seconds), claimed_channel=None)
            await self._record(expired, await self._decide(expired))
            return
        self._set(record.with_changes(None, step.changes))
        if isinstance(step, deadlines.AskQuery):
            self.counts[(QUERIES,)] += 1
            self.writes.outbox.append(self.service.query_request(record, step.checkout_request_id, step.attempt,
                                                                 step.reason))

    async def _unpark(self, payment_id: str) -> None:
        """Decides the payment's waiting facts again, oldest first; those still waiting stay parked."""
        for early in self.parked.pop(payment_id, []):
            try:
                decision = await self._decide(early)
            except Exception as exc:
                # A fact an earlier version parked that this one cannot decide: blaming the fact being
                # applied would dead-letter it, and with it its payment's progress. The fact stays
                # parked, where the parked-fact gauges show it to an operator.
                log.error("parked fact %s cannot be applied, left parked: %s", early.event_id,
                          type(exc).__name__, extra={"payment_id": payment_id})
                self.parked.setdefault(payment_id, []).append(early)
                continue
            await self._record(early, decision)

    def _audit(self, i: LedgerInput, d: sm.Decision, record: PaymentRecord | None) -> None:
        before = record.state if record else None
        entry = {"payment_id": i.payment_id, "event_id": i.event_id, "fact": type(i.fact).__name__,
                 "verdict": d.verdict.value, "from_state": before, "to_state": d.new_state or before,
                 "detail": self._kept(d.detail or d.reason or ""), "at": self.now}
        if isinstance(i.fact, sm.OperatorInstruction) and i.fact.actor:
            entry["actor"] = self._kept(i.fact.actor)  # who gave it; the other facts' entries have none
        self.writes.audit.append(entry)

    def _kept(self, text: str | None) -> str | None:
        """A text as the audit chain and the history keep it, for ever: with no payer data, so that
        erasing a payer never has to touch them. Numbers are masked, and CheckoutRequestIDs become
        their pseudonyms, since Daraja's end in the payer's number (the payment row keeps the id
        itself until its payer's data is scrubbed: services/privacy/scrub.py)."""
        return _masked(text, None, self.service.pseudonyms)

    def _keep_callback(self, i: LedgerInput, d: sm.Decision) -> None:
        """The callback as received, for the review desk, with what the ledger decided of it. A
        decided callback was read as UTF-8 JSON of at most 64 KiB (services/ledger/callbacks.py); its
        text is still made storable here rather than trusted to stay so: undecodable bytes and NUL
        (which PostgreSQL's text refuses) become U+FFFD, and it is cut to the column's bound."""
        body = i.callback_body or b""
        text = body.decode("utf-8", "replace").replace("\x00", "\ufffd")
        kept = text.encode()[:CALLBACK_BODY_MAX_BYTES].decode("utf-8", "ignore")  # never half a character
        self.callback_bodies[i.event_id] = (i.event_id, i.payment_id, self.now, d.verdict.value, kept)

    async def flush(self) -> None:
        waiting = {i.event_id: i for inputs in self.parked.values() for i in inputs}
        self.writes.unparked = sorted(self.parked_before - waiting.keys())
        self.writes.parked = [(event_id, i.payment_id, i.source, self._bytes_of(i))
                              for event_id, i in waiting.items() if event_id not in self.parked_before]
        self.writes.payments = [p for pid in sorted(self.dirty) if (p := self.payments[pid]) is not None]
        self.writes.callback_bodies = list(self.callback_bodies.values())
        self.outbox_rows = await self.uow.write(self.writes)

    @staticmethod
    def _bytes_of(i: LedgerInput) -> bytes:
        if i.raw is None:  # the reconciler's facts never wait; an event always has its bytes
            raise ValueError(f"{type(i.fact).__name__} {i.event_id} must wait for its payment but has no bytes")
        return i.raw


def _receipts(inputs: Iterable[LedgerInput]) -> list[str]:
    receipts = []
    for i in inputs:
        if isinstance(i.fact, sm.CallbackReceived) and i.fact.callback.receipt:
            receipts.append(i.fact.callback.receipt)
        elif isinstance(i.fact, sm.OperatorResolution) and (settling := _receipt_to_check(i.fact)):
            receipts.append(settling)
    return receipts


def _receipt_to_check(fact: sm.OperatorResolution) -> str | None:
    """The receipt whose owners a settlement needs, if it has M-Pesa's form: another one is rejected
    by decide() without them, and looking it up could fail the batch (a NUL byte, which no text
    parameter can hold, in a command produced straight to the topic)."""
    return fact.receipt if fact.receipt is not None and sm.RECEIPT.fullmatch(fact.receipt) else None


def _checkout_ids(inputs: Iterable[LedgerInput]) -> list[str]:
    return [i.fact.callback.checkout_request_id if isinstance(i.fact, sm.CallbackReceived)
            else i.fact.checkout_request_id
            for i in inputs if isinstance(i.fact, (sm.CallbackReceived, sm.PushAccepted))]



def _masked(text: str | None, limit: int | None = None, pseudonyms: Pseudonyms | None = None) -> str | None:
    """Free text bound for analytics: payers' numbers masked, CheckoutRequestIDs written into it
    replaced by their pseudonym, any other run of nine or more digits cut to its last three (an id of
    another form may end in an MSISDN too, where mask_phones_in, which leaves long digit runs such as
    timestamps alone, would not see it), then cut to `limit` (after masking, so a cut never leaves a
    number's head in clear)."""
    if text is None:
        return None
    if fewer_digits_than(NUMBER_DIGITS_MIN, text) and _CHECKOUT_PREFIX not in text:
        return text[:limit] if limit is not None else text  # nothing below could change it
    masked = text  # the ids first: their pseudonym is of the id as Daraja wrote it, number and all
    if pseudonyms is not None:
        masked = _CHECKOUT_IN_TEXT.sub(lambda m: pseudonyms.checkout(m.group(0)), masked)
    masked = mask_phones_in(masked)
    masked = outside_uuids(masked, lambda piece: _LONG_DIGITS.sub(
        lambda m: "*" * (len(m.group(0)) - 3) + m.group(0)[-3:], piece))
    return masked[:limit] if limit is not None else masked


def _checkout_ref(checkout_request_id: str | None, pseudonyms: Pseudonyms) -> str | None:
    """The status topic's pseudonym of the push: the same on every event of a payment, also once
    retention or an erasure stored the pseudonym in place of the id (services/privacy/scrub.py)."""
    if checkout_request_id is None or checkout_request_id.startswith(f"{CHECKOUT}_"):
        return checkout_request_id
    return pseudonyms.checkout(checkout_request_id)


_CHECKOUT_PREFIX = "ws_CO_"
_CHECKOUT_IN_TEXT = re.compile(_CHECKOUT_PREFIX + r"[0-9A-Za-z_]+")  # Daraja's form (docs/daraja.md §2)
_LONG_DIGITS = re.compile(r"[0-9]{9,}")
