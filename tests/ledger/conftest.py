"""Fixtures of the ledger's tests."""
from __future__ import annotations

import pytest

from tests.ledger.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """The ledger's time: a test moves it on instead of rewinding rows with SQL."""
    return FakeClock()
