"""`python -m services.privacy`: the retention of payers' data, with /metrics, /healthz and /readyz."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.common.db import open_pool, require_schema
from services.common.observability import DatabaseCheck, Health, serve_ops
from services.common.pseudonyms import Pseudonyms
from services.common.runtime import run_service
from services.privacy.retention import Retention
from services.privacy.settings import SETTINGS

log = logging.getLogger(__name__)


async def main(cfg: dict[str, Any], stop: asyncio.Event) -> None:
    pseudonyms = Pseudonyms.from_file(cfg["PSEUDONYM_KEY_FILE"])
    require_schema(cfg["DATABASE_URL"])
    pool = await open_pool(cfg["DATABASE_URL"], max_size=2)
    health = Health()
    health.add("database", DatabaseCheck(pool))
    runner = await serve_ops(health, cfg["METRICS_HOST"], cfg["PRIVACY_METRICS_PORT"])
    log.info("pseudonymising payers' data %d days after a payment's final state (unless its channel says "
             "otherwise), every %.0f s", cfg["PAYER_DATA_RETENTION_DAYS"], cfg["PRIVACY_RETENTION_INTERVAL_S"])
    try:
        await Retention(pool, pseudonyms, cfg["PAYER_DATA_RETENTION_DAYS"],
                        interval_s=cfg["PRIVACY_RETENTION_INTERVAL_S"], chunk=cfg["PRIVACY_RETENTION_CHUNK"]).run(stop)
    finally:
        await runner.cleanup()
        await pool.close()


if __name__ == "__main__":
    run_service("privacy", SETTINGS, main)
