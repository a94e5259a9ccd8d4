"""The consumer loop's background commits: at most one per commit_interval_s, the first at once
(no broker: the commit itself is caught before it reaches the client)."""
from __future__ import annotations

from types import SimpleNamespace

from confluent_kafka import TopicPartition

from services.common import kafka
from services.common.kafka import ConsumerLoop


async def _no_handler(events):
    return []


async def test_the_first_commit_goes_at_once_and_the_next_waits_for_the_interval(monkeypatch):
    # Monotonic time counts from the host's boot: a loop that took its last commit to be "at 0" held
    # the first one back for the rest of the interval on a machine up for less than it (a test with
    # an interval of an hour failed that way on a machine booted 50 minutes before).
    now = [5.0]
    monkeypatch.setattr(kafka, "time", SimpleNamespace(monotonic=lambda: now[0]))
    loop = ConsumerLoop(bootstrap="127.0.0.1:1", group_id="g-commit-interval", topics=[], codec=None,  # type: ignore[arg-type]
                        handler=_no_handler, dead_letters=None, commit_interval_s=3600)  # type: ignore[arg-type]
    sent: list[list[TopicPartition]] = []
    monkeypatch.setattr(loop, "_committable", lambda only=None: [TopicPartition("t", 0, 7)])
    monkeypatch.setattr(loop._thread, "submit", lambda fn, **kwargs: sent.append(kwargs["offsets"]))
    try:
        loop._commit_in_background()
        assert loop._commit_timer is None and len(sent) == 1  # at once

        now[0] = 6.0
        loop._commit_in_background()
        assert loop._commit_timer is not None and len(sent) == 1  # due an hour after the first
    finally:
        if loop._commit_timer is not None:
            loop._commit_timer.cancel()
        loop._thread.shutdown()
        loop._consumer.close()
