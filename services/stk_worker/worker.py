"""The STK worker's two jobs: push each payment request to Daraja at most once, and answer the
ledger's STK query requests. A push whose outcome is unknown is reconciled by callback and STK
query, never pushed again (docs/stk-worker.md). It reports what happened; only the ledger decides
states."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from services.channels.vault import VaultError
from services.common.callback_token import callback_url
from services.common.kafka import ConsumedEvent, Publisher, PublishError, new_event_fields
from services.common.payment import event_problem, mask_phones_in
from services.common.text import untrusted
from services.common.topics import STK_PUSH_RESULT, STK_QUERY_RESULT
from services.daraja.errors import DarajaError, ErrorKind
from services.daraja.models import PushAccepted, QueryStatus, StkPushRequest
from services.stk_worker.channels import ChannelAccess
from services.stk_worker.claims import ClaimStatus, HeldBy, PushOutcome, database_unavailable
from services.stk_worker.errors import AnswerNotRecorded, Interrupted, OwnerBusy
from services.stk_worker.ports import Channels, Claims, Clock, Daraja, SystemClock
from services.stk_worker.throttle import ShortcodeThrottle

log = logging.getLogger(__name__)
PUSHES = Counter("stk_pushes_total", "STK push outcomes", ["outcome"])
QUERIES = Counter("stk_queries_total", "STK query outcomes", ["status"])
REPORTED_EARLY = Counter("stk_push_results_reported_before_recorded_total",
                         "Daraja's answers published while the database could not record them")
SPIKE_ARREST = "500.003.02"
QUERY_STATUS = {QueryStatus.FINAL_SUCCESS: "SUCCESS", QueryStatus.FINAL_FAILURE: "FAILED",
                QueryStatus.STILL_PROCESSING: "PROCESSING"}
RESULT_OUTCOME = {ClaimStatus.ACCEPTED: "ACCEPTED", ClaimStatus.REFUSED: "REFUSED",
                  ClaimStatus.UNKNOWN: "OUTCOME_UNKNOWN", ClaimStatus.INVALID: "INVALID"}


Push = tuple[ChannelAccess, StkPushRequest]


@dataclass(frozen=True)
class PushSettings:
    public_base_url: str
    token_secret: bytes
    max_attempts: int = 4
    backoff_s: float = 0.5
    # A claim's owner is gone once its heartbeat (every few seconds) was seen standing still this long.
    owner_silent_s: float = 15.0
    # A live owner's push (Daraja's read timeout, retries) is waited on this long, then the event is
    # retried later rather than holding its batch.
    owner_wait_max_s: float = 60.0
    owner_poll_s: float = 0.5
    store_backoff_max_s: float = 2.0  # a failed try is cheap; the end of an outage is noticed within this
    # A record not done by then is waiting on a database that may not come back before this process
    # dies (its pool waits for a connection rather than failing): the answer is reported meanwhile.
    report_early_after_s: float = 1.0
    # After a stop, how long Daraja's answers still in hand are offered to PostgreSQL.
    stop_grace_s: float = 20.0


@dataclass
class OwnerWatch:
    """Whether the process holding a claim is gone: only once its heartbeat was seen standing still
    for `silent_s` of our own watching. A database outage stops every heartbeat, so how old a beat
    is says nothing; a live owner's beat moves again as soon as the database is back."""
    silent_s: float
    owner: str | None = None
    beats: int | None = None
    since: float = field(default=0.0)

    def gone(self, owner: str | None, beats: int | None, now: float) -> bool:
        if owner is None or beats is None:  # a claim from before owners (0013), or an owner never seen
            return True
        if (owner, beats) != (self.owner, self.beats):
            self.owner, self.beats, self.since = owner, beats, now
            return False
        return now - self.since >= self.silent_s


async def pause(clock: Clock, stop: asyncio.Event, seconds: float) -> None:
    """Sleeps, unless the worker is stopping: raises Interrupted at once when `stop` is set."""
    if not stop.is_set():
        sleeper = asyncio.ensure_future(clock.sleep(seconds))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()
    if stop.is_set():
        raise Interrupted("the worker is stopping")


class Pusher:
    """Pushes each payment at most once: claim, push, record Daraja's answer, then report it."""

    def __init__(self, claims: Claims, daraja: Daraja, channels: Channels, publisher: Publisher,
                 throttle: ShortcodeThrottle, settings: PushSettings, *, clock: Clock | None = None,
                 stop: asyncio.Event | None = None):
        self.claims, self.daraja, self.channels, self.publisher = claims, daraja, channels, publisher
        self.throttle, self.settings = throttle, settings
        self.clock = clock or SystemClock()
        self.stop = stop or asyncio.Event()
        # This process's pushes, by payment, until recorded: a duplicate of the event waits for the
        # same answer. A payment stays in hand for good if Daraja may have acted on a push of it whose
        # answer was not stored: this process never claims it again.
        self._in_hand: dict[str, asyncio.Future[PushOutcome]] = {}
        self._unrecorded: set[str] = set()  # sent, and Daraja may have acted on it; answer not stored
        self._reported_early: set[str] = set()  # published while the database could not record them

    async def handle(self, event: ConsumedEvent) -> None:
        v = event.value
        try:
            outcome = await self._decide(v)  # recorded before anything else can fail
        except AnswerNotRecorded as exc:
            # PostgreSQL did not take Daraja's answer before the stop, Kafka may: reported, the ledger
            # has the CheckoutRequestID its query needs (the claim's later "unknown" is a duplicate to it).
            if not self._was_reported_early(v["payment_id"]):
                with contextlib.suppress(PublishError):
                    await self._publish(v, exc.outcome)
            raise
        PUSHES.labels(outcome.status.value).inc()
        if not self._was_reported_early(v["payment_id"]):
            await self._publish(v, outcome)

    def _was_reported_early(self, payment_id: str) -> bool:
        """Once: a redelivery of the event reports the answer again, as for any recorded answer."""
        if payment_id in self._reported_early:
            self._reported_early.discard(payment_id)
            return True
        return False

    async def _decide(self, v: dict[str, Any]) -> PushOutcome:
        problem = event_problem(v)
        if problem:
            return PushOutcome(ClaimStatus.INVALID, error_code="INVALID_REQUEST", error_message=problem)
        try:
            channel = await self.channels.current(v["channel_id"])
        except VaultError as exc:  # nothing was pushed: the payment fails instead of waiting forever
            return await self._unless_pushed(v, PushOutcome(ClaimStatus.INVALID, error_code="CREDENTIALS_UNREADABLE",
                                                            error_message=untrusted(str(exc))))
        if channel is None:
            return await self._unless_pushed(v, PushOutcome(ClaimStatus.INVALID, error_code="CHANNEL_UNKNOWN",
                                                            error_message="no such channel with credentials"))
        refusal = _channel_refusal(channel, v["amount"])
        if refusal:
            return await self._unless_pushed(v, refusal)
        try:
            request = StkPushRequest(
                amount=v["amount"], phone=v["phone"], account_reference=v["account_reference"],
                description=v["description"] or v["account_reference"][:13],
                callback_url=callback_url(self.settings.public_base_url, self.settings.token_secret,
                                          v["channel_id"], v["payment_id"]))
        except ValueError as exc:
            return PushOutcome(ClaimStatus.INVALID, error_code="INVALID_REQUEST", error_message=untrusted(str(exc)))
        return await self._once(v["payment_id"], v["channel_id"], channel.version, (channel, request))

    async def _unless_pushed(self, v: dict[str, Any], refusal: PushOutcome) -> PushOutcome:
        """A refusal by what the channel allows now (suspended, its limit lowered, its credentials
        unreadable, removed) is no answer for a payment pushed already: a redelivered event (its result
        not acknowledged, its partition moved) reports what the push did, or the customer being
        prompted would see the payment fail."""
        payment_id = v["payment_id"]
        in_hand = self._in_hand.get(payment_id)
        if in_hand is not None:  # a duplicate of an event this process is pushing: that push's answer
            return await asyncio.shield(in_hand)
        version = await self.claims.credential_version(payment_id)
        if version is None:  # never claimed: nothing was pushed
            return refusal
        return await self._once(payment_id, v["channel_id"], version, refusal)

    async def _once(self, payment_id: str, channel_id: str, version: int, what: Push | PushOutcome) -> PushOutcome:
        """`what`: the push to make, or the refusal to record if this payment's claim holds no push."""
        in_hand = self._in_hand.get(payment_id)
        if in_hand is None:
            in_hand = asyncio.ensure_future(self._claim_and_push(payment_id, channel_id, version, what))
            self._in_hand[payment_id] = in_hand
            in_hand.add_done_callback(functools.partial(self._forget, payment_id))
        # Shielded: a push in flight is finished and recorded even if this handler is cancelled.
        return await asyncio.shield(in_hand)

    def _forget(self, payment_id: str, done: asyncio.Future[PushOutcome]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved: whoever awaited it has it
        if payment_id not in self._unrecorded:
            del self._in_hand[payment_id]

    async def _claim_and_push(self, payment_id: str, channel_id: str, version: int,
                              what: Push | PushOutcome) -> PushOutcome:
        watch, started = OwnerWatch(self.settings.owner_silent_s), self.clock.monotonic()
        if not isinstance(what, PushOutcome):
            # The shortcode's turn comes before the claim: a claim waiting for its turn would die
            # with a killed worker and be an unknown outcome though nothing was sent (a burst of
            # requests after an outage left a hundred such claims in one fault run).
            channel = what[0]
            await self._turn(channel.shortcode.business_shortcode, channel.pushes_per_second)
        while True:
            seen = await self.claims.claim(payment_id, channel_id, version)
            if seen is None:
                if isinstance(what, PushOutcome):  # released, or ours and unsent: nothing was pushed
                    return await self._record(payment_id, channel_id, what)
                return await self._push_and_record(payment_id, *what)
            if isinstance(seen, PushOutcome):  # redelivered: report what was recorded, never push again
                return seen
            outcome = await self._outcome_of_held(payment_id, seen, watch, started)
            if outcome is not None:
                return outcome

    async def _outcome_of_held(self, payment_id: str, held: HeldBy, watch: OwnerWatch,
                               started: float) -> PushOutcome | None:
        """Another process holds the claim (a rebalance moved the partition, or its worker died):
        wait while it lives, take what it records; unknown only once it is gone."""
        beats = await self.claims.heartbeat_of(held.owner) if held.owner is not None else None
        if watch.gone(held.owner, beats, self.clock.monotonic()):
            outcome = await self.claims.give_up_on(payment_id, held.owner)
            if outcome is not None and outcome.status is ClaimStatus.UNKNOWN:
                log.warning("push of %s: its worker %s is gone, outcome unknown", payment_id, held.owner)
            return outcome
        if self.clock.monotonic() - started >= self.settings.owner_wait_max_s:
            raise OwnerBusy(f"the push of {payment_id} is still in the hands of live worker {held.owner}")
        await pause(self.clock, self.stop, self.settings.owner_poll_s)
        return None

    async def _push_and_record(self, payment_id: str, channel: ChannelAccess, request: StkPushRequest
                               ) -> PushOutcome:
        try:
            outcome = await self._push(payment_id, channel, request)
        except Interrupted:  # nothing was sent: give the push back to whoever consumes the event next
            if not await self._store(functools.partial(self.claims.release, payment_id), "release", payment_id):
                log.warning("push of %s: claim not released; it will be reconciled as unknown", payment_id)
            raise
        await self._record(payment_id, channel.channel_id, outcome)
        self._unrecorded.discard(payment_id)
        return outcome

    async def _record(self, payment_id: str, channel_id: str, outcome: PushOutcome) -> PushOutcome:
        reported = False

        async def report_early() -> None:
            nonlocal reported
            if not reported:
                reported = True
                await self._report_early(payment_id, channel_id, outcome)
        recording = asyncio.ensure_future(self._store(functools.partial(self.claims.finish, payment_id, outcome),
                                                      "record", payment_id, on_first_failure=report_early))
        done, _ = await asyncio.wait({recording}, timeout=self.settings.report_early_after_s)
        if not done:  # not failed, but not done either: a database that does not answer
            await report_early()
        if not await recording:
            log.error("push of %s: Daraja's answer %s (CheckoutRequestID %s) could not be recorded before the "
                      "worker stopped", payment_id, outcome.status.value,
                      mask_phones_in(outcome.checkout_request_id or ""))  # Daraja's ids end in the number
            raise AnswerNotRecorded(payment_id, outcome)
        return outcome

    async def _push(self, payment_id: str, channel: ChannelAccess, request: StkPushRequest) -> PushOutcome:
        code = channel.shortcode.business_shortcode
        for attempt in range(1, self.settings.max_attempts + 1):
            if attempt > 1:  # the first attempt's turn was taken before the claim
                await self._turn(code, channel.pushes_per_second)
            self._unrecorded.add(payment_id)
            try:
                return _accepted(await self.daraja.push(channel.app, channel.shortcode, request), attempt)
            except DarajaError as exc:
                if exc.error_code == SPIKE_ARREST:
                    self.throttle.spike_arrested(code)
                if exc.kind is ErrorKind.OUTCOME_UNKNOWN:
                    return PushOutcome(ClaimStatus.UNKNOWN, error_code=_code(exc.error_code),
                                       error_message=untrusted(str(exc)), attempts=attempt)
                if exc.kind is ErrorKind.PERMANENT or attempt == self.settings.max_attempts:
                    return PushOutcome(ClaimStatus.REFUSED, error_code=_code(exc.error_code) or exc.kind.value,
                                       error_message=untrusted(str(exc)), attempts=attempt)
                # Retryable: Daraja did not act on it, so sending it again cannot prompt twice.
                self._unrecorded.discard(payment_id)
                await pause(self.clock, self.stop, exc.retry_after_s or self.settings.backoff_s
                            * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            except Exception as exc:  # not classified by the client: the request may have gone out
                log.exception("push failed unexpectedly; its outcome is unknown")
                return PushOutcome(ClaimStatus.UNKNOWN, error_code=type(exc).__name__,
                                   error_message=untrusted(str(exc)), attempts=attempt)
        raise AssertionError("unreachable")

    async def _turn(self, shortcode: str, rate_per_s: float | None = None) -> None:
        while (wait_s := self.throttle.take(shortcode, rate_per_s)) > 0:
            await pause(self.clock, self.stop, wait_s)

    async def _report_early(self, payment_id: str, channel_id: str, outcome: PushOutcome) -> None:
        """Daraja's answer goes to the ledger while the database cannot take it. Held only in this
        process's memory, it would die with the process (a deploy, a kill, the OOM killer) and the
        payment could then only wait for its callback: its claim would say outcome unknown, with
        no CheckoutRequestID to query. On Kafka it is durable. The record is still retried; once
        it lands, the handler does not report the answer a second time (docs/stk-worker.md,
        "Recording the answer")."""
        try:
            await self._publish({"channel_id": channel_id, "payment_id": payment_id}, outcome)
        except Exception as exc:  # best effort: the answer is still held and its record retried
            log.warning("push of %s: early report failed: %s: %s", payment_id, type(exc).__name__,
                        untrusted(str(exc)))
        else:
            self._reported_early.add(payment_id)
            REPORTED_EARLY.inc()

    async def _store(self, step: Callable[[], Awaitable[None]], what: str, payment_id: str,
                     on_first_failure: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Runs `step` until it succeeds: Daraja's answer is held, never dropped, across a database
        outage. Only a stopping worker gives up, `stop_grace_s` after the stop."""
        delay, tries, give_up_at = 0.1, 0, None
        while True:
            try:
                await step()
                return True
            except Exception as exc:
                tries += 1
                if tries == 1 and on_first_failure is not None:
                    await on_first_failure()
                if self.stop.is_set():
                    give_up_at = give_up_at or self.clock.monotonic() + self.settings.stop_grace_s
                    if self.clock.monotonic() >= give_up_at:
                        return False
                if tries & (tries - 1) == 0:  # the 1st, 2nd, 4th, 8th... failure: an outage is one line a while
                    log.log(logging.WARNING if database_unavailable(exc) else logging.ERROR,
                            "%s of %s failed %d times, retrying: %s: %s", what, payment_id, tries,
                            type(exc).__name__, untrusted(str(exc)))
                await self.clock.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self.settings.store_backoff_max_s)

    async def _publish(self, v: dict[str, Any], o: PushOutcome) -> None:
        await self.publisher.publish(STK_PUSH_RESULT, {
            **new_event_fields(v["channel_id"], v["payment_id"]), "outcome": RESULT_OUTCOME[o.status],
            "merchant_request_id": o.merchant_request_id, "checkout_request_id": o.checkout_request_id,
            "error_code": o.error_code, "error_message": o.error_message, "attempts": max(o.attempts, 1)})


def _accepted(accepted: PushAccepted, attempt: int) -> PushOutcome:
    """Daraja's answer as it can be recorded. Its texts are foreign: one PostgreSQL cannot store (a NUL,
    a lone surrogate) would fail the claim's finish on every retry, holding the push, its batch and the
    partition for good. A CheckoutRequestID is kept verbatim or not at all (an altered one queries
    nothing): one that is not printable text leaves the outcome unknown, reconciled by callback."""
    if not accepted.checkout_request_id.isprintable():
        return PushOutcome(ClaimStatus.UNKNOWN, error_code="CHECKOUT_ID_UNUSABLE",
                           error_message="Daraja accepted the push with a CheckoutRequestID that is not printable "
                                         f"text: {untrusted(accepted.checkout_request_id, 64)}", attempts=attempt)
    return PushOutcome(ClaimStatus.ACCEPTED, untrusted(accepted.merchant_request_id, 64),
                       accepted.checkout_request_id, attempts=attempt)


def _code(error_code: str | None) -> str | None:
    return None if error_code is None else untrusted(error_code, 64)


def _channel_refusal(channel: ChannelAccess, amount: int) -> PushOutcome | None:
    if not channel.active:
        return PushOutcome(ClaimStatus.INVALID, error_code="CHANNEL_SUSPENDED", error_message="channel is not active")
    if channel.max_amount is not None and amount > channel.max_amount:
        return PushOutcome(ClaimStatus.INVALID, error_code="AMOUNT_ABOVE_CHANNEL_LIMIT",
                           error_message=f"amount is above the channel's limit of {channel.max_amount}")
    return None


class Querier:
    """Answers the ledger's STK query requests with the app that made the push."""

    def __init__(self, claims: Claims, daraja: Daraja, channels: Channels, publisher: Publisher,
                 throttle: ShortcodeThrottle, *, clock: Clock | None = None, stop: asyncio.Event | None = None):
        self.claims, self.daraja, self.channels, self.publisher = claims, daraja, channels, publisher
        self.throttle = throttle
        self.clock = clock or SystemClock()
        self.stop = stop or asyncio.Event()

    async def handle(self, event: ConsumedEvent) -> None:
        v = event.value
        status, code, desc = await self._query(v)
        QUERIES.labels(status).inc()
        await self.publisher.publish(STK_QUERY_RESULT, {
            **new_event_fields(v["channel_id"], v["payment_id"]), "checkout_request_id": v["checkout_request_id"],
            "status": status, "result_code": code, "result_desc": desc, "attempt": v["attempt"]})

    async def _query(self, v: dict[str, Any]) -> tuple[str, str | None, str | None]:
        version = await self.claims.credential_version(v["payment_id"])
        channel = await (self.channels.at_version(v["channel_id"], version) if version
                         else self.channels.current(v["channel_id"]))  # the app that made the push
        if channel is None or not v["checkout_request_id"]:
            return "ERROR", None, "nothing to query with" if channel else "unknown channel"
        code = channel.shortcode.business_shortcode
        while (wait_s := self.throttle.take(code)) > 0:
            await pause(self.clock, self.stop, wait_s)
        try:
            result = await self.daraja.query(channel.app, channel.shortcode, v["checkout_request_id"])
        except DarajaError as exc:
            if exc.error_code == SPIKE_ARREST:
                self.throttle.spike_arrested(code)
            return "ERROR", exc.error_code, untrusted(str(exc))
        return QUERY_STATUS[result.status], result.result_code, result.result_desc
