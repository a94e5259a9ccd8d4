"""Rotating a key-encryption key: a new KEK, then every data key it protects re-wrapped under it.

Two keyrings exist: the STK worker's seals channel credentials (repo.CREDENTIALS), the notifier's
seals webhook signing secrets (repo.WEBHOOK_SECRETS). A rotation is run where the keyring lives, for
the table that keyring seals. Only data keys are unwrapped and wrapped again; the secrets' ciphertext
is never decrypted. Each row is re-wrapped in its own short transaction, so a row that cannot be
unwrapped (altered, or wrapped by a key this file lacks) is reported without holding back the
others, and the rotation can simply be run again.

Old keys stay in the key file until no row uses them, so a running worker or notifier can always
read every row; `retire_old` drops them once nothing is wrapped by them in ANY sealed table, so a
rotation run with the wrong table for its keyring retires nothing that is in use.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from psycopg_pool import AsyncConnectionPool

from services.channels import repository as repo
from services.channels.repository import CREDENTIALS, SealedTable
from services.channels.vault import LocalKeyFileProvider, VaultError, rewrap_bytes

log = logging.getLogger(__name__)


@dataclass
class RewrapReport:
    active_key_id: str
    table: SealedTable = CREDENTIALS
    rewrapped: list[tuple[str, int]] = field(default_factory=list)  # owner (channel or endpoint), version
    failed: list[tuple[str, int, str]] = field(default_factory=list)  # owner, version, why
    unheld: dict[str, int] = field(default_factory=dict)  # rows of the table per KEK the key file does not hold
    retired: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.unheld


async def rotate_kek(pool: AsyncConnectionPool, provider: LocalKeyFileProvider, actor: str, *,
                     retire_old: bool = False, table: SealedTable = CREDENTIALS) -> RewrapReport:
    previous = provider.key_id
    new_key_id = provider.add_key()  # written to the key file (and its .pub.json) before any row moves
    async with pool.connection() as conn, conn.transaction():
        await repo.audit(conn, actor, "kek_rotated", kek_id=new_key_id,
                         detail=f"previous active key {previous}; re-wrapping {table.name}")
    log.info("new key-encryption key %s (previous %s) for %s", new_key_id, previous, table.name)
    report = await rewrap_all(pool, provider, actor, table=table)
    if retire_old:
        await retire_unused_keys(pool, provider, actor, report)
    return report


async def retire_old_keys(pool: AsyncConnectionPool, provider: LocalKeyFileProvider, actor: str, *,
                          table: SealedTable = CREDENTIALS) -> RewrapReport:
    """The second half of a rotation, for when the sealing side reads a copy of the public key
    (another host): once it has the new one, re-wrap what it sealed to the old key meanwhile, then
    retire the keys nothing uses. No new key is made."""
    report = await rewrap_all(pool, provider, actor, table=table)
    await retire_unused_keys(pool, provider, actor, report)
    return report


async def rewrap_all(pool: AsyncConnectionPool, provider: LocalKeyFileProvider, actor: str, *,
                     table: SealedTable = CREDENTIALS) -> RewrapReport:
    """Moves every row of the table wrapped by an older key in the key file to the active key."""
    report = RewrapReport(provider.key_id, table)
    old_keys = [k for k in provider.key_ids if k != provider.key_id]
    async with pool.connection() as conn:
        targets = await repo.versions_wrapped_by(conn, old_keys, table=table) if old_keys else []
    for owner, version in targets:
        reason = await _rewrap_one(pool, provider, actor, table, owner, version)
        if reason:
            report.failed.append((owner, version, reason))
        else:
            report.rewrapped.append((owner, version))
    async with pool.connection() as conn:
        usage = await repo.rows_per_kek(conn, table=table)
    report.unheld = {k: n for k, n in usage.items() if k not in provider.key_ids}
    log.info("re-wrapped %d rows of %s, %d failed, %d rows under keys not held", len(report.rewrapped),
             table.name, len(report.failed), sum(report.unheld.values()))
    return report


async def retire_unused_keys(pool: AsyncConnectionPool, provider: LocalKeyFileProvider, actor: str,
                             report: RewrapReport) -> None:
    async with pool.connection() as conn, conn.transaction():
        await repo.lock_keks(conn, exclusive=True)  # waits for writes sealing to an old key
        # Every sealed table, not only the one re-wrapped: the key file may be the other keyring.
        usage = await repo.rows_per_kek_in_every_table(conn)
        unused = [k for k in provider.key_ids if k != provider.key_id and usage.get(k, 0) == 0]
        if unused:
            provider.retire(unused)
        for key_id in unused:
            await repo.audit(conn, actor, "kek_retired", kek_id=key_id)
    report.retired = unused


async def _rewrap_one(pool: AsyncConnectionPool, provider: LocalKeyFileProvider, actor: str, table: SealedTable,
                      owner: str, version: int) -> str | None:
    """None when done (or nothing to do); otherwise why it failed, also written to the audit."""
    names_owner = {table.audit_owner: owner}
    async with pool.connection() as conn, conn.transaction():
        sealed = await repo.sealed_credentials(conn, owner, version, for_update=True, table=table)
        if sealed is None or sealed.key_id == provider.key_id:
            return None  # gone, or re-wrapped by a concurrent run
        try:
            rewrapped = rewrap_bytes(sealed, table.associated_data(owner, version), provider,
                                     table.where(owner, version))
        except VaultError as exc:
            await repo.audit(conn, actor, table.rewrap_failed_action, version=version, kek_id=sealed.key_id,
                             detail=str(exc), **names_owner)
            return str(exc)
        await repo.replace_wrapping(conn, owner, version, rewrapped, table=table)
        await repo.audit(conn, actor, table.rewrapped_action, version=version, kek_id=rewrapped.key_id,
                         detail=f"from {sealed.key_id}", **names_owner)
    return None
