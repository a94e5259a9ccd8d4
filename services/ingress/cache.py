"""A small time-bounded cache for the hot path's lookups (API keys, channel status).

Entries live `ttl_s` seconds, so a revoked key or a suspended channel takes effect within that
time. Concurrent misses for one key share a single load. Size is bounded: the oldest entry goes.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class TtlCache(Generic[Value]):
    def __init__(self, ttl_s: float, *, entries_max: int = 10_000, clock: Callable[[], float] = time.monotonic):
        assert ttl_s >= 0 and entries_max > 0
        self.ttl_s = ttl_s
        self.entries_max = entries_max
        self._clock = clock
        self._entries: dict[Hashable, tuple[float, Value]] = {}
        self._loading: dict[Hashable, asyncio.Future] = {}

    async def get(self, key: Hashable, load: Callable[[], Awaitable[Value]]) -> Value:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            return entry[1]
        loading = self._loading.get(key)
        if loading is not None:
            return await asyncio.shield(loading)
        future = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            value = await load()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # marks it retrieved when no one else waited
            raise
        finally:
            del self._loading[key]
        self._put(key, value)
        future.set_result(value)
        return value

    def invalidate(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def _put(self, key: Hashable, value: Value) -> None:
        if self.ttl_s == 0:
            return
        self._entries.pop(key, None)
        while len(self._entries) >= self.entries_max:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (self._clock() + self.ttl_s, value)
