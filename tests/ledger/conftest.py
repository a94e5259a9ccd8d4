"""Fixtures of the ledger's tests."""
from __future__ import annotations

import pytest

from services.ledger.service import Ledger
from tests.ledger.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """The ledger's time: a test moves it on instead of rewinding rows with SQL."""
    return FakeClock()


@pytest.fixture
def ledger(ledger_pool, codec, clock) -> Ledger:
    """The ledger's consumer adapter over PostgreSQL, as the ledger's own login role, on the fake clock."""
    return Ledger(ledger_pool, codec, clock=clock)
