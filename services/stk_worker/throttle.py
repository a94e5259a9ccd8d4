"""Per-shortcode pacing on the shared token bucket (services/common/ratelimit.py): keeps us under
Daraja's limits, lets a channel's own pushes-per-second limit win when lower, and pauses a shortcode
when Daraja answers spike arrest (500.003.02, docs/daraja.md §6). Pure: the caller waits."""
from __future__ import annotations

import time
from collections.abc import Callable

from services.common.ratelimit import RateLimiter


class ShortcodeThrottle:
    def __init__(self, rate_per_s: float, burst: int, penalty_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.rate_per_s, self.burst, self.penalty_s, self.clock = rate_per_s, burst, penalty_s, clock
        self._buckets: dict[str, RateLimiter] = {}
        self._paused_until: dict[str, float] = {}

    def take(self, shortcode: str, rate_per_s: float | None = None) -> float:
        """Spends the shortcode's next turn: 0.0 when it may call Daraja now, else the seconds to
        wait before asking again. `rate_per_s`, a channel's own limit, wins if lower; a query
        (None) keeps the rate the shortcode's pushes set."""
        paused_s = self._paused_until.get(shortcode, 0.0) - self.clock()
        if paused_s > 0:
            return paused_s
        return self._bucket(shortcode, rate_per_s).take(shortcode)

    def spike_arrested(self, shortcode: str) -> None:
        """Daraja said slow down: pause this shortcode and start again from an empty bucket."""
        self._paused_until[shortcode] = self.clock() + self.penalty_s
        bucket = self._bucket(shortcode, None)
        for _ in range(self.burst):  # empties it: each take spends a token while there is one
            if bucket.take(shortcode) > 0:
                break

    def _bucket(self, shortcode: str, rate_per_s: float | None) -> RateLimiter:
        bucket = self._buckets.get(shortcode)
        rate = self.rate_per_s if rate_per_s is None else min(rate_per_s, self.rate_per_s)
        if bucket is None or (rate_per_s is not None and bucket.rate_per_s != rate):
            # A new limit starts a new bucket: a lowered one must not inherit a larger burst's tokens.
            bucket = RateLimiter(rate, min(self.burst, max(int(rate), 1)), clock=self.clock, sources_max=1)
            self._buckets[shortcode] = bucket
        return bucket
