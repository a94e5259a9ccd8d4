"""Rotating the key-encryption key: a new KEK, then every data key re-wrapped under it.

Run where the key file lives (the STK worker's host). Only data keys are unwrapped and wrapped
again; the credentials' ciphertext is never decrypted. Each row is re-wrapped in its own short
transaction, so a row that cannot be unwrapped (altered, or wrapped by a key this file lacks) is
reported without holding back the others, and the rotation can simply be run again.

Old keys stay in the key file until no row uses them, so a running worker can always read every
row; `retire_old` drops them once the re-wrap left nothing behind.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from psycopg_pool import AsyncConnectionPool

from services.channels import repository as repo
from services.channels.vault import LocalKeyFileProvider, VaultError, rewrap

log = logging.getLogger(__name__)


@dataclass
class RewrapReport:
    active_key_id: str
    rewrapped: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int, str]] = field(default_factory=list)  # channel, version, why
    unheld: dict[str, int] = field(default_factory=dict)  # rows per KEK the key file does not hold
    retired: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.unheld


async def rotate_kek(pool: AsyncConnectionPool, provider: LocalKeyFileProvider, actor: str, *,
                     retire_old: bool = False) -> RewrapReport:
    previous = provider.key_id
    new_key_id = provider.add_key()  # written to the key file (and its .pub.json) before any row moves
    async with pool.connection() as conn, conn.transaction():
        await repo.audit(conn, actor, "kek_rotated", kek_id=new_key_id, detail=f"previous active key {previous}")
    log.info("new key-encryption key %s (previous %s)", new_key_id, previous)
    report = await rewrap_all(pool, provider, actor)
    if retire_old:
        await retire_unused_keys(pool, provider, actor, report)
    return report


async def rewrap_all(pool: AsyncConnectionPool, provider: LocalKeyFileProvider, actor: str) -> RewrapReport:
    """Moves every row wrapped by an older key in the key file to the active key."""
    report = RewrapReport(provider.key_id)
    old_keys = [k for k in provider.key_ids if k != provider.key_id]
    async with pool.connection() as conn:
        targets = await repo.versions_wrapped_by(conn, old_keys) if old_keys else []
    for channel_id, version in targets:
        reason = await _rewrap_one(pool, provider, actor, channel_id, version)
        if reason:
            report.failed.append((channel_id, version, reason))
        else:
            report.rewrapped.append((channel_id, version))
    async with pool.connection() as conn:
        usage = await repo.rows_per_kek(conn)
    report.unheld = {k: n for k, n in usage.items() if k not in provider.key_ids}
    log.info("re-wrapped %d credential versions, %d failed, %d rows under keys not held",
             len(report.rewrapped), len(report.failed), sum(report.unheld.values()))
    return report


async def retire_unused_keys(pool: AsyncConnectionPool, provider: LocalKeyFileProvider, actor: str,
                             report: RewrapReport) -> None:
    async with pool.connection() as conn, conn.transaction():
        await repo.lock_keks(conn, exclusive=True)  # waits for credential writes sealing to an old key
        usage = await repo.rows_per_kek(conn)
        unused = [k for k in provider.key_ids if k != provider.key_id and usage.get(k, 0) == 0]
        if unused:
            provider.retire(unused)
        for key_id in unused:
            await repo.audit(conn, actor, "kek_retired", kek_id=key_id)
    report.retired = unused


async def _rewrap_one(pool: AsyncConnectionPool, provider: LocalKeyFileProvider, actor: str,
                      channel_id: str, version: int) -> str | None:
    """None when done (or nothing to do); otherwise why it failed, also written to the audit."""
    async with pool.connection() as conn, conn.transaction():
        sealed = await repo.sealed_credentials(conn, channel_id, version, for_update=True)
        if sealed is None or sealed.key_id == provider.key_id:
            return None  # gone, or re-wrapped by a concurrent run
        try:
            rewrapped = rewrap(sealed, channel_id, version, provider)
        except VaultError as exc:
            await repo.audit(conn, actor, "credentials_rewrap_failed", channel_id=channel_id, version=version,
                             kek_id=sealed.key_id, detail=str(exc))
            return str(exc)
        await repo.replace_wrapping(conn, channel_id, version, rewrapped)
        await repo.audit(conn, actor, "credentials_rewrapped", channel_id=channel_id, version=version,
                         kek_id=rewrapped.key_id, detail=f"from {sealed.key_id}")
    return None
