"""The STK worker's read side: a channel's credentials, decrypted once per version and cached.

Only the process holding the key-encryption key (the STK worker) builds a CredentialStore.
A decryption (unwrap the data key, open the AES-GCM ciphertext) happens once per credential
version per process and is audited; everything else is served from memory. Every `ttl_s` the store
re-reads the channel row and its newest version number (a cheap query, no decryption), so a
suspension or a rotation is seen within ttl_s, and `invalidate` makes it immediate.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from services.channels import repository as repo
from services.channels.model import Channel
from services.channels.vault import KeyProvider, VaultError, unseal
from services.daraja.models import AppCredentials

log = logging.getLogger(__name__)

DECRYPTIONS = Counter("channel_credentials_decryptions_total", "Credential versions decrypted", ["outcome"])


class CredentialsUnavailable(Exception):
    """No usable credentials for a channel: unknown channel, none set, or no such version."""


@dataclass(frozen=True, repr=False)
class ChannelCredentials:
    channel: Channel
    app: AppCredentials  # masks its secrets in repr
    version: int

    @property
    def can_push(self) -> bool:
        """New pushes only for an active channel; queries of earlier pushes go on regardless."""
        return self.channel.is_active

    def __repr__(self) -> str:
        return f"ChannelCredentials(channel_id={self.channel.channel_id!r}, version={self.version}, app={self.app!r})"

    __str__ = __repr__


@dataclass(frozen=True)
class _Current:
    channel: Channel
    version: int
    checked_at: float


class CredentialStore:
    def __init__(self, pool: AsyncConnectionPool, provider: KeyProvider, *, actor: str = "stk-worker",
                 ttl_s: float = 30.0, versions_max: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self._pool = pool
        self._provider = provider
        self._actor = actor
        self._ttl_s = ttl_s
        self._versions_max = versions_max
        self._clock = clock
        self._current: dict[str, _Current] = {}
        self._apps: OrderedDict[tuple[str, int], AppCredentials] = OrderedDict()
        # A version that failed to decrypt fails again from memory for ttl_s: a broken row costs one
        # audit entry per ttl_s, not one per payment.
        self._failures: dict[tuple[str, int], tuple[float, VaultError]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.decryptions = 0  # successful decryptions by this store, for tests and benchmarks

    def __repr__(self) -> str:
        return f"CredentialStore(versions_cached={len(self._apps)}, decryptions={self.decryptions})"

    async def get(self, channel_id: str) -> ChannelCredentials:
        """The channel and its newest credentials: for a new push."""
        current = await self._current_of(channel_id)
        return ChannelCredentials(current.channel, await self._app(channel_id, current.version), current.version)

    async def get_version(self, channel_id: str, version: int) -> ChannelCredentials:
        """A given version, older ones included: for work begun before a rotation (an STK query)."""
        current = await self._current_of(channel_id)
        return ChannelCredentials(current.channel, await self._app(channel_id, version), version)

    def invalidate(self, channel_id: str) -> None:
        """Re-read the channel on next use, e.g. after Daraja refused its credentials."""
        self._current.pop(channel_id, None)

    async def _current_of(self, channel_id: str) -> _Current:
        current = self._current.get(channel_id)
        if current is not None and self._clock() - current.checked_at < self._ttl_s:
            return current
        async with self._lock(channel_id):
            current = self._current.get(channel_id)
            if current is not None and self._clock() - current.checked_at < self._ttl_s:
                return current  # refreshed while this call waited
            async with self._pool.connection() as conn:
                record = await repo.channel_record(conn, channel_id)
            if record is None:
                raise CredentialsUnavailable(f"no channel {channel_id!r}")
            if record.credentials is None:
                raise CredentialsUnavailable(f"channel {channel_id!r} has no credentials")
            current = self._current[channel_id] = _Current(record.channel, record.credentials.version, self._clock())
            return current

    async def _app(self, channel_id: str, version: int) -> AppCredentials:
        key = (channel_id, version)
        app = self._apps.get(key)
        if app is None:
            async with self._lock(channel_id):  # one decryption however many callers wait
                app = self._apps.get(key) or await self._decrypt(channel_id, version)
        self._remember(key, app)
        return app

    async def _decrypt(self, channel_id: str, version: int) -> AppCredentials:
        recent = self._failures.get((channel_id, version))
        if recent is not None and self._clock() - recent[0] < self._ttl_s:
            raise type(recent[1])(str(recent[1]))
        async with self._pool.connection() as conn, conn.transaction():
            sealed = await repo.sealed_credentials(conn, channel_id, version)
            if sealed is None:
                raise CredentialsUnavailable(f"channel {channel_id!r} has no credentials version {version}")
            outcome: AppCredentials | VaultError
            try:
                outcome = unseal(sealed, channel_id, version, self._provider)
            except VaultError as exc:
                outcome = exc
                await repo.audit(conn, self._actor, "credentials_decrypt_failed", channel_id=channel_id,
                                 version=version, kek_id=sealed.key_id, detail=str(exc))
            else:
                await repo.audit(conn, self._actor, "credentials_decrypted", channel_id=channel_id,
                                 version=version, kek_id=sealed.key_id)
        if isinstance(outcome, VaultError):  # raised after the commit, so the failed attempt stays in the audit
            self._failures[(channel_id, version)] = (self._clock(), outcome)
            DECRYPTIONS.labels("failed").inc()
            log.error("credentials cannot be decrypted: %s", outcome, extra={"channel_id": channel_id})
            raise outcome
        app = outcome
        self._failures.pop((channel_id, version), None)
        DECRYPTIONS.labels("ok").inc()
        self.decryptions += 1
        log.info("credentials version %d decrypted (app %s)", version, app.key_id, extra={"channel_id": channel_id})
        return app

    def _remember(self, key: tuple[str, int], app: AppCredentials) -> None:
        self._apps[key] = app
        self._apps.move_to_end(key)
        while len(self._apps) > self._versions_max:
            self._apps.popitem(last=False)

    def _lock(self, channel_id: str) -> asyncio.Lock:
        lock = self._locks.get(channel_id)
        if lock is None:
            lock = self._locks[channel_id] = asyncio.Lock()
        return lock
