"""The signing secrets of an endpoint, opened with the notifier's vault key and kept a few seconds.

Which secrets sign: the newest version, and each older one whose rotation overlap (`expires_at`)
has not ended, so that a receiver that has either secret verifies (docs/webhooks.md §1). A secret
that cannot be opened (the row altered, a key file without its key) makes the endpoint's deliveries
wait rather than go unsigned or be parked; it is audited once per cache period, counted, and never
written anywhere.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from services.channels.vault import KeyProvider, VaultError
from services.notifier import metrics
from services.notifier.deliveries import Endpoint
from services.notifier.dispatcher import SecretsUnavailable
from services.notifier.secrets import open_secret
from services.notifier.store import NotifierStore, SealedSecret

log = logging.getLogger(__name__)


def signing_versions(versions: list[SealedSecret], now: datetime) -> list[SealedSecret]:
    """Newest first: the newest version, then the older ones still inside their overlap."""
    newest = max(versions, key=lambda v: v.version, default=None)
    if newest is None:
        return []
    return [newest] + sorted((v for v in versions if v is not newest and v.expires_at is not None
                              and v.expires_at > now), key=lambda v: -v.version)


class CachedSigningSecrets:
    def __init__(self, store: NotifierStore, provider: KeyProvider, ttl_s: float):
        self.store = store
        self.provider = provider
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, list[str] | SecretsUnavailable]] = {}
        self._loading: dict[str, asyncio.Future[tuple[float, list[str] | SecretsUnavailable]]] = {}

    async def for_endpoint(self, endpoint: Endpoint) -> list[str]:
        cached = self._cache.get(endpoint.endpoint_id)
        if cached is None or time.monotonic() - cached[0] > self.ttl_s:
            # One read per endpoint however many attempts want it at once (and one audit entry).
            loading = self._loading.get(endpoint.endpoint_id)
            if loading is None:
                loading = self._loading[endpoint.endpoint_id] = asyncio.ensure_future(self._load(endpoint))
                loading.add_done_callback(lambda _: self._loading.pop(endpoint.endpoint_id, None))
            cached = await asyncio.shield(loading)
        if isinstance(cached[1], SecretsUnavailable):
            raise cached[1]
        return cached[1]

    async def _load(self, endpoint: Endpoint) -> tuple[float, list[str] | SecretsUnavailable]:
        cached = (time.monotonic(), await self._opened(endpoint))
        self._cache[endpoint.endpoint_id] = cached
        return cached

    async def _opened(self, endpoint: Endpoint) -> list[str] | SecretsUnavailable:
        stored, database_now = await self.store.secrets_of(endpoint.endpoint_id)
        versions = signing_versions(stored, database_now)  # the overlap's end is in database time
        if not versions:
            return await self._failed(endpoint, "the endpoint has no signing secret")
        opened = []
        for v in versions:
            try:
                opened.append(open_secret(v.sealed, endpoint.endpoint_id, v.version, self.provider))
            except VaultError as exc:
                # The vault's messages name the endpoint, version and key id, never the secret.
                return await self._failed(endpoint, f"signing secret version {v.version} cannot be opened: "
                                                    f"{type(exc).__name__}: {exc}")
        return opened

    async def _failed(self, endpoint: Endpoint, reason: str) -> SecretsUnavailable:
        metrics.SECRET_FAILURES.labels(endpoint.endpoint_id).inc()
        log.error("webhook endpoint %s: %s; its deliveries wait", endpoint.endpoint_id, reason,
                  extra={"channel_id": endpoint.channel_id})
        await self.store.audit("webhook_secret_decrypt_failed", endpoint.endpoint_id, endpoint.channel_id, reason[:500])
        return SecretsUnavailable(reason)
