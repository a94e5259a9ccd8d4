"""The dispatcher's ordering and concurrency, with a fake sender: per (endpoint, payment) one
delivery in flight and in order; per endpoint a bounded number in flight and in memory; a stuck
endpoint holds up nobody else; a retry sends its chain back to PostgreSQL."""
from __future__ import annotations

import asyncio
from dataclasses import replace

from services.notifier.dispatcher import Dispatcher
from services.notifier.schedule import RetryPolicy
from tests.conftest import eventually
from tests.notifier.fakes import FakeSender, RecordingSink, StaticSecrets, delivery, endpoint, met

A, B = endpoint("a"), endpoint("b", channel="other")
ENDPOINTS = {A.endpoint_id: A, B.endpoint_id: B}


def dispatcher(sender: FakeSender, sink: RecordingSink, concurrency: int = 8, queue_max: int = 100) -> Dispatcher:
    return Dispatcher(sender, StaticSecrets(), sink, RetryPolicy(), concurrency=concurrency, queue_max=queue_max)


async def ticks(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_payments_deliveries_go_one_at_a_time_in_the_order_they_happened():
    sender, sink = FakeSender(gates={A.url: asyncio.Event()}), RecordingSink()
    d = dispatcher(sender, sink)
    # Handed over out of order: occurred_at decides, then the id.
    d.accept([(delivery(3, A.endpoint_id, "p1", seconds=2), ()), (delivery(1, A.endpoint_id, "p1"), ()),
              (delivery(2, A.endpoint_id, "p1", seconds=1), ()), (delivery(4, A.endpoint_id, "p2"), ())], ENDPOINTS)
    await ticks()
    assert sorted(sender.ids_sent_to(A.url)) == ["wh-1", "wh-4"]  # p1's head and p2's, not p1's next ones
    sender.gates[A.url].set()
    await eventually(lambda: met(len(sink.results) == 4))
    p1 = [i for i in sender.ids_sent_to(A.url) if i != "wh-4"]
    assert p1 == ["wh-1", "wh-2", "wh-3"]
    assert set(sink.states().values()) == {"delivered"} and d.held_ids() == []


async def test_an_endpoint_has_at_most_its_concurrency_in_flight():
    sender, sink = FakeSender(gates={A.url: asyncio.Event()}), RecordingSink()
    d = dispatcher(sender, sink, concurrency=3)
    d.accept([(delivery(i, A.endpoint_id, f"p{i}"), ()) for i in range(1, 21)], ENDPOINTS)
    await ticks()
    assert sender.in_flight[A.url] == 3
    sender.gates[A.url].set()
    await eventually(lambda: met(len(sink.results) == 20))
    assert sender.most_in_flight[A.url] == 3


async def test_a_stuck_endpoint_holds_up_no_other():
    sender, sink = FakeSender(gates={A.url: asyncio.Event()}), RecordingSink()
    d = dispatcher(sender, sink, concurrency=2)
    d.accept([(delivery(i, A.endpoint_id, f"p{i}"), ()) for i in range(1, 11)]
             + [(delivery(i, B.endpoint_id, f"p{i}"), ()) for i in range(11, 21)], ENDPOINTS)
    await eventually(lambda: met(len(sink.results) == 10))
    assert {r.delivery_id for r in sink.results} == set(range(11, 21))
    assert sender.in_flight[A.url] == 2  # still stuck, and never more than its two
    sender.gates[A.url].set()
    await eventually(lambda: met(len(sink.results) == 20))


async def test_a_head_to_retry_goes_back_to_postgresql_with_its_followers():
    sender, sink = FakeSender(status_by_url={A.url: 503}), RecordingSink()
    d = dispatcher(sender, sink)
    d.accept([(delivery(1, A.endpoint_id, "p1"), ()), (delivery(2, A.endpoint_id, "p1", seconds=1), ())], ENDPOINTS)
    await eventually(lambda: met(len(sink.results) == 1))
    await ticks()
    head = sink.results[0]
    assert (head.delivery_id, head.state, head.attempts) == (1, "pending", 1)
    assert head.next_attempt_at is not None and head.next_attempt_at > head.at
    assert head.attempt is not None and head.attempt.outcome == "retry" and head.attempt.http_status == 503
    assert sink.releases == [2] and sender.ids_sent_to(A.url) == ["wh-1"] and d.held_ids() == []


async def test_a_delivery_behind_an_earlier_one_held_elsewhere_waits_in_postgresql():
    sender, sink = FakeSender(gates={A.url: asyncio.Event()}), RecordingSink()
    d = dispatcher(sender, sink)
    d.accept([(delivery(1, A.endpoint_id, "p1"), ())], ENDPOINTS)
    # 2 comes after 1, which is held here: it joins the chain. 3 comes after 99, which is not.
    released = d.accept([(delivery(2, A.endpoint_id, "p1", seconds=1), (1,)),
                         (delivery(3, A.endpoint_id, "p2", seconds=1), (99,)),
                         (delivery(4, A.endpoint_id, "p2", seconds=2), ())], ENDPOINTS)
    assert released == [3, 4]  # 4 follows 3 in its chain, so it waits too
    assert sorted(d.held_ids()) == [1, 2] and sink.releases == [3, 4]
    sender.gates[A.url].set()
    await eventually(lambda: met(len(sink.results) == 2))
    assert sender.ids_sent_to(A.url) == ["wh-1", "wh-2"]


async def test_a_delivery_just_delivered_here_counts_as_done_for_the_next():
    sender, sink = FakeSender(), RecordingSink()
    d = dispatcher(sender, sink)
    d.accept([(delivery(1, A.endpoint_id, "p1"), ())], ENDPOINTS)
    await eventually(lambda: met(len(sink.results) == 1))
    # Its result is not written yet (the writer batches), so PostgreSQL still calls it pending.
    assert d.accept([(delivery(2, A.endpoint_id, "p1", seconds=1), (1,))], ENDPOINTS) == []
    await eventually(lambda: met(len(sink.results) == 2))


async def test_the_deliveries_an_endpoint_holds_in_memory_are_bounded():
    sender, sink = FakeSender(gates={A.url: asyncio.Event()}), RecordingSink()
    d = dispatcher(sender, sink, concurrency=2, queue_max=5)
    released = d.accept([(delivery(i, A.endpoint_id, f"p{i}"), ()) for i in range(1, 9)], ENDPOINTS)
    assert len(d.held_ids()) == 5 and len(released) == 3 and d.full_endpoints() == [A.endpoint_id]
    # The poller's claim leaves full lanes out; what one claim brings beyond the room is kept.
    assert d.accept([(delivery(i, A.endpoint_id, f"p{i}"), ()) for i in range(9, 12)], ENDPOINTS, claimed=True) == []
    assert len(d.held_ids()) == 8
    sender.gates[A.url].set()
    await eventually(lambda: met(len(sink.results) == 8))
    assert d.full_endpoints() == []


async def test_a_late_older_event_goes_before_the_waiting_ones_but_after_the_one_in_flight():
    sender, sink = FakeSender(gates={A.url: asyncio.Event()}), RecordingSink()
    d = dispatcher(sender, sink)
    d.accept([(delivery(5, A.endpoint_id, "p1", seconds=5), ()), (delivery(6, A.endpoint_id, "p1", seconds=6), ())],
             ENDPOINTS)
    await ticks()
    d.accept([(delivery(7, A.endpoint_id, "p1", seconds=1), ())], ENDPOINTS)
    sender.gates[A.url].set()
    await eventually(lambda: met(len(sink.results) == 3))
    assert sender.ids_sent_to(A.url) == ["wh-5", "wh-7", "wh-6"]


async def test_the_deliveries_of_an_endpoint_disabled_meanwhile_are_released_unsent():
    sender, sink = FakeSender(gates={A.url: asyncio.Event()}), RecordingSink()
    d = dispatcher(sender, sink, concurrency=1)
    d.accept([(delivery(i, A.endpoint_id, f"p{i}"), ()) for i in range(1, 4)], ENDPOINTS)
    await ticks()
    d.update_endpoints({A.endpoint_id: replace(A, enabled=False)})
    assert sorted(sink.releases) == [2, 3]  # 1 is in flight: it finishes
    sender.gates[A.url].set()
    await eventually(lambda: met(len(sink.results) == 1))
    await ticks()
    assert sender.ids_sent_to(A.url) == ["wh-1"] and d.held_ids() == []
    # A delivery of a disabled endpoint is not taken at all.
    assert d.accept([(delivery(9, A.endpoint_id, "p9"), ())], {A.endpoint_id: replace(A, enabled=False)}) == [9]


async def test_a_drain_lets_the_attempts_in_flight_finish_starts_none_and_releases_the_rest():
    sender, sink = FakeSender(gates={A.url: asyncio.Event()}), RecordingSink()
    d = dispatcher(sender, sink, concurrency=1)
    d.accept([(delivery(1, A.endpoint_id, "p1"), ()), (delivery(2, A.endpoint_id, "p1", seconds=1), ()),
              (delivery(3, A.endpoint_id, "p3"), ())], ENDPOINTS)
    await ticks()
    draining = asyncio.ensure_future(d.drain(timeout_s=30))
    await ticks()
    sender.gates[A.url].set()
    await draining
    assert sender.ids_sent_to(A.url) == ["wh-1"] and [r.delivery_id for r in sink.results] == [1]
    assert sorted(sink.releases) == [2, 3] and d.held_ids() == []
    assert d.accept([(delivery(4, A.endpoint_id, "p4"), ())], ENDPOINTS) == [4]


async def test_a_sender_that_raises_does_not_hold_its_chain_for_ever():
    class Broken:
        async def send(self, *args):
            raise RuntimeError("a bug")

        async def close(self) -> None:
            pass
    sink = RecordingSink()
    d = Dispatcher(Broken(), StaticSecrets(), sink, RetryPolicy(), concurrency=2, queue_max=10)
    d.accept([(delivery(1, A.endpoint_id, "p1"), ())], ENDPOINTS)
    await eventually(lambda: met(len(sink.results) == 1))
    assert sink.results[0].state == "pending" and "RuntimeError" in (sink.results[0].error or "")
    assert d.held_ids() == []
