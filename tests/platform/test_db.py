"""services/common/db.py: the periodic step of the services' background loops."""
from __future__ import annotations

import asyncio

import psycopg

from services.common.db import every


async def test_a_periodic_step_outlives_a_database_outage_and_ends_when_stopped():
    stop = asyncio.Event()
    turns: list[int] = []

    async def step() -> None:
        turns.append(len(turns))
        if len(turns) == 1:
            raise psycopg.OperationalError("connection refused")  # PostgreSQL restarting
        if len(turns) == 3:
            stop.set()

    await asyncio.wait_for(every(0.01, stop, step, "test"), timeout=5)
    assert turns == [0, 1, 2]
