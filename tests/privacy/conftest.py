"""Fixtures of the privacy service's tests."""
from __future__ import annotations

import pytest

from services.ledger.service import Ledger


@pytest.fixture
def ledger(ledger_pool, codec) -> Ledger:
    """The ledger's consumer adapter, as its own login role: it writes the payments retention scrubs."""
    return Ledger(ledger_pool, codec)
