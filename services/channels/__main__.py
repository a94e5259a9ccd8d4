"""python -m services.channels: the onboarding API (default port 8082), with the review desk's routes.

It seals credentials with the vault's public key file and webhook signing secrets with the
notifier's, and holds neither key-encryption key.
"""
from __future__ import annotations

import asyncio
import logging
import sys

from services.channels import settings as s
from services.channels.api import create_app
from services.channels.onboarding import Onboarding, daraja_credential_check
from services.channels.webhooks import WebhookManagement
from services.common import config
from services.common.db import open_pool, require_schema
from services.common.observability import DatabaseCheck, Health, serve
from services.common.pseudonyms import Pseudonyms
from services.common.runtime import run_service
from services.daraja.client import DarajaTimeouts
from services.notifier.destinations import DestinationPolicy
from services.operations.desk import KafkaCommands, ReviewDesk
from services.operations.statement import Statements

log = logging.getLogger("services.channels")

SETTINGS = s.API_SETTINGS


async def main(cfg: s.ApiSettings, stop: asyncio.Event) -> None:
    try:
        admin_token = s.AdminToken.from_config(cfg)
    except config.ConfigError as exc:
        print(f"channels: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not cfg.vault_public_key_file.exists():
        log.warning("no vault public key at %s yet: credentials cannot be stored until `mpesa-pipeline vault init` "
                    "has run where the STK worker runs", cfg.vault_public_key_file)
    if not cfg.webhook_vault_public_key_file.exists():
        log.warning("no webhook vault public key at %s yet: webhook endpoints cannot be added until the notifier's "
                    "key file exists", cfg.webhook_vault_public_key_file)
    check = daraja_credential_check(cfg.daraja_base_url, DarajaTimeouts(connect_s=cfg.daraja_connect_timeout_s,
                                                                        read_s=cfg.daraja_read_timeout_s))
    require_schema(cfg.database_url)
    pool = await open_pool(cfg.database_url, max_size=5)
    onboarding = Onboarding(pool, public_key_file=cfg.vault_public_key_file, credential_check=check)
    webhooks = WebhookManagement(pool, public_key_file=cfg.webhook_vault_public_key_file,
                                 policy=DestinationPolicy(cfg.webhook_allowed_networks))
    # Kafka and the registry are reached at the first instruction: the channel routes never wait on them,
    # and readiness does not either (the admin API serves channels, keys and searches without them).
    commands = KafkaCommands(cfg.kafka_bootstrap_servers, cfg.schema_registry_url)
    desk = ReviewDesk(pool, commands, verdict_wait_s=cfg.operator_verdict_wait_s)
    health = Health()
    health.add("database", DatabaseCheck(pool))
    privacy_pool, payers = await _payers()
    runner = await serve(create_app(onboarding, admin_token, health, webhooks=webhooks, desk=desk,
                                    statements=Statements(pool.connection), payers=payers), cfg.admin_host,
                         cfg.admin_port)
    log.info("onboarding API listening on %s:%d", cfg.admin_host, cfg.admin_port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await commands.close()
        await pool.close()
        if privacy_pool is not None:
            await privacy_pool.close()


async def _payers():
    """A payer's export and erasure, as the privacy role on a pool of their own; (None, None) unless
    PRIVACY_DATABASE_URL is set and the pseudonym key exists."""
    from services.privacy.payers import Payers
    from services.privacy.settings import API_PAYERS_SETTINGS, ApiPayersSettings
    cfg = config.load_into(ApiPayersSettings, API_PAYERS_SETTINGS)
    if cfg.privacy_database_url is None:
        return None, None
    if not cfg.pseudonym_key_file.exists():
        log.warning("no pseudonym key at %s: POST /admin/payers/* are not served until it exists "
                    "(PSEUDONYM_KEY_FILE)", cfg.pseudonym_key_file)
        return None, None
    pool = await open_pool(cfg.privacy_database_url, max_size=2)
    return pool, Payers(pool, Pseudonyms.from_file(cfg.pseudonym_key_file), cfg.kafka_topic_configs,
                        cfg.kafka_topic_replication_factor)


if __name__ == "__main__":
    run_service("channels", SETTINGS, main, settings_type=s.ApiSettings)
