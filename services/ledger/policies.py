"""What a channel asks of the ledger, read from the channels table (the ledger's own database) and
cached briefly: a setting changed by an operator takes effect within the cache's lifetime."""
from __future__ import annotations

import time
from collections.abc import Callable

from psycopg import AsyncConnection

CACHE_MAX = 10_000  # channels are merchants: a few thousand at most; past this the cache starts over


class ChannelPolicies:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._confirm: dict[str, tuple[float, bool]] = {}  # channel_id -> (valid until, setting)
        self._keys: dict[str, tuple[float, frozenset[str]]] = {}  # channel_id -> (valid until, allow-list)

    async def confirm_by_query(self, conn: AsyncConnection, channel_id: str, ttl_s: float) -> bool:
        """Whether every success of this channel must be confirmed by an STK query before Settled.
        A channel the table does not know gets the default (no)."""
        cached = self._confirm.get(channel_id)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await (await conn.execute("SELECT confirm_success_by_query FROM channels WHERE channel_id = %s",
                                        (channel_id,))).fetchone()
        if len(self._confirm) >= CACHE_MAX:
            self._confirm.clear()
        self._confirm[channel_id] = (now + ttl_s, bool(row and row[0]))
        return self._confirm[channel_id][1]

    async def analytics_metadata_keys(self, conn: AsyncConnection, channel_id: str, ttl_s: float) -> frozenset[str]:
        """The metadata keys this channel allows on the status topic (analyticsMetadataKeys). A
        channel the table does not know gets the default: none."""
        cached = self._keys.get(channel_id)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await (await conn.execute("SELECT analytics_metadata_keys FROM channels WHERE channel_id = %s",
                                        (channel_id,))).fetchone()
        if len(self._keys) >= CACHE_MAX:
            self._keys.clear()
        self._keys[channel_id] = (now + ttl_s, frozenset(row[0]) if row and row[0] else frozenset())
        return self._keys[channel_id][1]


POLICIES = ChannelPolicies()  # one per process, shared by the ledger's batches and its reconciler
