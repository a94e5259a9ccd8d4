"""The STK worker's building blocks run as its own database role, as `python -m services.stk_worker` does."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def pool(stk_worker_pool):
    return stk_worker_pool
