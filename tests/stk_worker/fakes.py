"""In-memory stand-ins for the STK worker's ports (services/stk_worker/ports.py), for tests that
need no broker, database or simulator."""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from services.common.kafka import PublishError
from services.common.topics import Topic
from services.daraja.errors import DarajaError, ErrorKind
from services.daraja.models import AppCredentials, PushAccepted, QueryResult, Shortcode, StkPushRequest
from services.stk_worker.channels import ChannelAccess
from services.stk_worker.claims import ClaimStatus, HeldBy, PushOutcome


@dataclass
class ClaimRow:
    channel_id: str
    owner: str | None
    credential_version: int | None
    status: ClaimStatus = ClaimStatus.CLAIMED
    outcome: PushOutcome | None = None


class FakeClaims:
    """The PostgreSQL claims' rules, in a dict. `down` makes every call fail as a database outage
    does; `fail_finishes` fails that many next finish() calls only; `finishes_wait_for` holds every
    finish() until the event is set."""

    def __init__(self, owner: str = "worker-a", rows: dict[str, ClaimRow] | None = None,
                 beats: dict[str, int] | None = None):
        self.owner = owner
        self.rows: dict[str, ClaimRow] = {} if rows is None else rows  # shared by two workers' fakes
        self.beats: dict[str, int] = {} if beats is None else beats
        self.down = False
        self.fail_finishes = 0
        self.finishes_wait_for: asyncio.Event | None = None
        self.finish_calls = 0

    def for_owner(self, owner: str) -> FakeClaims:
        """Another worker process on the same database."""
        return FakeClaims(owner, self.rows, self.beats)

    def _check(self) -> None:
        if self.down:
            raise psycopg.OperationalError("connection failed: server closed the connection unexpectedly")

    async def claim(self, payment_id: str, channel_id: str, credential_version: int) -> PushOutcome | HeldBy | None:
        self._check()
        row = self.rows.get(payment_id)
        if row is None or row.status is ClaimStatus.RELEASED or (
                row.status is ClaimStatus.CLAIMED and row.owner == self.owner):
            self.rows[payment_id] = ClaimRow(channel_id, self.owner, credential_version)
            return None
        return HeldBy(row.owner) if row.status is ClaimStatus.CLAIMED else row.outcome

    async def finish(self, payment_id: str, outcome: PushOutcome) -> None:
        self._check()
        self.finish_calls += 1
        if self.finishes_wait_for is not None:  # a database that does not answer (a pool waiting to connect)
            await self.finishes_wait_for.wait()
        if self.fail_finishes:
            self.fail_finishes -= 1
            raise psycopg.OperationalError("terminating connection due to administrator command")
        row = self.rows[payment_id]
        if row.owner == self.owner and row.status in (ClaimStatus.CLAIMED, ClaimStatus.UNKNOWN):
            row.status, row.outcome = outcome.status, outcome

    async def release(self, payment_id: str) -> None:
        self._check()
        row = self.rows[payment_id]
        if row.owner == self.owner and row.status is ClaimStatus.CLAIMED:
            row.status = ClaimStatus.RELEASED

    async def give_up_on(self, payment_id: str, owner: str | None) -> PushOutcome | None:
        self._check()
        row = self.rows[payment_id]
        if row.status is ClaimStatus.CLAIMED and row.owner == owner:
            row.status = ClaimStatus.UNKNOWN
            row.outcome = PushOutcome(ClaimStatus.UNKNOWN,
                                      error_message="the worker stopped while the push was in flight")
        return row.outcome if row.status not in (ClaimStatus.CLAIMED, ClaimStatus.RELEASED) else None

    async def beat(self) -> None:
        self._check()
        self.beats[self.owner] = self.beats.get(self.owner, -1) + 1

    async def heartbeat_of(self, owner: str) -> int | None:
        self._check()
        return self.beats.get(owner)

    async def credential_version(self, payment_id: str) -> int | None:
        self._check()
        row = self.rows.get(payment_id)
        return None if row is None else row.credential_version


def accepted(n: int = 1) -> PushAccepted:
    return PushAccepted(f"mr-{n}", f"ws_CO_{n}", "0", "Success. Request accepted for processing")


def daraja_error(kind: ErrorKind, code: str | None = None, retry_after_s: float | None = None) -> DarajaError:
    return DarajaError(kind, "stk_push", f"scripted {kind.value}", error_code=code, http_status=500,
                       retry_after_s=retry_after_s)


Answer = PushAccepted | QueryResult | BaseException


class ScriptedDaraja:
    """Answers each call with the next of its script (an answer, or an exception to raise) and logs
    the calls. `during_push` runs inside each push, e.g. to stop the worker while it is in flight."""

    def __init__(self, pushes: list[Answer] | None = None, queries: list[Answer] | None = None):
        self.push_script = list(pushes or [])
        self.query_script = list(queries or [])
        self.pushes: list[StkPushRequest] = []
        self.queries: list[str] = []
        self.during_push: Callable[[], Any] | None = None

    async def push(self, app: AppCredentials, shortcode: Shortcode, request: StkPushRequest) -> PushAccepted:
        self.pushes.append(request)
        if self.during_push:
            self.during_push()
        await asyncio.sleep(0)
        answer = self.push_script.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, PushAccepted)
        return answer

    async def query(self, app: AppCredentials, shortcode: Shortcode, checkout_request_id: str) -> QueryResult:
        self.queries.append(checkout_request_id)
        answer = self.query_script.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, QueryResult)
        return answer


class RecordingPublisher:
    """Records what is published; `refusals` makes that many next publishes fail as Kafka not
    acknowledging them would."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.refusals = 0

    async def publish(self, topic: Topic, record: dict[str, Any]) -> None:
        if self.refusals:
            self.refusals -= 1
            raise PublishError("not acknowledged")
        self.published.append((topic.name, record))

    def records(self, topic: Topic) -> list[dict[str, Any]]:
        return [r for name, r in self.published if name == topic.name]


class FakeClock:
    """Time moves only when someone sleeps; every sleep is logged."""

    def __init__(self, start: float = 1000.0):
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class FakeChannels:
    channels: dict[str, ChannelAccess] = field(default_factory=dict)

    def add(self, channel_id: str, **changes: Any) -> ChannelAccess:
        base = ChannelAccess(channel_id, True, Shortcode("174379"), AppCredentials("key", "secret", "passkey"), 1,
                             max_amount=5000)
        self.channels[channel_id] = dataclasses.replace(base, **changes)
        return self.channels[channel_id]

    async def current(self, channel_id: str) -> ChannelAccess | None:
        return self.channels.get(channel_id)

    async def at_version(self, channel_id: str, version: int) -> ChannelAccess | None:
        channel = self.channels.get(channel_id)
        if channel is None or channel.version == version:
            return channel
        return dataclasses.replace(channel, version=version)
