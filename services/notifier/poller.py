"""The notifier's timers: the poller that claims due deliveries, the heartbeat that renews the
leases of the deliveries held in memory, and the sampling of the backlog's metrics.

The poller is how a retry comes back (its next attempt time passed), how a delivery waiting behind
an earlier one of its payment gets its turn, how an endpoint enabled again resumes, and how the
deliveries of a notifier that was killed are taken over once their leases expire. Endpoints whose
lane is full are left out of a claim, so memory stays bounded however many deliveries wait.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time

import psycopg

from services.common.text import untrusted
from services.notifier import metrics
from services.notifier.dispatcher import Dispatcher
from services.notifier.store import NotifierStore

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 5.0
# Claims made back to back while more is due, before the next interval: a backlog drains at the
# database's pace, and a claim that keeps coming back (rows released at once) cannot spin.
CLAIMS_PER_TURN_MAX = 50


class Poller:
    def __init__(self, store: NotifierStore, dispatcher: Dispatcher, *, interval_s: float, batch: int, lease_s: float):
        self.store = store
        self.dispatcher = dispatcher
        self.interval_s = interval_s
        self.batch = batch
        # At most a quarter of a claim from one endpoint: one backlog never fills a whole claim.
        self.per_endpoint = batch // 4 + 1
        self.lease_s = lease_s
        self._sampled_at = float("-inf")

    async def run(self, stop: asyncio.Event) -> None:
        async def poll_while_more_is_due() -> None:
            for _ in range(CLAIMS_PER_TURN_MAX):
                if not await self.poll() or stop.is_set():
                    return
        await self._every(self.interval_s, stop, poll_while_more_is_due, "claiming due webhook deliveries")

    async def beat(self, stop: asyncio.Event) -> None:
        # Three renewals per lease: one may fail (a PostgreSQL restart) before the lease runs out.
        await self._every(self.lease_s / 3, stop, self.renew, "renewing webhook delivery leases")

    async def poll(self) -> bool:
        """One claim; returns whether more may be due now (the claim, or an endpoint's share of it,
        was full)."""
        endpoints = await self.store.endpoints_by_id(self.dispatcher.endpoint_ids())
        self.dispatcher.update_endpoints(endpoints)
        claimed = await self.store.claim_due(self.lease_s, self.batch, self.per_endpoint,
                                             self.dispatcher.full_endpoints())
        if claimed:
            missing = sorted({d.endpoint_id for d in claimed} - endpoints.keys())
            endpoints.update(await self.store.endpoints_by_id(missing))
            self.dispatcher.accept(((d, ()) for d in claimed), endpoints, claimed=True)
        if time.monotonic() - self._sampled_at >= SAMPLE_EVERY_S:
            await self.sample()
        per_endpoint = collections.Counter(d.endpoint_id for d in claimed)
        return len(claimed) >= self.batch or any(n >= self.per_endpoint for n in per_endpoint.values())

    async def sample(self) -> None:
        """The backlog's gauges, read from PostgreSQL (every process reports the same values)."""
        self._sampled_at = time.monotonic()
        oldest_s, disabled = await self.store.sample()
        metrics.OLDEST_UNDELIVERED.set(oldest_s)
        metrics.ENDPOINTS_DISABLED.set(disabled)

    async def renew(self) -> None:
        held = self.dispatcher.held_ids()
        still_ours = await self.store.renew(held, self.lease_s)
        lost = [i for i in held if i not in still_ours and self.dispatcher.holds(i)]
        if lost:
            log.warning("%d webhook deliveries held here were taken over (their leases had expired)", len(lost))
            self.dispatcher.forget(lost)

    @staticmethod
    async def _every(interval_s: float, stop: asyncio.Event, step, what: str) -> None:
        while not stop.is_set():
            try:
                await step()
            except psycopg.Error as exc:
                log.warning("%s: %s: %s; retrying", what, type(exc).__name__, untrusted(str(exc)))
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                pass
