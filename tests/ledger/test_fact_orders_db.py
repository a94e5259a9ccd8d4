"""Hostile orders: the facts of one payment, delivered in any order, split into any batches, with
redeliveries, must end where the canonical order ends, each fact decided (audited as applied,
duplicate or rejected) exactly once and no parked row left behind."""
from __future__ import annotations

import base64
import collections
import os
import uuid

import psycopg.errors
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from services.common.topics import CALLBACK_RAW
from services.ledger.service import Ledger, _is_the_events_fault
from tests.ledger.callbacks import failure, success
from tests.ledger.test_callback_proof_db import confirming_channel, push_unknown, query_result
from tests.ledger.test_ledger_db import accepted, callback, requested


def _ids():
    u = uuid.uuid4().hex
    return f"ch-{u[:12]}", str(uuid.uuid4()), f"ws_CO_{u}", u[:10].upper()


# name -> (build(channel, pid, checkout, receipt) -> facts in canonical order, facts that must come last,
#          expected (state, receipt or None), confirm-by-query channel)
SCENARIOS = {
    "accepted_success": (lambda ch, p, co, r: [requested(ch, p), accepted(ch, p, co),
                                                callback(ch, p, success(co, receipt=r))], 0, ("Settled", True), False),
    "accepted_failure": (lambda ch, p, co, r: [requested(ch, p), accepted(ch, p, co),
                                                callback(ch, p, failure(co, 1032))], 0, ("Cancelled", False), False),
    "unknown_success_query": (lambda ch, p, co, r: [requested(ch, p), push_unknown(ch, p),
                                                     callback(ch, p, success(co, receipt=r)),
                                                     query_result(ch, p, co, "SUCCESS", "0")], 1, ("Settled", True),
                              False),
    "confirming_channel": (lambda ch, p, co, r: [requested(ch, p), accepted(ch, p, co),
                                                  callback(ch, p, success(co, receipt=r)),
                                                  query_result(ch, p, co, "SUCCESS", "0")], 1, ("Settled", True), True),
}


async def _deliver(ledger, batches):
    for batch in batches:
        assert await ledger.handle_batch(batch) == []


async def _facts_of(pool, pid):
    async with pool.connection() as conn:
        state = await (await conn.execute("SELECT state, mpesa_receipt IS NOT NULL FROM payments WHERE payment_id = %s",
                                          (pid,))).fetchone()
        audit = await (await conn.execute("SELECT event_id::text, verdict FROM audit_log WHERE payment_id = %s"
                                          " ORDER BY seq", (pid,))).fetchall()
        parked = (await (await conn.execute("SELECT count(*) FROM parked_facts WHERE payment_id = %s",
                                            (pid,))).fetchone())[0]
        history = await (await conn.execute("SELECT state FROM payment_history WHERE payment_id = %s ORDER BY id",
                                            (pid,))).fetchall()
    return state, audit, parked, [h[0] for h in history]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_any_order_and_batching_of_one_payments_facts_ends_as_the_canonical_order(ledger_pool, pool, codec, data):
    name = data.draw(st.sampled_from(sorted(SCENARIOS)), label="scenario")
    build, last, expected, confirming = SCENARIOS[name]
    channel, pid, checkout, receipt = _ids()
    if confirming:
        await confirming_channel(pool, channel)
    facts = build(channel, pid, checkout, receipt)
    head, tail = facts[:len(facts) - last], facts[len(facts) - last:]
    order = data.draw(st.permutations(head), label="order") + tail
    redelivered = data.draw(st.lists(st.sampled_from(facts), max_size=3), label="redelivered")
    for e in redelivered:  # a redelivery comes at or after its first delivery
        order.insert(data.draw(st.integers(order.index(e), len(order)), label="at"), e)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(order) - 1), max_size=len(order) - 1), label="cuts"))
    batches = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    await _deliver(Ledger(ledger_pool, codec), batches)
    state, audit, parked, history = await _facts_of(pool, pid)
    assert tuple(state) == expected
    assert parked == 0
    decided = [event_id for event_id, verdict in audit if verdict != "parked"]
    assert sorted(decided) == sorted(e.value["event_id"] for e in facts)  # each fact decided exactly once
    assert len(history) == len(set(history)) and history[-1] == expected[0]


async def test_a_parked_push_result_the_database_refuses_does_not_dead_letter_its_payments_request(
        ledger_pool, pool, codec):
    """Payment A's push outcome is unknown; a callback posted to A's URL names CheckoutRequestID X
    and cancels A with X. X is payment B's (B's push result overtook B's request and waits parked).
    When B's request comes, the parked push result is applied beside it and the unique index on
    checkout_request_id refuses the batch: the request, which did nothing wrong, must not be the
    one dead-lettered."""
    ledger = Ledger(ledger_pool, codec)
    channel, a, checkout, _ = _ids()
    b = str(uuid.uuid4())
    await _deliver(ledger, [[requested(channel, a), push_unknown(channel, a)], [accepted(channel, b, checkout)],
                            [callback(channel, a, failure(checkout, 1032))]])
    request_b = requested(channel, b)
    rejections = await ledger.handle_batch([request_b])
    assert [r.event for r in rejections] == []
    state, audit, parked, _ = await _facts_of(pool, b)
    assert tuple(state) == ("Review", False) and parked == 0  # B exists, and the contradiction is visible
    async with pool.connection() as conn:
        reason, = await (await conn.execute("SELECT review_reason FROM payments WHERE payment_id = %s",
                                            (b,))).fetchone()
    assert a in reason


@pytest.mark.parametrize("body", [lambda co, r: success(co, receipt=r), lambda co, r: failure(co, 1032)],
                         ids=["success", "failure"])
async def test_a_callback_naming_a_checkout_id_too_big_for_its_index_is_dead_lettered_not_retried_forever(
        ledger_pool, pool, codec, body):
    """After an unknown push outcome, a callback's CheckoutRequestID is stored (as the candidate, or
    as the payment's). One of a few KiB of incompressible text fits in a callback body but not in a
    btree index entry: PostgreSQL refuses the row with ProgramLimitExceeded. That is the event's
    fault, so it must be dead-lettered; raised as Transient, the consumer retries the batch forever
    and the ledger's partition stalls for every channel on it."""
    ledger = Ledger(ledger_pool, codec)
    channel, pid, _, receipt = _ids()
    await _deliver(ledger, [[requested(channel, pid), push_unknown(channel, pid)]])
    huge = "ws_CO_" + base64.b64encode(os.urandom(4500)).decode()
    hostile = callback(channel, pid, body(huge, receipt))
    rejections = await ledger.handle_batch([hostile])
    assert [r.event for r in rejections] == [hostile]
    state, _, _, _ = await _facts_of(pool, pid)
    assert tuple(state) == ("Requested", False)


def test_a_value_too_big_for_the_database_is_blamed_on_its_event_not_retried_as_an_outage():
    assert _is_the_events_fault(psycopg.errors.ProgramLimitExceeded("index row size 6024 exceeds btree maximum"))
    assert not _is_the_events_fault(psycopg.errors.InsufficientPrivilege("permission denied"))


async def test_a_forged_failure_after_an_unknown_push_outcome_does_not_hide_the_genuine_payment(
        ledger_pool, pool, codec):
    """The push outcome is unknown, so no push result names the accepted CheckoutRequestID. Whoever
    holds the payment's callback URL posts a failure naming a made-up id: the payment is Cancelled
    and keeps the made-up id. The payer's genuine success (its proof complete) then fails the id
    check against the made-up one: only a contradiction, the payment stays Cancelled, and the
    merchant was told Cancelled for a payment that was paid. A success in the same position waits
    for an STK query (docs/callback-proof.md); the failure should not be believed on less."""
    ledger = Ledger(ledger_pool, codec)
    channel, pid, checkout, receipt = _ids()
    await _deliver(ledger, [[requested(channel, pid), push_unknown(channel, pid)],
                            [callback(channel, pid, failure(checkout + "forged", 1032))],
                            [callback(channel, pid, success(checkout, receipt=receipt))]])
    state, _, _, _ = await _facts_of(pool, pid)
    assert state[0] != "Cancelled"  # Settled once a query confirms it, or Review: money moved


async def test_a_second_accepted_push_after_settled_is_recorded_and_the_payment_stays_settled(
        ledger_pool, pool, codec):
    """A worker that re-pushed after a crash (docs: a second push, a second CheckoutRequestID) reports
    it after the first push's success settled the payment. A final state stays final: the second
    push is a contradiction recorded on the payment, not a move of Settled to Review (a status event
    telling the merchant a paid order is in doubt)."""
    ledger = Ledger(ledger_pool, codec)
    channel, pid, checkout, receipt = _ids()
    await _deliver(ledger, [[requested(channel, pid), accepted(channel, pid, checkout),
                             callback(channel, pid, success(checkout, receipt=receipt))],
                            [accepted(channel, pid, checkout + "2")]])
    state, _, _, history = await _facts_of(pool, pid)
    assert tuple(state) == ("Settled", True) and history == ["Requested", "Pending", "Settled"]
    async with pool.connection() as conn:
        contradiction, = await (await conn.execute("SELECT contradiction FROM payments WHERE payment_id = %s",
                                                   (pid,))).fetchone()
    assert "second push" in contradiction


async def test_a_parked_fact_that_cannot_be_applied_any_more_stays_parked_and_blocks_nothing(
        ledger_pool, pool, codec):
    """Rows parked by an earlier version: one that no longer decodes, one whose callback the parser
    now refuses. The push result that un-parks them is applied; both rows stay, for the gauges and an
    operator, and neither is deleted as if it had been applied."""
    ledger = Ledger(ledger_pool, codec)
    channel, pid, checkout, receipt = _ids()
    await _deliver(ledger, [[requested(channel, pid)]])
    refused = callback(channel, pid, b'{"Body": {"stkCallback": {"CheckoutRequestID": "' + b"x" * 200 + b'"}}}')
    async with pool.connection() as conn:
        for payload in (b"\xc3\x01 not avro at all", codec.encode(CALLBACK_RAW, refused.value)):
            await conn.execute("INSERT INTO parked_facts (event_id, payment_id, topic, payload)"
                               " VALUES (%s, %s, %s, %s)",
                               (str(uuid.uuid4()), pid, refused.topic, payload))
    await _deliver(ledger, [[accepted(channel, pid, checkout)],
                            [callback(channel, pid, success(checkout, receipt=receipt))]])
    state, _, parked, _ = await _facts_of(pool, pid)
    assert tuple(state) == ("Settled", True) and parked == 2


def _menu(ch, p, co, r):
    """Facts that may all arrive for one payment, genuine and hostile: name -> event."""
    return {"requested": requested(ch, p), "accepted": accepted(ch, p, co), "accepted_again": accepted(ch, p, co),
            "second_push": accepted(ch, p, co + "b"), "unknown": push_unknown(ch, p),
            "success": callback(ch, p, success(co, receipt=r)),
            "success_other_push": callback(ch, p, success(co + "b", receipt=r)),
            "success_wrong_amount": callback(ch, p, success(co, amount=99, receipt=r)),
            "failure": callback(ch, p, failure(co, 1032)),
            "query_success": query_result(ch, p, co, "SUCCESS", "0"),
            "query_failed": query_result(ch, p, co, "FAILED", "1032")}


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_whatever_facts_arrive_in_whatever_order_settled_stays_and_each_fact_is_decided_once(
        ledger_pool, pool, codec, data):
    channel, pid, checkout, receipt = _ids()
    menu = _menu(channel, pid, checkout, receipt)
    names = data.draw(st.lists(st.sampled_from(sorted(menu)), min_size=1, max_size=7), label="facts")
    order = [menu[n] for n in names]  # a name twice: a redelivery of the same event
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(order) - 1, 1)), max_size=len(order) - 1), label="cuts"))
    batches = [b for b in (order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)) if b]
    ledger = Ledger(ledger_pool, codec)
    for batch in batches:
        await ledger.handle_batch(batch)  # a query for an unknown payment is rejected: no rejection here is lost
    state, audit, parked, history = await _facts_of(pool, pid)
    if "Settled" in history:
        assert history[history.index("Settled"):] == ["Settled"], history  # a final state stays final
        proven = {"success", "query_success"} & set(names) or {"second_push", "success_other_push"} <= set(names)
        assert proven, names  # settled only on a success of a push it names, or the query's word
    assert all(a != b for a, b in zip(history, history[1:], strict=False)), history
    decided = collections.Counter(event_id for event_id, verdict in audit if verdict != "parked")
    assert all(n == 1 for n in decided.values()), decided  # no fact decided twice
    sent = {menu[n].value["event_id"] for n in names}
    undecided = sent - set(decided)
    assert parked == len(undecided - {menu["query_success"].value["event_id"],
                                      menu["query_failed"].value["event_id"]}), (names, parked)


async def test_a_batch_bisected_after_a_bad_event_applies_the_facts_it_unparked_once(ledger_pool, pool, codec):
    """The first try un-parks the callback and settles the payment, then a bad event fails the
    transaction. The halves are retried from the database, not from the first try's memory: the
    callback is un-parked again, applied once, its row deleted once."""
    ledger = Ledger(ledger_pool, codec)
    channel, pid, checkout, receipt = _ids()
    early = callback(channel, pid, success(checkout, receipt=receipt))
    await _deliver(ledger, [[early], [requested(channel, pid)]])
    bad = requested(channel, str(uuid.uuid4()))
    bad.value["event_id"] = "not-a-uuid"
    rejections = await ledger.handle_batch([accepted(channel, pid, checkout), bad,
                                            requested(channel, str(uuid.uuid4()))])
    assert [r.event for r in rejections] == [bad]
    state, audit, parked, history = await _facts_of(pool, pid)
    assert tuple(state) == ("Settled", True) and parked == 0 and history == ["Requested", "Pending", "Settled"]
    assert [v for e, v in audit if e == early.value["event_id"]] == ["parked", "parked", "applied"]
