"""Per-shortcode pacing: a token bucket that keeps us under Daraja's limits and slows down on
spike arrest (500.003.02, docs/daraja.md §6)."""
from __future__ import annotations

import asyncio
import time


class ShortcodeThrottle:
    def __init__(self, rate_per_s: float, burst: int, penalty_s: float = 2.0, clock=time.monotonic):
        self.rate, self.burst, self.penalty_s, self.clock = rate_per_s, burst, penalty_s, clock
        self._tokens: dict[str, float] = {}
        self._updated: dict[str, float] = {}
        self._paused_until: dict[str, float] = {}
        self._rates: dict[str, float] = {}

    async def acquire(self, shortcode: str, rate_per_s: float | None = None) -> None:
        """Waits for the shortcode's turn; a channel's own pushes-per-second limit wins if lower."""
        self._rates[shortcode] = min(rate_per_s or self.rate, self.rate)
        while (wait := self._reserve(shortcode)) > 0:
            await asyncio.sleep(wait)

    def _reserve(self, shortcode: str) -> float:
        now = self.clock()
        paused = self._paused_until.get(shortcode, 0) - now
        if paused > 0:
            return paused
        rate = self._rates.get(shortcode, self.rate)
        tokens = min(self.burst, self._tokens.get(shortcode, self.burst)
                     + (now - self._updated.get(shortcode, now)) * rate)
        self._updated[shortcode] = now
        if tokens >= 1:
            self._tokens[shortcode] = tokens - 1
            return 0
        self._tokens[shortcode] = tokens
        return (1 - tokens) / rate

    def spike_arrested(self, shortcode: str) -> None:
        """Daraja said slow down: pause this shortcode and start again from an empty bucket."""
        self._paused_until[shortcode] = self.clock() + self.penalty_s
        self._tokens[shortcode] = 0
