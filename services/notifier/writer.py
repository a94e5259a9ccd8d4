"""Writes the dispatcher's results to PostgreSQL in batches: one transaction every few milliseconds
instead of one per attempt, which is what lets one process reach thousands of deliveries a second.

A result is kept in memory until its batch committed; if PostgreSQL is down the batches wait and are
written when it is back (the leases of their rows may expire meanwhile, and another process may
attempt them again: at least once, with the same webhook-id). A delivered delivery counts as
finished at once for the ordering of its chain (`finishing`), since its receiver has it already.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from datetime import datetime

import psycopg

from services.common.text import untrusted
from services.notifier import metrics
from services.notifier.store import FAILURE_GAP_S, EndpointHealth, Finished, NotifierStore

log = logging.getLogger(__name__)


class ResultWriter:
    def __init__(self, store: NotifierStore, retry_window_s: float, *, flush_every_s: float = 0.005,
                 max_batch: int = 1000, on_disabled: Callable[[list[str]], None] = lambda ids: None,
                 failure_gap_s: float = FAILURE_GAP_S):
        self.store = store
        self.retry_window_s = retry_window_s
        self.failure_gap_s = failure_gap_s
        self.flush_every_s = flush_every_s
        self.max_batch = max_batch
        self.on_disabled = on_disabled
        self._finished: list[Finished] = []
        self._outcomes: list[tuple[str, bool, datetime]] = []  # (endpoint, succeeded, at), in order
        self._released: list[int] = []
        self._finishing: set[int] = set()
        self._wake = asyncio.Event()
        self._failing_since: float | None = None  # monotonic time writes began failing

    def finished(self, result: Finished, endpoint_id: str, succeeded: bool | None) -> None:
        self._finished.append(result)
        if result.state != "pending":
            self._finishing.add(result.delivery_id)
        if succeeded is not None:
            self._outcomes.append((endpoint_id, succeeded, result.at))
        self._wake.set()

    def released(self, delivery_ids: Iterable[int]) -> None:
        self._released.extend(delivery_ids)
        if self._released:
            self._wake.set()

    def finishing(self, delivery_id: int) -> bool:
        return delivery_id in self._finishing

    def stalled_for(self) -> float:
        """Seconds the writes have been failing (0 when they succeed), for /readyz."""
        return 0.0 if self._failing_since is None else time.monotonic() - self._failing_since

    async def run(self, stop: asyncio.Event) -> None:
        """Flushes until stopped; what comes after is written by `flush_until_written` at the close."""
        while not stop.is_set():
            waker = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waker, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waker.cancel()
            stopper.cancel()
            if len(self._finished) < self.max_batch:
                await asyncio.sleep(self.flush_every_s)  # let results gather into one transaction
            await self.flush_until_written(stop=stop)

    async def flush_until_written(self, stopping: bool = False, stop: asyncio.Event | None = None) -> None:
        """Writes what is waiting, retrying while PostgreSQL refuses, until `stop` is set; when
        `stopping`, for about 15 s at most (what stays unwritten is attempted again: its rows are
        still pending, their leases expire)."""
        delay = 0.1
        while self._finished or self._released or self._outcomes:
            try:
                await self.flush()
                self._failing_since = None
                delay = 0.1
            except psycopg.Error as exc:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                log.warning("writing %d webhook results failed, retrying in %.1fs: %s: %s", len(self._finished),
                            delay, type(exc).__name__, untrusted(str(exc)))
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                if stop is not None and stop.is_set():
                    return  # the close writes what is left
                if stopping and delay >= 5.0:
                    log.error("stopping with %d webhook results unwritten: their deliveries are attempted again",
                              len(self._finished))
                    return

    async def flush(self) -> None:
        self._wake.clear()
        finished, self._finished = self._finished[:self.max_batch], self._finished[self.max_batch:]
        outcomes, self._outcomes = self._outcomes, []
        released, self._released = self._released, []
        try:
            disabled = await self.store.write(finished, released, health_of(outcomes), self.retry_window_s,
                                              self.failure_gap_s)
        except BaseException:
            self._finished[:0] = finished
            self._outcomes[:0] = outcomes
            self._released[:0] = released
            raise
        self._finishing.difference_update(f.delivery_id for f in finished)
        if self._finished or self._released:
            self._wake.set()
        if disabled:
            metrics.AUTO_DISABLED.inc(len(disabled))
            for endpoint_id, channel_id in disabled:
                log.warning("webhook endpoint %s disabled: no attempt succeeded for the whole retry window",
                            endpoint_id, extra={"channel_id": channel_id})
            self.on_disabled([endpoint_id for endpoint_id, _ in disabled])


def health_of(outcomes: list[tuple[str, bool, datetime]]) -> list[EndpointHealth]:
    """Per endpoint, from its attempts in order: did one succeed, and since when has it failed since."""
    health: dict[str, EndpointHealth] = {}
    for endpoint_id, succeeded, at in outcomes:
        before = health.get(endpoint_id, EndpointHealth(endpoint_id, False, None))
        if succeeded:
            health[endpoint_id] = EndpointHealth(endpoint_id, True, None)
        else:
            health[endpoint_id] = EndpointHealth(endpoint_id, before.reset, before.failing_since or at,
                                                 max(at, before.last_failure or at))
    return list(health.values())
