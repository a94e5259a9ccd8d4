"""The ledger's consumer adapter: Kafka's events in, ledger inputs to the application service.

It translates each consumed event into a `LedgerInput` at this edge (an event that cannot be one is
refused, to the dead-letter topic), applies a batch in one unit of work, isolates an event the
database refuses by halving its batch, and turns the database's own trouble into `Transient` so the
batch is retried. The consumer loop commits Kafka offsets only after this returns, so a redelivered
event is a no-op and nothing is published before the commit (docs/design.md).
"""
from __future__ import annotations

import logging
from collections.abc import Hashable

import psycopg
import psycopg.errors
from psycopg_pool import AsyncConnectionPool

from services.common.avro import Codec
from services.common.kafka import ConsumedEvent, Rejection, Transient
from services.common.pseudonyms import Pseudonyms
from services.common.schema_registry import RegistryUnavailable
from services.common.text import untrusted
from services.common.topics import Topic
from services.ledger.application import VERDICTS, HandOver, LedgerService
from services.ledger.callbacks import CallbackParseError
from services.ledger.deadlines import LedgerSettings
from services.ledger.facts import LedgerInput, NotAFact, input_of
from services.ledger.ports import Clock, SystemClock, UnitOfWorkFactory
from services.ledger.postgres import postgres_unit_of_work

log = logging.getLogger(__name__)

DEFAULTS = LedgerSettings()  # frozen: one shared default is safe


def payment_of(event: ConsumedEvent) -> Hashable:
    """What a ledger batch keeps in order: the events of one payment. Batches run side by side (up to
    LEDGER_MAX_IN_FLIGHT), and one with an event of a payment that an earlier batch in hand also has
    waits for that batch first (services/common/key_order.py). Events of other payments may commit in
    either order: each decides only its own payment (receipts aside: two payments claiming one receipt
    settle by whichever commits first, as with two ledgers; docs/scaling.md)."""
    return event.value.get("payment_id")


class Ledger:
    def __init__(self, pool: AsyncConnectionPool | None, codec: Codec, settings: LedgerSettings = DEFAULTS,
                 on_commit: HandOver = lambda rows: None, clock: Clock | None = None,
                 unit_of_work: UnitOfWorkFactory | None = None, pseudonyms: Pseudonyms | None = None):
        assert pool is not None or unit_of_work is not None, "a pool, or a unit of work of its own"
        self.codec = codec
        self.settings = settings
        uow = unit_of_work or postgres_unit_of_work(pool, settings.channel_cache_ttl_s)  # type: ignore[arg-type]
        self.service = LedgerService(uow, codec, settings, clock or SystemClock(), on_commit, pseudonyms)

    async def handle_batch(self, events: list[ConsumedEvent]) -> list[Rejection]:
        try:
            rejections = await self._apply_refusing_alone(events)
        except psycopg.Error as exc:  # the database's own trouble, not an event's: see _is_the_events_fault
            raise Transient(f"database error no event caused: {type(exc).__name__}: {untrusted(str(exc))}") from exc
        except RegistryUnavailable as exc:  # parked facts' writer schemas could not be fetched (Batch.open)
            raise Transient(f"schema registry: {exc}") from exc
        for r in rejections:
            if not isinstance(r.error, (NotAFact, CallbackParseError)):  # those say why; the rest may be a bug
                _log_poison(r.event, r.error)
        return rejections

    async def _apply_refusing_alone(self, events: list[ConsumedEvent], decided_again: bool = False
                                    ) -> list[Rejection]:
        """An event that cannot be applied must not block the rest of its batch: the halves are
        applied in turn (keeping the order) until it stands alone, so k bad events among n cost
        about 2k·log2(n) transactions, not n. Alone, it is rejected (dead-lettered) with its error.

        A unique index's refusal of an event alone is first decided once more: another ledger's
        batch (another partition) may have committed the same receipt after this one read who holds
        it, and decided again the event sees that holder and gets a verdict of its own (a receipt
        proving another payment: rejected, or Review) instead of a dead letter."""
        try:
            return await self._apply_in_one_transaction(events)
        except Exception as exc:
            if isinstance(exc, Transient) or not _is_the_events_fault(exc):
                raise
            if len(events) == 1:
                if isinstance(exc, psycopg.errors.UniqueViolation) and not decided_again:
                    return await self._apply_refusing_alone(events, decided_again=True)
                return [Rejection(events[0], exc)]
        half = len(events) // 2
        return await self._apply_refusing_alone(events[:half]) + await self._apply_refusing_alone(events[half:])

    async def _apply_in_one_transaction(self, events: list[ConsumedEvent]) -> list[Rejection]:
        unique = _first_of_each(events)
        rejections, inputs, refused = [], [], []
        for e in unique:
            try:
                inputs.append(self.ledger_input(e))
            except Exception as exc:  # input_of is pure: whatever it raises is this event's fault
                rejections.append(Rejection(e, exc))  # dead-lettered with its reason; payment untouched
                refused.append((e.value["event_id"], e.topic))  # marked processed all the same
        fresh = await self.service.apply(inputs, refused)
        VERDICTS.labels("replay", "duplicate").inc(len(events) - len(fresh))
        return [r for r in rejections if r.event.value["event_id"] in fresh]

    def ledger_input(self, event: ConsumedEvent) -> LedgerInput:
        """The event as the ledger's own input; its bytes as consumed are what waits if it must."""
        raw = event.raw if event.raw is not None else self._encoded(event)
        return input_of(event.topic, event.schema, event.value, raw)

    def _encoded(self, event: ConsumedEvent) -> bytes | None:
        """An event built in memory (not consumed) has no bytes; None if it cannot be encoded either."""
        try:
            return self.codec.encode(Topic(event.topic, event.schema), event.value)
        except Exception:
            return None


def _is_the_events_fault(exc: Exception) -> bool:
    """Whether an exception raised while applying a batch can be blamed on one of its events, which
    is then isolated and dead-lettered. The database refusing a value (a constraint, a malformed
    value) is; so is any other error of ours (TypeError, ArithmeticError...) raised by what an event
    carries. Every other database error is not: the connection or the server is down, or our SQL,
    schema or grants are wrong (a missing GRANT is a ProgrammingError). Each event would fail the
    same way, and dead-lettering them all would turn a bad deploy into a pile of events to replay:
    the consumer retries instead and readiness reports the stall."""
    if isinstance(exc, RegistryUnavailable):
        return False
    if isinstance(exc, psycopg.Error):
        # ProgramLimitExceeded: a value too big for an index entry or a row, which an event carried.
        return isinstance(exc, (psycopg.IntegrityError, psycopg.DataError, psycopg.errors.ProgramLimitExceeded))
    return True


def _log_poison(event: ConsumedEvent, exc: Exception) -> None:
    """The error's type and where the event sits; its text may quote the event, so it is made safe."""
    log.error("event %s[%d]@%d cannot be applied, dead-lettered: %s: %s", event.topic, event.partition,
              event.offset, type(exc).__name__, untrusted(str(exc)),
              extra={"event_id": untrusted(event.value.get("event_id"), 64)})


def _first_of_each(events: list[ConsumedEvent]) -> list[ConsumedEvent]:
    """Drops repeats of one event id inside a batch (a producer retry can duplicate it)."""
    unique: dict[str, ConsumedEvent] = {}
    for e in events:
        unique.setdefault(e.value["event_id"], e)
    return list(unique.values())
