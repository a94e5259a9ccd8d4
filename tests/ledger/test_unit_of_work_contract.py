"""One contract for the ledger's unit-of-work port, run against both adapters: PostgreSQL
(services/ledger/postgres.py) and the in-memory one the fast tests use (tests/ledger/fakes.py).
Each test makes its own payments and events under random ids."""
from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timezone

import pytest

from services.ledger.ports import HistoryRow, Writes
from services.ledger.postgres import postgres_unit_of_work
from services.ledger.record import NewPayment, new_record
from tests.ledger.fakes import InMemoryLedgerStore

AT = datetime(2026, 11, 27, 10, 21, 15, tzinfo=timezone.utc)


def a_payment(unique: str, **changes):
    record = new_record(NewPayment(str(uuid.uuid4()), f"ch-{unique}", 100, "254712345678", "INV1", None, "o-1",
                                   {"k": "v"}, AT), AT)
    return dataclasses.replace(record, **changes)


def audit_of(payment_id: str) -> dict:
    return {"payment_id": payment_id, "event_id": str(uuid.uuid4()), "fact": "Requested", "verdict": "applied",
            "from_state": None, "to_state": "Requested", "detail": "", "at": AT}


class UnitOfWorkContract:
    """The tests every adapter passes; a subclass per adapter supplies the `unit_of_work` fixture
    (eventsourcing's recorder test cases)."""

    async def test_an_event_is_fresh_once_even_within_one_open(self, unit_of_work):
        event = (str(uuid.uuid4()), "t")
        async with unit_of_work() as uow:
            assert (await uow.open([event, event], [], [], [])).fresh_events == {event[0]}
        async with unit_of_work() as uow:
            assert (await uow.open([event], [], [], [])).fresh_events == set()


    async def test_what_a_unit_of_work_wrote_is_read_back_by_the_next(self, unit_of_work, unique):
        record = a_payment(unique, checkout_request_id=f"ws_CO_{unique}", late_receipt=unique[:10].upper(),
                           review_alert="success_after_final", state="Review")
        async with unit_of_work() as uow:
            await uow.open([], [record.payment_id], [], [])
            await uow.write(Writes(payments=[record], audit=[audit_of(record.payment_id)]))
        async with unit_of_work() as uow:
            opened = await uow.open([], [record.payment_id], [unique[:10].upper()], [f"ws_CO_{unique}"])
        assert opened.payments == {record.payment_id: record}
        assert opened.receipts == {unique[:10].upper(): record.payment_id}
        assert opened.checkouts == {f"ws_CO_{unique}": record.payment_id}


    async def test_nothing_is_kept_when_the_unit_of_work_raises(self, unit_of_work, unique):
        record, event = a_payment(unique), (str(uuid.uuid4()), "t")
        with pytest.raises(RuntimeError):
            async with unit_of_work() as uow:
                await uow.open([event], [record.payment_id], [], [])
                history: list[HistoryRow] = [(record.payment_id, "Requested", None, None, event[0])]
                await uow.write(Writes(payments=[record], history=history,
                                       audit=[audit_of(record.payment_id)]))
                raise RuntimeError("the batch failed after writing")
        async with unit_of_work() as uow:
            opened = await uow.open([event], [record.payment_id], [], [])
        assert opened.payments == {} and opened.fresh_events == {event[0]}


    async def test_parked_facts_come_back_oldest_first_until_unparked(self, unit_of_work, unique):
        pid, first, second = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
        async with unit_of_work() as uow:
            await uow.open([], [pid], [], [])
            await uow.write(Writes(parked=[(first, pid, "t1", b"one")]))
        async with unit_of_work() as uow:
            await uow.open([], [pid], [], [])
            await uow.write(Writes(parked=[(second, pid, "t2", b"two")]))
        async with unit_of_work() as uow:
            opened = await uow.open([], [pid], [], [])
            assert opened.parked == {pid: [(first, "t1", b"one"), (second, "t2", b"two")]}
            await uow.write(Writes(unparked=[first]))
        async with unit_of_work() as uow:
            assert (await uow.open([], [pid], [], [])).parked == {pid: [(second, "t2", b"two")]}
            await uow.write(Writes(unparked=[second]))


    async def test_owners_are_read_for_receipts_and_checkout_ids_in_any_of_their_columns(self, unit_of_work, unique):
        candidate = a_payment(unique, candidate_receipt=f"C{unique[:9].upper()}",
                              candidate_checkout_request_id=f"ws_CO_c{unique}")
        async with unit_of_work() as uow:
            await uow.open([], [candidate.payment_id], [], [])
            await uow.write(Writes(payments=[candidate]))
        async with unit_of_work() as uow:
            held, pushed = await uow.owners([f"C{unique[:9].upper()}", "NOBODY0000"],
                                            [f"ws_CO_c{unique}", "ws_CO_none"])
        assert (held, pushed) == ({f"C{unique[:9].upper()}": candidate.payment_id},
                                  {f"ws_CO_c{unique}": candidate.payment_id})


    async def test_outbox_rows_come_back_with_increasing_ids_in_order(self, unit_of_work, unique):
        messages = [("t", unique.encode(), f"{n}".encode()) for n in range(3)]
        with pytest.raises(RuntimeError):  # rolled back: a relay must never find these rows
            async with unit_of_work() as uow:
                await uow.open([], [], [], [])
                rows = await uow.write(Writes(outbox=messages))
                raise RuntimeError("rolled back")
        assert [r[1:] for r in rows] == messages and rows[0][0] < rows[1][0] < rows[2][0]


    async def test_a_channel_the_store_does_not_know_is_not_confirmed_by_query(self, unit_of_work, unique):
        async with unit_of_work() as uow:
            assert await uow.confirm_by_query(f"nobody-{unique}") is False


class TestInMemoryUnitOfWork(UnitOfWorkContract):
    @pytest.fixture
    def unit_of_work(self):
        return InMemoryLedgerStore().unit_of_work


class TestPostgresUnitOfWork(UnitOfWorkContract):
    @pytest.fixture
    def unit_of_work(self, ledger_pool):
        return postgres_unit_of_work(ledger_pool, 5.0)
