"""A token bucket per source, for whoever refuses a caller that comes too often: the webhook
gateway (per client address) and the admin API (failed logins per address). Pure: time comes from
a clock.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable


class RateLimiter:
    """A token bucket per source: `burst` requests at once, refilled at `rate_per_s`.

    Memory is bounded by `sources_max`: the least recently seen source is forgotten first, which
    at worst hands it a full bucket again.
    """

    def __init__(self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 sources_max: int = 100_000):
        if rate_per_s <= 0 or burst < 1 or sources_max < 1:
            raise ValueError("rate_per_s must be positive, burst and sources_max at least 1")
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.sources_max = sources_max
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, when counted); oldest first

    def take(self, source: str) -> float:
        """Spends one token for `source`. Returns 0.0 when allowed, else the seconds until a token is due."""
        now = self._clock()
        tokens, counted_at = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - counted_at) * self.rate_per_s)
        wait_s = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait_s = (1.0 - tokens) / self.rate_per_s
        self._buckets[source] = (tokens, now)  # re-inserted: dict order is least recently seen first
        if len(self._buckets) > self.sources_max:
            del self._buckets[next(iter(self._buckets))]
        return wait_s

    def wait_s(self, source: str) -> float:
        """The seconds until `source` has a token again (0.0 when it has one now); spends nothing."""
        tokens, counted_at = self._buckets.get(source, (self.burst, self._clock()))
        tokens = min(self.burst, tokens + max(0.0, self._clock() - counted_at) * self.rate_per_s)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(wait_s: float) -> str:
    """Retry-After in whole seconds, never 0 for a refused request."""
    return str(max(1, math.ceil(wait_s)))
