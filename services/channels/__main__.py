"""python -m services.channels: the onboarding API (default port 8082).

It seals credentials with the vault's public key file and never holds the key-encryption key.
"""
from __future__ import annotations

import asyncio
import logging
import sys

from services.channels import settings as s
from services.channels.api import create_app
from services.channels.onboarding import Onboarding, daraja_credential_check
from services.common import config
from services.common.db import open_pool, require_schema
from services.common.observability import Health, serve
from services.common.runtime import run_service
from services.daraja.client import DarajaTimeouts
from services.daraja.settings import SETTINGS as DARAJA_SETTINGS

log = logging.getLogger("services.channels")

SETTINGS = [config.database_url("onboarding"), s.ADMIN_HOST, s.ADMIN_PORT, s.ADMIN_TOKEN, s.ADMIN_TOKEN_SHA256,
            s.VAULT_PUBLIC_KEY_FILE, *DARAJA_SETTINGS]


async def main(cfg: dict, stop: asyncio.Event) -> None:
    try:
        admin_token = s.AdminToken.from_config(cfg)
    except config.ConfigError as exc:
        print(f"channels: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not cfg["VAULT_PUBLIC_KEY_FILE"].exists():
        log.warning("no vault public key at %s yet: credentials cannot be stored until `mpesa-pipeline vault init` "
                    "has run where the STK worker runs", cfg["VAULT_PUBLIC_KEY_FILE"])
    check = daraja_credential_check(cfg["DARAJA_BASE_URL"], DarajaTimeouts(connect_s=cfg["DARAJA_CONNECT_TIMEOUT_S"],
                                                                           read_s=cfg["DARAJA_READ_TIMEOUT_S"]))
    require_schema(cfg["DATABASE_URL"])
    pool = await open_pool(cfg["DATABASE_URL"], max_size=5)
    onboarding = Onboarding(pool, public_key_file=cfg["VAULT_PUBLIC_KEY_FILE"], credential_check=check)
    runner = await serve(create_app(onboarding, admin_token, Health()), cfg["ADMIN_HOST"], cfg["ADMIN_PORT"])
    log.info("onboarding API listening on %s:%d", cfg["ADMIN_HOST"], cfg["ADMIN_PORT"])
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await pool.close()


if __name__ == "__main__":
    run_service("channels", SETTINGS, main)
