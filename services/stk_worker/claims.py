"""The durable push claim (PostgreSQL adapter of the Claims port): written before Daraja is called,
finished with Daraja's answer, owned by one worker process whose heartbeat says it still lives."""
from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool


class ClaimStatus(enum.StrEnum):
    CLAIMED = "claimed"    # a worker is pushing (or about to): nobody else may
    ACCEPTED = "accepted"  # Daraja accepted: the CheckoutRequestID is recorded
    REFUSED = "refused"    # Daraja refused, or retries ran out on answers it did not act on
    UNKNOWN = "unknown"    # the push may have reached Daraja: reconciled by callback and STK query
    INVALID = "invalid"    # never pushed: the request or the channel cannot be pushed
    RELEASED = "released"  # given back before anything was sent: the next owner pushes it


@dataclass(frozen=True)
class PushOutcome:
    status: ClaimStatus
    merchant_request_id: str | None = None
    checkout_request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0


@dataclass(frozen=True)
class HeldBy:
    """A claim another worker process holds and has not finished; `owner` None for claims written
    before owners were recorded (migration 0013)."""
    owner: str | None


_FIELDS = "status, merchant_request_id, checkout_request_id, error_code, error_message, attempts, owner"


def _seen(row: tuple[Any, ...]) -> PushOutcome | HeldBy | None:
    status = ClaimStatus(row[0])
    if status in (ClaimStatus.CLAIMED, ClaimStatus.RELEASED):
        return HeldBy(row[6])
    return PushOutcome(status, *row[1:6])


Call = TypeVar("Call")
Result = TypeVar("Result")


class Coalesced(Generic[Call, Result]):
    """Calls for distinct payments made while the previous statement runs (or in the same turn of
    the event loop) go to PostgreSQL together, as one statement. A statement's cost on this side
    (psycopg, the pool, the event loop) is about the same for one row as for a hundred, and each
    push makes two (claim and finish): one at a time, they were most of the worker's CPU per push.
    A second call for a payment already waiting goes in the next statement, so no statement names
    a payment twice. A statement of several that fails for anything but an outage (a value psycopg
    or PostgreSQL refuses, say) is made again call by call: one bad row fails only its own call."""

    def __init__(self, run: Callable[[list[Call]], Awaitable[list[Result]]]):
        self._run = run
        self._waiting: dict[str, tuple[Call, asyncio.Future[Result]]] = {}
        self._later: list[tuple[str, Call, asyncio.Future[Result]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def __call__(self, payment_id: str, call: Call) -> Result:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Result] = loop.create_future()
        if payment_id in self._waiting:
            self._later.append((payment_id, call, answer))
        else:
            self._waiting[payment_id] = (call, answer)
        if self._flushing is None:
            self._flushing = loop.create_task(self._flush())
        return await answer

    async def _flush(self) -> None:
        batch: list[tuple[Call, asyncio.Future[Result]]] = []
        try:
            while self._waiting:
                batch, self._waiting = list(self._waiting.values()), {}
                later, self._later = self._later, []
                for payment_id, call, answer in later:
                    if payment_id in self._waiting:
                        self._later.append((payment_id, call, answer))
                    else:
                        self._waiting[payment_id] = (call, answer)
                await self._answer(batch)
        except BaseException:  # cancelled (the loop is closing): nobody is left waiting for ever
            for _, answer in [*batch, *self._waiting.values(), *((a, b) for _, a, b in self._later)]:
                answer.cancel()
            raise
        finally:
            self._flushing = None

    async def _answer(self, batch: list[tuple[Call, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._run([call for call, _ in batch])
        except Exception as exc:
            if len(batch) > 1 and not _outage(exc):
                for one in batch:
                    await self._answer([one])
                return
            for _, answer in batch:
                if not answer.done():  # its caller may have been cancelled
                    answer.set_exception(exc)
            return
        for (_, answer), result in zip(batch, results, strict=True):
            if not answer.done():
                answer.set_result(result)


def database_unavailable(exc: BaseException) -> bool:
    """PostgreSQL cannot serve us now (down, restarting, connection closed, pool exhausted,
    statement cancelled): trying the same statement later will work. A statement beyond one of
    PostgreSQL's limits (SQLSTATE class 54: too complex, too many columns or arguments) fails again
    however often it is tried, though psycopg makes it an OperationalError too."""
    if isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("54"):
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


def _outage(exc: Exception) -> bool:
    """PostgreSQL is down or slow (connection lost, pool exhausted, statement cancelled): the calls
    one by one would only fail the same way, each after its own wait. A deadlock with another
    worker's statement counts too: every call is retried, none pushed twice (the claim decides)."""
    return database_unavailable(exc)


class PostgresClaims:
    """`owner` names this worker process; `beat` keeps its heartbeat row alive. Claims and finishes
    of many payments at once are made together (Coalesced)."""

    def __init__(self, pool: AsyncConnectionPool, owner: str):
        self.pool = pool
        self.owner = owner
        self._claims: Coalesced[tuple[str, str, int], PushOutcome | HeldBy | None] = Coalesced(self._claim_many)
        self._finishes: Coalesced[tuple[str, PushOutcome], None] = Coalesced(self._finish_many)

    async def claim(self, payment_id: str, channel_id: str, credential_version: int) -> PushOutcome | HeldBy | None:
        return await self._claims(payment_id, (payment_id, channel_id, credential_version))

    async def finish(self, payment_id: str, outcome: PushOutcome) -> None:
        await self._finishes(payment_id, (payment_id, outcome))

    async def _claim_many(self, calls: list[tuple[str, str, int]]) -> list[PushOutcome | HeldBy | None]:
        ids = [payment_id for payment_id, _, _ in calls]
        async with self.pool.connection() as conn:
            # Ours: a new claim, a released one (nothing was sent), or one this very process wrote
            # in an attempt that failed before pushing (the Pusher knows it sent nothing: a push it
            # sent stays in its hand until recorded, and it never claims twice meanwhile). In the
            # payments' order, so that two workers claiming the same ones wait rather than deadlock.
            cur = await conn.execute(
                "INSERT INTO stk_push_claims (payment_id, channel_id, status, credential_version, owner)"
                " SELECT p, c, 'claimed', v, %s FROM unnest(%s::text[], %s::text[], %s::int[]) AS t(p, c, v)"
                " ORDER BY p ON CONFLICT (payment_id) DO UPDATE"
                " SET status = 'claimed', owner = EXCLUDED.owner, credential_version = EXCLUDED.credential_version,"
                " claimed_at = now(), finished_at = NULL"
                " WHERE stk_push_claims.status = 'released'"
                " OR (stk_push_claims.status = 'claimed' AND stk_push_claims.owner = EXCLUDED.owner)"
                " RETURNING payment_id",
                (self.owner, ids, [c for _, c, _ in calls], [v for _, _, v in calls]))
            ours = {row[0] for row in await cur.fetchall()}
            seen: dict[str, PushOutcome | HeldBy | None] = {}
            if len(ours) < len(ids):
                cur = await conn.execute(f"SELECT payment_id, {_FIELDS} FROM stk_push_claims"
                                         " WHERE payment_id = ANY(%s)", ([p for p in ids if p not in ours],))
                seen = {row[0]: _seen(row[1:]) for row in await cur.fetchall()}
        return [None if payment_id in ours else seen.get(payment_id) for payment_id in ids]

    async def _finish_many(self, calls: list[tuple[str, PushOutcome]]) -> list[None]:
        outcomes = [outcome for _, outcome in calls]
        # 'unknown' too: a worker that judged this process dead (its heartbeat was not seen to move)
        # wrote it; the answer Daraja gave is better than that guess, and the ledger takes it.
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE stk_push_claims AS c SET status = f.status, merchant_request_id = f.merchant_request_id,"
                " checkout_request_id = f.checkout_request_id, error_code = f.error_code,"
                " error_message = f.error_message, attempts = f.attempts, finished_at = now()"
                " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int[])"
                " AS f(payment_id, status, merchant_request_id, checkout_request_id, error_code, error_message,"
                " attempts)"
                " WHERE c.payment_id = f.payment_id AND c.owner = %s AND c.status IN ('claimed', 'unknown')",
                ([payment_id for payment_id, _ in calls], [o.status.value for o in outcomes],
                 [o.merchant_request_id for o in outcomes], [o.checkout_request_id for o in outcomes],
                 [o.error_code for o in outcomes], [o.error_message for o in outcomes],
                 [o.attempts for o in outcomes], self.owner))
        return [None] * len(calls)

    async def release(self, payment_id: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE stk_push_claims SET status = 'released', finished_at = now()"
                               " WHERE payment_id = %s AND owner = %s AND status = 'claimed'",
                               (payment_id, self.owner))

    async def give_up_on(self, payment_id: str, owner: str | None) -> PushOutcome | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE stk_push_claims SET status = 'unknown', finished_at = now(),"
                " error_message = 'the worker stopped while the push was in flight'"
                " WHERE payment_id = %s AND status = 'claimed' AND owner IS NOT DISTINCT FROM %s"
                f" RETURNING {_FIELDS}", (payment_id, owner))
            row = await cur.fetchone()
            if row is None:  # finished or released meanwhile
                cur = await conn.execute(f"SELECT {_FIELDS} FROM stk_push_claims WHERE payment_id = %s",
                                         (payment_id,))
                row = await cur.fetchone()
        seen = None if row is None else _seen(row)
        return seen if isinstance(seen, PushOutcome) else None

    async def beat(self) -> None:
        try:
            await self._beat()
        except psycopg.OperationalError:
            # A PostgreSQL restart leaves the pool's idle connections broken, each failing once when
            # next used. Beats taking them one at a time, 2 s apart, could stay silent longer than
            # other workers wait before judging this one gone: clear them all, then beat again.
            await self.pool.check()
            await self._beat()

    async def _beat(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO stk_worker_instances (instance_id) VALUES (%s) ON CONFLICT (instance_id)"
                " DO UPDATE SET beats = stk_worker_instances.beats + 1, beat_at = now()", (self.owner,))

    async def heartbeat_of(self, owner: str) -> int | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT beats FROM stk_worker_instances WHERE instance_id = %s", (owner,))
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def credential_version(self, payment_id: str) -> int | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT credential_version FROM stk_push_claims WHERE payment_id = %s",
                                     (payment_id,))
            row = await cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])
