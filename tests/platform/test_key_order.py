"""KeyOrder: which batch waits for which (pure asyncio; the consumer loop's use of it is tested on the
real broker in test_consumer_loop.py)."""
from __future__ import annotations

import asyncio

import pytest

from services.common.key_order import EarlierBatchGivenUp, KeyOrder

P0, P1 = ("t", 0), ("t", 1)


async def settles(awaitable, within: float = 0.2) -> bool:
    """Whether the awaitable finished within the time (it keeps running otherwise)."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=within)
    return task in done


async def test_a_later_batch_sharing_a_key_waits_until_the_earlier_one_is_handled():
    order = KeyOrder()
    first, second = order.take([P0]), order.take([P0])
    await order.wait(first, {"pay-1", "pay-2"})
    waiting = asyncio.ensure_future(order.wait(second, {"pay-2", "pay-3"}))
    assert not await settles(asyncio.shield(waiting))
    order.end(first, handled=True)
    assert await settles(waiting)
    waiting.result()  # no error: the earlier batch was handled


async def test_batches_without_a_common_key_go_at_once_even_on_one_partition():
    order = KeyOrder()
    first, second = order.take([P0]), order.take([P0])
    await order.wait(first, {"pay-1"})
    assert await settles(order.wait(second, {"pay-2"}))


async def test_a_later_batch_waits_for_an_earlier_one_to_know_its_keys():
    order = KeyOrder()
    first, second = order.take([P0]), order.take([P1])
    waiting = asyncio.ensure_future(order.wait(second, {"pay-1"}))
    assert not await settles(asyncio.shield(waiting))  # the first is still reading its events
    await order.wait(first, {"pay-9"})
    assert await settles(waiting)


async def test_a_batch_behind_one_that_was_given_up_is_given_up_if_they_share_a_key():
    order = KeyOrder()
    first, sharing, apart = order.take([P0]), order.take([P0]), order.take([P0])
    await order.wait(first, {"pay-1"})
    waiting = asyncio.ensure_future(order.wait(sharing, {"pay-1"}))
    await asyncio.sleep(0)
    order.end(first, handled=False)  # a stop interrupted it: its events come again later
    with pytest.raises(EarlierBatchGivenUp):
        await waiting
    assert await settles(order.wait(apart, {"pay-2"}))
    late = order.take([P1])  # a failed batch stays on record for every later one
    with pytest.raises(EarlierBatchGivenUp):
        await order.wait(late, {"pay-1"})


async def test_a_batch_that_failed_before_its_keys_were_read_holds_back_its_partitions_only():
    order = KeyOrder()
    failed, same_partition, other_partition = order.take([P0]), order.take([P0, P1]), order.take([P1])
    order.end(failed, handled=False)
    with pytest.raises(EarlierBatchGivenUp):
        await order.wait(same_partition, {"pay-1"})
    # the second batch failed too, but its keys were known: only pay-1 would be held back
    order.end(same_partition, handled=False)
    assert await settles(order.wait(other_partition, {"pay-2"}))


async def test_handled_batches_leave_no_trace():
    order = KeyOrder()
    for _ in range(100):
        turn = order.take([P0])
        await order.wait(turn, {"pay-1"})
        order.end(turn, handled=True)
    assert order._turns == {}


async def test_a_turn_ends_once_and_a_given_up_one_is_timed_for_readiness():
    order = KeyOrder()
    assert order.given_up_for() == 0.0
    turn = order.take([P0])
    order.end(turn, handled=False)
    order.end(turn, handled=True)  # the task's done callback, after its own finally: no change
    assert not turn.handled
    await asyncio.sleep(0.05)
    assert order.given_up_for() >= 0.05


async def test_a_batch_of_no_key_at_all_waits_for_no_one():
    """Its events were all undecodable or keyless: none of them touches a payment."""
    order = KeyOrder()
    first, keyless = order.take([P0]), order.take([P0])
    await order.wait(first, {"pay-1"})
    assert await settles(order.wait(keyless, set()))
