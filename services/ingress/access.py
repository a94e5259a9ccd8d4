"""Who may ask for what: the caller's API key (services/channels/apikeys.py) and the channel's status.

Both answers are cached a few seconds (the hot path must not query them per request), so a revoked
key or a suspended channel takes effect within that time.
"""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from services.channels import repository as channels_repository
from services.channels.apikeys import ApiKey, ApiKeyAuthenticator
from services.ingress.cache import TtlCache

_BEARER = "bearer "


@dataclass(frozen=True)
class ChannelStatus:
    channel_id: str
    status: str  # onboarding | active | suspended (services/channels/model.py)
    max_amount: int | None

    @property
    def is_active(self) -> bool:
        return self.status == "active"


class ChannelDirectory:
    """The status and amount limit of a channel, from the channels repository, cached."""

    def __init__(self, pool: AsyncConnectionPool, *, ttl_s: float):
        self._pool = pool
        self._cache: TtlCache[ChannelStatus | None] = TtlCache(ttl_s)

    async def get(self, channel_id: str) -> ChannelStatus | None:
        return await self._cache.get(channel_id, lambda: self._load(channel_id))

    async def _load(self, channel_id: str) -> ChannelStatus | None:
        async with self._pool.connection() as conn:
            record = await channels_repository.channel_record(conn, channel_id)
        if record is None:
            return None
        return ChannelStatus(channel_id, record.channel.status, record.channel.max_amount)


def presented_key(request: web.Request) -> str | None:
    """The API key from `Authorization: Bearer <key>`, else from `X-Api-Key`."""
    authorization = request.headers.get("Authorization")
    if authorization is not None and authorization[:7].lower() == _BEARER:
        return authorization[7:].strip() or None
    return request.headers.get("X-Api-Key") or None


async def authenticate(request: web.Request, authenticator: ApiKeyAuthenticator) -> ApiKey | None:
    key = presented_key(request)
    return None if key is None else await authenticator.authenticate(key)
