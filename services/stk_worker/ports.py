"""Where the worker meets the outside: the claims store, Daraja, the channels' credentials, the
event publisher and time. The Pusher and Querier depend on these Protocols only; the adapters are
PostgresClaims, DarajaClient, VaultChannels, EventProducer and SystemClock, and tests pass fakes
(tests/stk_worker/fakes.py) through the same bootstrap."""
from __future__ import annotations

import asyncio
import time
from typing import Protocol

from services.common.kafka import Publisher
from services.daraja.models import AppCredentials, PushAccepted, QueryResult, Shortcode, StkPushRequest
from services.stk_worker.channels import ChannelAccess
from services.stk_worker.claims import HeldBy, PushOutcome

__all__ = ["Channels", "Claims", "Clock", "Daraja", "Publisher", "SystemClock"]


class Claims(Protocol):
    """At most one push per payment: a claim is taken before Daraja is called (docs/stk-worker.md)."""

    owner: str  # this worker process, as claims and heartbeats name it

    async def claim(self, payment_id: str, channel_id: str, credential_version: int) -> PushOutcome | HeldBy | None:
        """None: the push is ours to make. A PushOutcome: what was recorded earlier. HeldBy: another
        process holds the claim and has not recorded an answer (yet)."""
        ...

    async def finish(self, payment_id: str, outcome: PushOutcome) -> None:
        """Records Daraja's answer on this process's claim."""
        ...

    async def release(self, payment_id: str) -> None:
        """Gives back this process's claim of a push it never sent."""
        ...

    async def give_up_on(self, payment_id: str, owner: str | None) -> PushOutcome | None:
        """Marks `owner`'s unfinished claim outcome unknown (its process is gone); returns what the
        claim holds afterwards, or None if it was released or is held by someone else now."""
        ...

    async def beat(self) -> None:
        """This process is alive (registers it on the first beat)."""
        ...

    async def heartbeat_of(self, owner: str) -> int | None:
        """The owner's heartbeat count, None if no such process ever beat."""
        ...

    async def credential_version(self, payment_id: str) -> int | None: ...


class Daraja(Protocol):
    """STK push and query; raises services.daraja.errors.DarajaError classified by ErrorKind."""

    async def push(self, app: AppCredentials, shortcode: Shortcode, request: StkPushRequest) -> PushAccepted: ...

    async def query(self, app: AppCredentials, shortcode: Shortcode, checkout_request_id: str) -> QueryResult: ...


class Channels(Protocol):
    async def current(self, channel_id: str) -> ChannelAccess | None: ...

    async def at_version(self, channel_id: str, version: int) -> ChannelAccess | None: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
