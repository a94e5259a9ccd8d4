"""The retry schedule: after one webhook attempt, is the delivery done, tried again (when), or parked?

Pure: the attempt's result, how many attempts were made, when the delivery was created and the
time now go in; a verdict and the next attempt's time come out (docs/webhooks.md §3).

- A 2xx delivered it.
- No answer (timeout, connection error), a 429 or a 5xx: the receiver may recover, so the
  delivery is retried with jittered exponential back-off for the whole window (three days by
  default), never sooner than the receiver's Retry-After asks.
- Any other answer (other 4xx, a 3xx: redirects are never followed), and a destination the
  resolver refused (its name now points inside): a few attempts in case it was a passing mistake,
  then parked, so that a misconfigured endpoint is not hammered for three days.
- Parked as soon as the next attempt would fall after the window's end.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

# 2**60 times any sensible first back-off is past any cap; bounding the exponent keeps the float finite.
EXPONENT_MAX = 60


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt got.

    `refused` is True when the destination itself was refused (the URL is not allowed, or its host
    resolves only to addresses the policy refuses): nothing was sent, `http_status` is None, and the
    schedule treats it as a client-side error (a few attempts, then parked), unlike a connection
    error or a timeout, which are retried for the whole window."""
    http_status: int | None  # None when no answer (timeout, connection error, refused destination)
    latency_ms: float  # from the start of connecting to the end of the (bounded) answer read
    error: str | None  # short and safe: no secret, no request body; at most 200 characters of the answer
    retry_after_s: float | None  # a 429/503's Retry-After (seconds or HTTP date), capped
    refused: bool = False


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    PARKED = "parked"


@dataclass(frozen=True)
class RetryPolicy:
    window: timedelta = timedelta(days=3)  # retried for this long after the delivery was created
    max_client_error_attempts: int = 5  # other 4xx, 3xx, refused destination: this many attempts, then parked
    first_backoff_s: float = 5.0  # the nominal wait after the first attempt; doubles per attempt
    max_backoff_s: float = 3600.0  # the nominal wait never grows beyond this

    def __post_init__(self) -> None:
        if self.window <= timedelta(0) or self.max_client_error_attempts < 1:
            raise ValueError("the retry window must be positive and at least one attempt allowed")
        if not 0 < self.first_backoff_s <= self.max_backoff_s or not math.isfinite(self.max_backoff_s):
            raise ValueError("back-off: 0 < first_backoff_s <= max_backoff_s, both finite")


def is_success(status: int) -> bool:
    return 200 <= status <= 299


def is_transient(result: AttemptResult) -> bool:
    """A failure the receiver may recover from by itself, retried for the whole window."""
    if result.refused:
        return False
    status = result.http_status
    return status is None or status == 429 or 500 <= status <= 599


def backoff_s(attempts_made: int, policy: RetryPolicy, rand: Callable[[], float]) -> float:
    """Equal jitter (docs/webhooks.md §3): half the nominal wait for sure, the other half random."""
    nominal = min(policy.max_backoff_s, policy.first_backoff_s * 2.0 ** min(attempts_made - 1, EXPONENT_MAX))
    draw = min(max(rand(), 0.0), 1.0)  # a random source outside [0, 1] cannot shorten or stretch the wait
    return nominal / 2 + draw * nominal / 2


def decide(result: AttemptResult, attempts_made: int, created_at: datetime, now: datetime, policy: RetryPolicy,
           rand: Callable[[], float] = random.random) -> tuple[Outcome, datetime | None]:
    """(outcome, when to try next for RETRY, else None).

    `attempts_made` counts every attempt of this delivery, the one just made included (so >= 1);
    the client-error budget counts them all, whatever their answers were. `created_at` and `now`
    are timezone-aware."""
    if attempts_made < 1:
        raise ValueError("attempts_made counts the attempt just made: at least 1")
    status = result.http_status
    if status is not None and not result.refused and is_success(status):
        return Outcome.DELIVERED, None
    if not is_transient(result) and attempts_made >= policy.max_client_error_attempts:
        return Outcome.PARKED, None
    wait_s = backoff_s(attempts_made, policy, rand)
    asked_s = result.retry_after_s
    if asked_s is not None and asked_s > wait_s:  # False for NaN: an unreadable value asks nothing
        wait_s = asked_s  # never sooner than the receiver asked; past the window's end, parked below
    deadline = created_at + policy.window
    if (deadline - now).total_seconds() < wait_s:
        return Outcome.PARKED, None
    return Outcome.RETRY, now + timedelta(seconds=wait_s)
