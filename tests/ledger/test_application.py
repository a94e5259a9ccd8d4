"""The ledger's application service through the in-memory unit of work and a fake clock: no broker,
no database. Both entry points: the facts the consumer brings, and the reconciler's timer."""
from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta

import pytest
from hypothesis import given, settings, strategies as st

from services.common import payment
from services.common.avro import Codec, open_codec
from services.common.kafka import ConsumedEvent, new_event_fields
from services.common.payment import mask_phones_in
from services.common.topics import (
    ACCESS,
    CALLBACK_RAW,
    OPERATOR_COMMAND,
    PAYMENT_REQUESTED,
    PAYMENT_STATUS,
    STK_PUSH_RESULT,
    STK_QUERY_REQUESTED,
    Topic,
)
from services.ledger import application
from services.ledger.application import LedgerService
from services.ledger.deadlines import LedgerSettings
from services.ledger.facts import input_of
from services.ledger.service import DEFAULTS, Ledger
from tests.ledger.callbacks import failure, success
from tests.ledger.fakes import PSEUDONYMS, InMemoryLedgerStore, InMemoryUnitOfWork
from tests.ledger.test_ledger_db import accepted, callback, requested


def refused(channel, payment_id, code="500.001.1001", message="Merchant does not exist"):
    return ConsumedEvent(STK_PUSH_RESULT.name, 0, 0, channel.encode(), "stk_push_result", {
        **new_event_fields(channel, payment_id), "outcome": "REFUSED", "merchant_request_id": None,
        "checkout_request_id": None, "error_code": code, "error_message": message, "attempts": 4})


class Setup:
    def __init__(self, clock, settings: LedgerSettings = DEFAULTS):
        self.store, self.clock, self.codec = InMemoryLedgerStore(), clock, Codec()
        self.service = LedgerService(self.store.unit_of_work, self.codec, settings, clock, pseudonyms=PSEUDONYMS)
        self.channel, self.pid = f"ch-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
        self.checkout, self.receipt = f"ws_CO_{uuid.uuid4().hex}", uuid.uuid4().hex[:10].upper()

    async def apply(self, *events: ConsumedEvent, as_dated: bool = False) -> set[str]:
        for e in events:  # the request's time is the fake clock's, unless the test dated it
            if e.schema == "payment_requested" and not as_dated:
                e.value["occurred_at"] = self.clock.now()
        return await self.service.apply([
            input_of(e.topic, e.schema, e.value, self.codec.encode(Topic(e.topic, e.schema), e.value)) for e in events])

    @property
    def payment(self):
        return self.store.tables.payments[self.pid]

    def outbox(self, topic):
        return [self.codec.decode(payload)[1] for _, t, _, payload in self.store.tables.outbox if t == topic.name]

    async def reconcile_until_final(self, step_s: float = 1.0, limit_s: float = 3600) -> None:
        """The reconciler's timer, ticking every step_s on the fake clock."""
        for _ in range(int(limit_s / step_s)):
            if self.payment.state not in ("Requested", "Pending"):
                return
            self.clock.advance(step_s)
            due = self.payment.next_query_at is not None and self.payment.next_query_at <= self.clock.now()
            assert await self.service.reconcile([self.pid]) == int(due)


@pytest.fixture
def setup(clock):
    return Setup(clock)


async def test_a_requested_pushed_and_paid_payment_settles_and_a_redelivery_changes_nothing(setup):
    s = setup
    facts = [requested(s.channel, s.pid), accepted(s.channel, s.pid, s.checkout),
             callback(s.channel, s.pid, success(s.checkout, receipt=s.receipt))]
    assert len(await s.apply(*facts)) == 3
    assert (s.payment.state, s.payment.mpesa_receipt) == ("Settled", s.receipt)
    assert await s.apply(*facts) == set()
    assert [h[1] for h in s.store.tables.history] == ["Requested", "Pending", "Settled"]
    assert [e["status"] for e in s.outbox(PAYMENT_STATUS)] == ["Requested", "Pending", "Settled"]


async def test_a_callback_before_its_payment_waits_parked_and_then_settles(setup):
    s = setup
    await s.apply(callback(s.channel, s.pid, success(s.checkout, receipt=s.receipt)))
    assert s.pid not in s.store.tables.payments and len(s.store.tables.parked) == 1
    await s.apply(requested(s.channel, s.pid))
    await s.apply(accepted(s.channel, s.pid, s.checkout))
    assert (s.payment.state, s.payment.mpesa_receipt, s.store.tables.parked) == ("Settled", s.receipt, {})


async def test_a_success_after_a_cancel_keeps_its_receipt_in_the_row_and_in_the_status_event(setup):
    s = setup
    await s.apply(requested(s.channel, s.pid), accepted(s.channel, s.pid, s.checkout),
                  callback(s.channel, s.pid, failure(s.checkout, 1032)))
    await s.apply(callback(s.channel, s.pid, success(s.checkout, receipt=s.receipt)))
    assert (s.payment.state, s.payment.late_receipt, s.payment.mpesa_receipt) == ("Review", s.receipt, None)
    last = s.outbox(PAYMENT_STATUS)[-1]
    assert (last["status"], last["previous_status"], last["late_mpesa_receipt"]) == ("Review", "Cancelled", s.receipt)
    assert last["schema_version"] == 4


async def test_a_receipt_another_payment_holds_sends_the_second_to_review(setup):
    s, other = setup, str(uuid.uuid4())
    await s.apply(requested(s.channel, s.pid), requested(s.channel, other), accepted(s.channel, s.pid, s.checkout),
                  accepted(s.channel, other, s.checkout + "b"),
                  callback(s.channel, s.pid, success(s.checkout, receipt=s.receipt)))
    await s.apply(callback(s.channel, other, success(s.checkout + "b", receipt=s.receipt)))
    assert s.store.tables.payments[other].state == "Review"
    assert s.store.tables.payments[other].review_alert == "receipt_reused"


async def test_a_success_after_a_cancel_whose_payers_data_was_erased_still_goes_to_review_with_its_receipt(setup):
    s = setup
    await s.apply(requested(s.channel, s.pid), accepted(s.channel, s.pid, s.checkout),
                  callback(s.channel, s.pid, failure(s.checkout, 1032)))
    # As services/privacy/scrub.py leaves it: a random phone pseudonym, the push's id as its pseudonym.
    s.store.tables.payments[s.pid] = dataclasses.replace(
        s.payment, phone="ph_" + "0" * 32, checkout_request_id=PSEUDONYMS.checkout(s.checkout))
    await s.apply(callback(s.channel, s.pid, success(s.checkout, receipt=s.receipt)))
    assert (s.payment.state, s.payment.late_receipt) == ("Review", s.receipt)
    assert s.payment.checkout_request_id == PSEUDONYMS.checkout(s.checkout)  # not written back in clear
    last = s.outbox(PAYMENT_STATUS)[-1]
    assert last["checkout_ref"] == PSEUDONYMS.checkout(s.checkout)  # the same as before the erasure


async def test_the_reasons_kept_on_the_row_quote_checkout_ids_only_as_their_pseudonyms(setup):
    s = setup
    forged = "ws_CO_30112026101010123712345678"  # Daraja's form: it ends in a payer's number
    await s.apply(requested(s.channel, s.pid), accepted(s.channel, s.pid, s.checkout))
    await s.apply(callback(s.channel, s.pid, failure(forged, 1032)))
    assert s.payment.state == "Review" and PSEUDONYMS.checkout(forged) in s.payment.review_reason
    assert "712345678" not in s.payment.review_reason
    assert not [e for e in s.store.tables.audit if "712345678" in e["detail"]]


@pytest.mark.parametrize("review_after_s, push_after_s", [(300, 200), (240, 5), (900, 600)])
async def test_the_review_deadline_counts_from_the_request_whenever_the_push_result_came(
        clock, review_after_s, push_after_s):
    """Issue #19: a payment reached Review 370 s after its request with 300 s set (its deadline
    counted from the unknown push outcome), another 353 s after with 240 s (its queries backed off
    past the deadline). The reconciler ticks each second; Review must come at the deadline."""
    s = Setup(clock, LedgerSettings(review_after=timedelta(seconds=review_after_s)))
    requested_at = clock.now()
    await s.apply(requested(s.channel, s.pid))
    clock.advance(push_after_s)
    await s.apply(accepted(s.channel, s.pid, s.checkout))
    await s.reconcile_until_final()
    assert s.payment.state == "Review"
    assert s.payment.next_query_at is None and clock.now() - requested_at == timedelta(seconds=review_after_s)
    assert all(q["reason"] == "PENDING_TOO_LONG" for q in s.outbox(STK_QUERY_REQUESTED))


async def test_an_unknown_push_outcome_recorded_late_is_reviewed_at_the_requests_deadline(clock):
    s = Setup(clock, LedgerSettings(review_after=timedelta(seconds=300)))
    requested_at = clock.now()
    await s.apply(requested(s.channel, s.pid))
    clock.advance(200)
    await s.apply(ConsumedEvent(STK_PUSH_RESULT.name, 0, 0, None, "stk_push_result", {
        **new_event_fields(s.channel, s.pid), "outcome": "OUTCOME_UNKNOWN", "merchant_request_id": None,
        "checkout_request_id": None, "error_code": None, "error_message": "read timeout", "attempts": 1}))
    assert s.payment.next_query_at == requested_at + timedelta(seconds=290)
    await s.reconcile_until_final()
    assert (s.payment.state, clock.now() - requested_at) == ("Review", timedelta(seconds=300))


async def test_a_review_the_deadline_alone_caused_ends_failed_when_daraja_refuses_the_push(setup):
    s = setup
    await s.apply(requested(s.channel, s.pid))
    await s.reconcile_until_final(step_s=60)  # the push is being retried: no result until past the deadline
    assert (s.payment.state, s.payment.review_alert) == ("Review", "unresolved")
    await s.apply(refused(s.channel, s.pid))
    assert (s.payment.state, s.payment.result_code, s.payment.final_at) == ("Failed", "500.001.1001", s.clock.now())
    audit = [(a["fact"], a["verdict"], a["from_state"], a["to_state"]) for a in s.store.tables.audit]
    assert audit[-2:] == [("ReconciliationExpired", "applied", "Requested", "Review"),
                          ("PushRefused", "applied", "Review", "Failed")]
    last = s.outbox(PAYMENT_STATUS)[-1]
    assert (last["status"], last["previous_status"]) == ("Failed", "Review") and "never prompted" in last["reason"]


async def test_a_review_after_an_accepted_push_stays_review_when_a_refusal_arrives(setup):
    s = setup
    await s.apply(requested(s.channel, s.pid), accepted(s.channel, s.pid, s.checkout))
    await s.reconcile_until_final(step_s=60)
    assert s.payment.state == "Review"
    await s.apply(refused(s.channel, s.pid))
    assert s.payment.state == "Review"
    assert s.store.tables.audit[-1]["verdict"] == "duplicate"


async def test_a_payment_reconciled_by_another_ledger_meanwhile_is_left_alone(setup):
    s = setup
    await s.apply(requested(s.channel, s.pid), accepted(s.channel, s.pid, s.checkout))
    assert await s.service.reconcile([s.pid]) == 0  # not due yet: nothing asked, nothing moved
    assert s.outbox(STK_QUERY_REQUESTED) == [] and s.payment.query_attempts == 0


async def test_the_kafka_adapter_refuses_an_event_that_is_no_ledger_input_and_applies_the_rest(clock):
    store = InMemoryLedgerStore()
    ledger = Ledger(None, Codec(), clock=clock, unit_of_work=store.unit_of_work, pseudonyms=PSEUDONYMS)
    channel, pid = f"ch-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    bad = requested(channel, str(uuid.uuid4()))
    del bad.value["payment_id"]
    rejections = await ledger.handle_batch([bad, requested(channel, pid)])
    assert [(r.event, type(r.error).__name__) for r in rejections] == [(bad, "NotAFact")]
    assert store.tables.payments[pid].state == "Requested"
    assert bad.value["event_id"] in store.tables.processed  # refused once: a redelivery is not refused again
    assert await ledger.handle_batch([bad]) == []


async def test_a_request_dated_in_the_future_is_reviewed_at_the_deadline_from_when_it_was_recorded(setup):
    """A producer's clock ahead (or a forgery produced straight to the topic) must not put the
    review off: the deadline counts from the request, but never from a time still to come."""
    s = setup
    future = requested(s.channel, s.pid)
    future.value["occurred_at"] = s.clock.now() + timedelta(days=365)
    recorded_at = s.clock.now()
    await s.apply(future, as_dated=True)
    assert s.payment.requested_at == recorded_at
    await s.reconcile_until_final(step_s=10)
    assert (s.payment.state, s.clock.now() - recorded_at) == ("Review", s.service.settings.review_after)


async def test_bootstrap_builds_both_entry_points_on_one_application_service(clock):
    from services.ledger import bootstrap
    store = InMemoryLedgerStore()
    parts = bootstrap.build(None, Codec(), LedgerSettings(), clock=clock, unit_of_work=store.unit_of_work,
                            pseudonyms=PSEUDONYMS)
    assert parts.consumer.service is parts.service is parts.reconciler.service
    channel, pid = f"ch-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    assert await parts.consumer.handle_batch([requested(channel, pid)]) == []
    assert store.tables.payments[pid].next_query_at == store.tables.payments[pid].requested_at + \
        parts.service.settings.review_after


async def test_a_batch_reads_the_owners_of_the_facts_it_may_unpark_in_one_go(setup, monkeypatch):
    """A backlog parks most callbacks until their payment comes (bench/ledger_bench.py): reading the
    owners of each one's receipt when it is un-parked cost a database round trip per callback."""
    s, payments = setup, [(str(uuid.uuid4()), f"ws_CO_{uuid.uuid4().hex}") for _ in range(5)]
    await s.apply(*(callback(s.channel, pid, success(co, receipt=uuid.uuid4().hex[:10].upper()))
                    for pid, co in payments))
    reads = []
    owners = InMemoryUnitOfWork.owners

    async def counted(self, receipts, checkout_ids):
        reads.append((receipts, checkout_ids))
        return await owners(self, receipts, checkout_ids)

    monkeypatch.setattr(InMemoryUnitOfWork, "owners", counted)
    await s.apply(*(e for pid, co in payments for e in (requested(s.channel, pid), accepted(s.channel, pid, co))))
    assert all(s.store.tables.payments[pid].state == "Settled" for pid, _ in payments)
    assert len(reads) == 1 + 1  # the open's own read, and one for the five parked callbacks


async def test_a_payment_reviewed_at_its_deadline_while_its_callback_waited_still_settles_on_it(setup):
    """The ledger was behind (an outage): the request, 20 minutes old, and its push result are
    applied, the reconciler's next tick finds the deadline passed, and only then does the success
    callback, queued all along, come through. The proof that would have settled the payment an
    instant earlier settles it now."""
    s = setup
    request = requested(s.channel, s.pid)
    request.value["occurred_at"] = s.clock.now() - timedelta(minutes=20)
    await s.apply(request, accepted(s.channel, s.pid, s.checkout), as_dated=True)
    s.clock.advance(1)
    assert await s.service.reconcile([s.pid]) == 1
    assert (s.payment.state, s.payment.review_alert) == ("Review", "unresolved")
    await s.apply(callback(s.channel, s.pid, success(s.checkout, receipt=s.receipt)))
    assert (s.payment.state, s.payment.mpesa_receipt) == ("Settled", s.receipt)
    last = s.outbox(PAYMENT_STATUS)[-1]
    assert (last["status"], last["previous_status"]) == ("Settled", "Review")
    assert last["reason"].startswith("after the review deadline")


async def test_a_restarted_ledger_reads_a_fact_parked_in_the_confluent_framing(clock, codec, infra):
    # A callback parked by one ledger process carries a registry id the next process has not seen:
    # the batch that may un-park it learns the id first, or the callback would stay parked for good.
    store = InMemoryLedgerStore()
    channel, pid = f"ch-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    checkout, receipt = f"ws_CO_{uuid.uuid4().hex}", uuid.uuid4().hex[:10].upper()
    early = callback(channel, pid, success(checkout, receipt=receipt))
    first = LedgerService(store.unit_of_work, codec, DEFAULTS, clock, pseudonyms=PSEUDONYMS)
    await first.apply([input_of(early.topic, early.schema, early.value, codec.encode(CALLBACK_RAW, early.value))])
    assert len(store.tables.parked) == 1

    restarted_codec = await open_codec(infra["SCHEMA_REGISTRY_URL"], ACCESS["ledger"].writes)
    restarted = LedgerService(store.unit_of_work, restarted_codec, DEFAULTS, clock, pseudonyms=PSEUDONYMS)
    try:
        for fact, topic in ((requested(channel, pid), PAYMENT_REQUESTED),
                            (accepted(channel, pid, checkout), STK_PUSH_RESULT)):
            fact.value["occurred_at"] = clock.now()
            await restarted.apply([input_of(fact.topic, fact.schema, fact.value, codec.encode(topic, fact.value))])
    finally:
        await restarted_codec.close()

    payment = store.tables.payments[pid]
    assert (payment.state, payment.mpesa_receipt, store.tables.parked) == ("Settled", receipt, {})


async def test_a_callback_is_kept_with_its_verdict_once_decided_and_not_while_it_waits(setup):
    s = setup
    body = success(s.checkout, receipt=s.receipt)
    early = callback(s.channel, s.pid, body)
    await s.apply(early)
    assert s.store.tables.callback_bodies == {}  # parked: nothing decided yet
    await s.apply(requested(s.channel, s.pid), accepted(s.channel, s.pid, s.checkout))
    event_id = early.value["event_id"]
    assert s.store.tables.callback_bodies == {event_id: (event_id, s.pid, s.clock.now(), "applied", body.decode())}


async def test_an_operator_query_of_a_payment_in_review_counts_the_attempt_and_schedules_nothing(setup):
    s = setup
    await s.apply(requested(s.channel, s.pid), accepted(s.channel, s.pid, s.checkout),
                  callback(s.channel, s.pid, success(s.checkout, amount=99, receipt=s.receipt)))
    assert (s.payment.state, s.payment.next_query_at, s.payment.query_attempts) == ("Review", None, 0)
    query = ConsumedEvent(OPERATOR_COMMAND.name, 0, 0, s.channel.encode(), "operator_command", {
        **new_event_fields(s.channel, s.pid), "action": "QUERY", "actor": "wanjiru", "reason": "payer called",
        "mpesa_receipt": None})
    await s.apply(query)
    assert (s.payment.state, s.payment.next_query_at, s.payment.query_attempts) == ("Review", None, 1)
    assert [(q["reason"], q["attempt"]) for q in s.outbox(STK_QUERY_REQUESTED)] == [("OPERATOR", 1)]
    assert s.store.tables.audit[-1]["actor"] == "wanjiru"


async def test_the_status_event_carries_no_payers_number_nor_a_clear_checkout_id_and_only_allowed_metadata(setup):
    s = setup
    s.store.tables.metadata_keys[s.channel] = frozenset({"cart"})
    checkout = "ws_CO_30112026101500123712345678"  # Daraja's current form: ends in the payer's number
    await s.apply(requested(s.channel, s.pid, order_reference=f"call 0712 345 678 re {checkout}",
                            metadata={"cart": "+254712345678 42", "note": "payer 0712345678"}),
                  accepted(s.channel, s.pid, checkout),
                  callback(s.channel, s.pid, failure(checkout, 1032)))
    for event in s.outbox(PAYMENT_STATUS):
        text = repr(event)
        assert "712345678" not in text and "345678" not in text and checkout not in text, event
        assert event["metadata"] == {"cart": "*********678 42"} and event["phone_masked"] == "*********678"
        assert event["order_reference"] == f"call *********678 re {PSEUDONYMS.checkout(checkout)}"
    assert [e["checkout_ref"] for e in s.outbox(PAYMENT_STATUS)][1:] == [PSEUDONYMS.checkout(checkout)] * 2


async def test_a_channel_that_allow_lists_no_key_gets_no_metadata_on_the_status_topic(setup):
    s = setup
    await s.apply(requested(s.channel, s.pid, metadata={"cart": "42"}))
    assert [e["metadata"] for e in s.outbox(PAYMENT_STATUS)] == [{}]


async def test_a_long_reason_is_cut_and_payers_numbers_in_it_are_masked_in_the_event_history_and_audit(setup):
    s = setup
    message = "Invalid PhoneNumber 0712345678 " + "x" * 400
    await s.apply(requested(s.channel, s.pid), refused(s.channel, s.pid, "400.002.02", message))
    reason = s.outbox(PAYMENT_STATUS)[-1]["reason"]
    assert len(reason) <= application.STATUS_REASON_MAX and "12345678" not in reason and "*********678" in reason
    history_reasons = [r for *_, r, _ in s.store.tables.history if r]
    audit_details = [a["detail"] for a in s.store.tables.audit]
    assert history_reasons and audit_details
    assert not any("12345678" in text for text in history_reasons + audit_details)
    assert any("*********678" in text for text in history_reasons)


def test_a_payment_id_quoted_in_a_reason_stays_whole_while_long_digit_runs_are_cut():
    # "f085285276bd" holds nine digits in a row: cut as an id ending in a number would be, the audit
    # entry could no longer name the payment it refers to (CI saw it).
    other = "f9e0695f-ca0b-4747-88e8-f085285276bd"
    masked = application._masked(f"receipt 56E386BAE0 already proves payment {other}; ref 20261130123456789")
    assert masked == f"receipt 56E386BAE0 already proves payment {other}; ref **************789"


@pytest.mark.parametrize("text", ["Pay 254712345678-aaaa-bbbb-cccc-dddddddddddd",
                                  "Pay 0712345678-aaaa-bbbb-cccc-dddddddddddd",
                                  "Pay 0712345678aaaa-bbbb-cccc-dddd-eeeeeeeeeeee"])
def test_a_number_glued_to_a_uuid_like_tail_is_still_masked(text):
    assert "2345678" not in (application._masked(text) or "")


# Texts rich in what the masking patterns look for: digits, their separators, a country code's "+",
# letters around them, a CheckoutRequestID's prefix and pieces of UUIDs.
_MASKING_ALPHABET = st.sampled_from(list("0123456789 -.()+abcfxINV_") + ["254", "07", "ws_CO_", "-aaaa-"])


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(_MASKING_ALPHABET, max_size=40).map("".join), st.sampled_from([None, 12]))
def test_the_masking_shortcut_gives_what_the_full_masking_gives(text, limit):
    """_masked and mask_phones_in return a text with fewer than nine digits (and, for _masked, no
    CheckoutRequestID) without running their patterns: every pattern needs nine digits."""
    shortcut = (application._masked(text, limit, PSEUDONYMS), mask_phones_in(text))
    with pytest.MonkeyPatch.context() as patch:  # the full masking, every pattern run
        patch.setattr(application, "fewer_digits_than", lambda count, text: False)
        patch.setattr(payment, "fewer_digits_than", lambda count, text: False)
        full = (application._masked(text, limit, PSEUDONYMS), mask_phones_in(text))
    assert shortcut == full
