"""Building the ledger from its settings; `python -m services.ledger` and the tests share it.

Every dependency is a keyword argument; what is not given is built here for production: the
PostgreSQL unit of work over the pool, the system clock.
"""
from __future__ import annotations

from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from services.common.avro import Codec
from services.common.pseudonyms import Pseudonyms
from services.ledger.application import HandOver, LedgerService
from services.ledger.deadlines import LedgerSettings
from services.ledger.ports import Clock, SystemClock, UnitOfWorkFactory
from services.ledger.postgres import postgres_unit_of_work
from services.ledger.reconciler import Reconciler
from services.ledger.service import Ledger


@dataclass(frozen=True)
class LedgerParts:
    service: LedgerService      # the application service both entry points share
    consumer: Ledger            # entry point 1: the batches of the consumer loop
    reconciler: Reconciler      # entry point 2: the timer


def build(pool: AsyncConnectionPool | None, codec: Codec, settings: LedgerSettings, *,
          on_commit: HandOver = lambda rows: None, clock: Clock | None = None,
          unit_of_work: UnitOfWorkFactory | None = None, pseudonyms: Pseudonyms | None = None) -> LedgerParts:
    """pool: None only with a unit of work of its own (tests); the reconciler's scan then has none."""
    clock = clock or SystemClock()
    if unit_of_work is None:
        assert pool is not None, "the PostgreSQL unit of work needs a pool"
        unit_of_work = postgres_unit_of_work(pool, settings.channel_cache_ttl_s)
    consumer = Ledger(pool, codec, settings, on_commit, clock=clock, unit_of_work=unit_of_work, pseudonyms=pseudonyms)
    return LedgerParts(consumer.service, consumer, Reconciler(pool, consumer.service, clock))
