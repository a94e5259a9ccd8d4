"""The retry schedule as a specification: what ends a delivery, what is retried, how long, how often."""
import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from services.notifier.schedule import AttemptResult, Outcome, RetryPolicy, decide

CREATED = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
POLICY = RetryPolicy()
DEADLINE = CREATED + POLICY.window


def answer(status: int | None, retry_after_s: float | None = None, refused: bool = False) -> AttemptResult:
    return AttemptResult(status, 12.5, None if status is not None and 200 <= status < 300 else "failed",
                         retry_after_s, refused=refused)


def wait_s(outcome: tuple[Outcome, datetime | None], now: datetime) -> float:
    verdict, next_at = outcome
    assert verdict is Outcome.RETRY and next_at is not None, outcome
    return (next_at - now).total_seconds()


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_a_2xx_delivers_and_schedules_nothing(status):
    assert decide(answer(status), 1, CREATED, CREATED, POLICY) == (Outcome.DELIVERED, None)
    assert decide(answer(status), 500, CREATED, DEADLINE, POLICY) == (Outcome.DELIVERED, None)


@pytest.mark.parametrize("status", [None, 429, 500, 502, 503, 504, 599])
def test_no_answer_a_429_and_a_5xx_are_retried_for_the_whole_window(status):
    now = CREATED + timedelta(days=2, hours=23)
    outcome = decide(answer(status), 200, CREATED, now, POLICY, rand=lambda: 0.0)
    assert wait_s(outcome, now) == POLICY.max_backoff_s / 2


@pytest.mark.parametrize("status", [300, 301, 302, 307, 308, 400, 401, 403, 404, 408, 410, 422, 100, 600, 999])
def test_other_answers_are_tried_a_few_times_then_parked(status):
    for attempts in range(1, POLICY.max_client_error_attempts):
        assert decide(answer(status), attempts, CREATED, CREATED, POLICY)[0] is Outcome.RETRY
    assert decide(answer(status), POLICY.max_client_error_attempts, CREATED, CREATED, POLICY) == (Outcome.PARKED, None)


def test_a_refused_destination_is_parked_like_a_client_error_and_a_connection_error_is_not():
    attempts = POLICY.max_client_error_attempts
    assert decide(answer(None, refused=True), attempts - 1, CREATED, CREATED, POLICY)[0] is Outcome.RETRY
    assert decide(answer(None, refused=True), attempts, CREATED, CREATED, POLICY) == (Outcome.PARKED, None)
    assert decide(answer(None), attempts, CREATED, CREATED, POLICY)[0] is Outcome.RETRY


def test_the_back_off_doubles_from_the_first_wait_up_to_the_cap_with_half_of_it_random():
    lowest = [wait_s(decide(answer(500), n, CREATED, CREATED, POLICY, rand=lambda: 0.0), CREATED) for n in range(1, 13)]
    highest = [wait_s(decide(answer(500), n, CREATED, CREATED, POLICY, rand=lambda: 1.0), CREATED)
               for n in range(1, 13)]
    assert highest == [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
    assert lowest == [h / 2 for h in highest]


def test_a_random_source_outside_zero_to_one_neither_shortens_nor_stretches_the_wait():
    assert wait_s(decide(answer(500), 1, CREATED, CREATED, POLICY, rand=lambda: -5.0), CREATED) == 2.5
    assert wait_s(decide(answer(500), 1, CREATED, CREATED, POLICY, rand=lambda: 7.0), CREATED) == 5.0


def test_retry_after_is_honoured_when_it_asks_for_more_than_the_back_off():
    assert wait_s(decide(answer(429, retry_after_s=600.0), 1, CREATED, CREATED, POLICY), CREATED) == 600.0
    assert wait_s(decide(answer(503, retry_after_s=1.0), 1, CREATED, CREATED, POLICY, rand=lambda: 1.0),
                  CREATED) == 5.0
    # A client error's Retry-After counts too: never sooner than asked.
    assert wait_s(decide(answer(404, retry_after_s=90.0), 1, CREATED, CREATED, POLICY), CREATED) == 90.0


def test_a_retry_after_past_the_window_parks_rather_than_retrying_sooner_than_asked():
    now = DEADLINE - timedelta(hours=1)
    assert decide(answer(503, retry_after_s=2 * 3600.0), 3, CREATED, now, POLICY) == (Outcome.PARKED, None)
    assert decide(answer(503, retry_after_s=1800.0), 3, CREATED, now, POLICY)[0] is Outcome.RETRY


def test_an_unreadable_retry_after_value_is_ignored():
    for value in (float("nan"), float("-inf"), -60.0):
        assert wait_s(decide(answer(503, retry_after_s=value), 1, CREATED, CREATED, POLICY, rand=lambda: 0.0),
                      CREATED) == 2.5
    assert decide(answer(503, retry_after_s=float("inf")), 1, CREATED, CREATED, POLICY) == (Outcome.PARKED, None)


def test_a_delivery_is_parked_once_its_next_attempt_would_fall_after_the_window():
    assert decide(answer(500), 80, CREATED, DEADLINE - timedelta(seconds=1799), POLICY, rand=lambda: 0.0) == \
        (Outcome.PARKED, None)
    outcome = decide(answer(500), 80, CREATED, DEADLINE - timedelta(seconds=1800), POLICY, rand=lambda: 0.0)
    assert outcome == (Outcome.RETRY, DEADLINE)
    assert decide(answer(500), 1, CREATED, DEADLINE + timedelta(seconds=1), POLICY) == (Outcome.PARKED, None)


def test_failing_for_three_days_takes_between_one_and_two_attempts_an_hour_then_parks():
    rng = random.Random(13)
    now, attempts = CREATED, 0
    while True:
        attempts += 1
        verdict, next_at = decide(answer(None), attempts, CREATED, now, POLICY, rand=rng.random)
        if verdict is Outcome.PARKED:
            break
        assert next_at is not None and now < next_at <= DEADLINE
        now = next_at
    assert DEADLINE - now < timedelta(hours=1)  # the last attempt came within the back-off cap of the end
    # 72 hours at 30 to 60 minutes apart, plus the first short waits: 81 (every draw 1) to 153 (every draw 0).
    assert 81 <= attempts <= 153


def test_the_attempt_just_made_is_counted():
    with pytest.raises(ValueError, match="at least 1"):
        decide(answer(500), 0, CREATED, CREATED, POLICY)


@pytest.mark.parametrize("fields", [
    {"window": timedelta(0)}, {"max_client_error_attempts": 0}, {"first_backoff_s": 0.0},
    {"first_backoff_s": 10.0, "max_backoff_s": 5.0}, {"max_backoff_s": float("inf")},
    {"first_backoff_s": float("nan")},
])
def test_a_policy_that_cannot_work_is_refused(fields):
    with pytest.raises(ValueError):
        RetryPolicy(**fields)


statuses = st.one_of(st.none(), st.integers(100, 999))
retry_afters = st.one_of(st.none(), st.floats(0, 10 * 86400, allow_nan=False))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(status=statuses, retry_after_s=retry_afters, refused=st.booleans(), attempts=st.integers(1, 10**6),
       elapsed_s=st.floats(0, 4 * 86400, allow_nan=False), draw=st.floats(0, 1))
def test_every_retry_is_within_the_window_after_the_back_off_and_any_retry_after(status, retry_after_s, refused,
                                                                                 attempts, elapsed_s, draw):
    result = AttemptResult(status, 1.0, None, retry_after_s, refused=refused)
    now = CREATED + timedelta(seconds=elapsed_s)
    verdict, next_at = decide(result, attempts, CREATED, now, POLICY, rand=lambda: draw)
    delivered = status is not None and 200 <= status <= 299 and not refused
    assert (verdict is Outcome.DELIVERED) == delivered
    transient = not refused and (status is None or status == 429 or 500 <= status <= 599)
    if not delivered and not transient and attempts >= POLICY.max_client_error_attempts:
        assert verdict is Outcome.PARKED
    if verdict is not Outcome.RETRY:
        assert next_at is None
        return
    assert next_at is not None and next_at <= DEADLINE
    waited_s = (next_at - now).total_seconds()
    assert waited_s >= POLICY.first_backoff_s / 2 - 1e-6
    assert waited_s >= (retry_after_s or 0.0) - 1e-6
    assert waited_s <= max(POLICY.max_backoff_s, retry_after_s or 0.0) + 1e-6
