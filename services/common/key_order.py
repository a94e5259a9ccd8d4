"""Batches that run side by side while each key's events keep the order they were fetched in.

A consumer that handles two batches at once lets the later one commit first. For the ledger that
would let a later event of a payment (an operator's SETTLE, a second STK-query answer) be applied
before an earlier one still waiting in the first batch (docs/design.md: a merchant's events stay in
order on their partition). So a batch names the keys its events touch (the ledger: their payment
ids), and before its handler runs it waits for every earlier batch still in hand that shares one.
Batches with no key in common go side by side: that is where the overlap pays.

The waits only ever point back to batches fetched earlier, which never wait for a later one, so
they cannot form a cycle; a handler that takes database locks after its wait cannot deadlock
against an earlier batch through them either, since that batch does not wait for it at all.

A batch that ends without being handled (given up at a stop, or a bug) leaves its events to be
handled again later, so the batches behind it that share a key are given up too, rather than go
ahead of it. If it failed before its keys were known (they are read from decoded events), every
later batch sharing a partition with it is given up: any of them could hold a later event of its.
Such a failed batch stays on record until the process ends, and `given_up_for` says since when, for
readiness: outside a stop only a bug gives a batch up, and only a restart (which redelivers its
events, in order) ends what it holds back.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


class EarlierBatchGivenUp(Exception):
    """An earlier batch sharing a key with this one was not handled: this one must not go ahead of it."""


@dataclass(eq=False)
class Turn:
    number: int  # the batch's place in fetch order
    partitions: frozenset[tuple[str, int]]
    keys: frozenset[Hashable] | None = None  # None until read: then only the partitions say what it may touch
    known: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    handled: bool = False
    given_up_at: float | None = None  # monotonic

    def may_precede(self, later: Turn) -> bool:
        """Whether `later` may hold an event that must be applied after one of this batch's."""
        if self.keys is None:
            return bool(self.partitions & later.partitions)
        return bool(self.keys & (later.keys or frozenset()))


class KeyOrder:
    def __init__(self) -> None:
        self._turns: dict[int, Turn] = {}  # in fetch order: batches in hand, and those that failed
        self._taken = 0

    def take(self, partitions: Iterable[tuple[str, int]]) -> Turn:
        """A batch's turn, taken when it is fetched, i.e. in fetch order."""
        self._taken += 1
        turn = self._turns[self._taken] = Turn(self._taken, frozenset(partitions))
        return turn

    async def wait(self, turn: Turn, keys: Iterable[Hashable]) -> None:
        """Records the batch's keys, then waits for every earlier batch that shares one to be handled.
        Raises EarlierBatchGivenUp when one of them ended without being handled."""
        turn.keys = frozenset(keys)
        turn.known.set()
        for earlier in [t for n, t in self._turns.items() if n < turn.number]:
            await earlier.known.wait()  # a batch that ends sets it too, keys read or not
            if earlier.may_precede(turn):
                await earlier.ended.wait()
                if not earlier.handled:
                    raise EarlierBatchGivenUp(f"batch {earlier.number}, which shares a key with this one, "
                                              "was not handled")

    def end(self, turn: Turn, handled: bool) -> None:
        """Once per turn; a second call (a task cancelled before it ran, seen by its done callback
        after its own `finally`) changes nothing."""
        if turn.ended.is_set():
            return
        turn.handled = handled
        turn.known.set()
        turn.ended.set()
        if handled:
            del self._turns[turn.number]
        else:
            turn.given_up_at = time.monotonic()

    def given_up_for(self) -> float:
        """Seconds since the first batch was given up (0 if none was)."""
        first = min((t.given_up_at for t in self._turns.values() if t.given_up_at is not None), default=None)
        return 0.0 if first is None else time.monotonic() - first
