"""Fakes of the notifier's ports: a sender that answers as told, secrets that are just there, and a
sink that records what the dispatcher would write."""
from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from services.notifier.deliveries import Delivery, Endpoint
from services.notifier.schedule import AttemptResult
from services.notifier.store import Finished

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)


@dataclass
class FakeSender:
    """Answers `status_by_url` (200 by default); an URL in `gates` waits until its gate opens.
    Records every call in order, and the most calls in flight at once per URL."""
    status_by_url: dict[str, int] = field(default_factory=dict)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    sent: list[tuple[str, str]] = field(default_factory=list)  # (url, webhook_id) as each attempt began
    in_flight: dict[str, int] = field(default_factory=dict)
    most_in_flight: dict[str, int] = field(default_factory=dict)

    async def send(self, url: str, webhook_id: str, body: str, secrets: Sequence[str]) -> AttemptResult:
        assert secrets, "never unsigned"
        self.sent.append((url, webhook_id))
        self.in_flight[url] = self.in_flight.get(url, 0) + 1
        self.most_in_flight[url] = max(self.most_in_flight.get(url, 0), self.in_flight[url])
        try:
            if url in self.gates:
                await self.gates[url].wait()
            else:
                await asyncio.sleep(0)
        finally:
            self.in_flight[url] -= 1
        status = self.status_by_url.get(url, 200)
        return AttemptResult(status, 1.0, None if status < 300 else f"HTTP {status}", None)

    async def close(self) -> None:
        pass

    def ids_sent_to(self, url: str) -> list[str]:
        return [webhook_id for u, webhook_id in self.sent if u == url]


class StaticSecrets:
    async def for_endpoint(self, endpoint: Endpoint) -> list[str]:
        return ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]


@dataclass
class RecordingSink:
    results: list[Finished] = field(default_factory=list)
    releases: list[int] = field(default_factory=list)

    def finished(self, result: Finished, endpoint_id: str, succeeded: bool | None) -> None:
        self.results.append(result)

    def released(self, delivery_ids: Iterable[int]) -> None:
        self.releases.extend(delivery_ids)

    def finishing(self, delivery_id: int) -> bool:
        return any(r.delivery_id == delivery_id and r.state != "pending" for r in self.results)

    def states(self) -> dict[int, str]:
        return {r.delivery_id: r.state for r in self.results}


def endpoint(name: str, channel: str = "ch") -> Endpoint:
    return Endpoint(f"ep_{name}", channel, f"http://127.0.0.1/{name}", frozenset({"payment.pending"}))


def delivery(id: int, endpoint_id: str, payment_id: str, seconds: float = 0, attempts: int = 0) -> Delivery:
    return Delivery(id, f"wh-{id}", endpoint_id, payment_id, T0 + timedelta(seconds=seconds), "{}", attempts, T0)


async def met(value: bool) -> bool:
    """For `eventually`, which polls an async check: `eventually(lambda: met(len(x) == 3))`."""
    return value
