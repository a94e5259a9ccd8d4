"""The poller's turns, with a fake store: a backlog is claimed back to back, not one claim per interval."""
from __future__ import annotations

import asyncio

from services.notifier.dispatcher import Dispatcher
from services.notifier.poller import Poller
from services.notifier.schedule import RetryPolicy
from tests.conftest import eventually
from tests.notifier.fakes import FakeSender, RecordingSink, StaticSecrets, delivery, endpoint, met

A = endpoint("a")


class BacklogStore:
    """An endpoint with `backlog` due deliveries, handed out as the claims ask."""

    def __init__(self, backlog: int):
        self.due = [delivery(i, A.endpoint_id, f"p{i}") for i in range(1, backlog + 1)]
        self.claims = 0

    async def endpoints_by_id(self, endpoint_ids):
        return {A.endpoint_id: A}

    async def claim_due(self, lease_s, limit, per_endpoint, excluded_endpoints):
        self.claims += 1
        taken, self.due = self.due[:min(limit, per_endpoint)], self.due[min(limit, per_endpoint):]
        return taken

    async def sample(self):
        return 0.0, 0


async def test_one_endpoints_backlog_is_claimed_back_to_back_not_one_share_per_interval():
    store, sink = BacklogStore(backlog=30), RecordingSink()
    dispatcher = Dispatcher(FakeSender(), StaticSecrets(), sink, RetryPolicy(), concurrency=8, queue_max=1000)
    poller = Poller(store, dispatcher, interval_s=3600, batch=20, lease_s=60)  # type: ignore[arg-type]
    assert poller.per_endpoint == 6
    stop = asyncio.Event()
    task = asyncio.ensure_future(poller.run(stop))
    try:
        # 30 due, 6 per claim: five full shares and an empty claim, all in the first turn.
        await eventually(lambda: met(len(sink.results) == 30), timeout=10)
        assert store.claims == 6
    finally:
        stop.set()
        await task
