"""Upstream API keys: random, shown once, stored as SHA-256, scoped to channels.

A key reads `mpk_<key id>_<secret>`: the key id (12 hex digits) finds the row and names the key
in logs and audit; the secret (256 random bits) is what makes it a credential. Keys are that
random, so a fast hash is enough: no one can guess their way back from the hash.

The ingress authenticates each request with `ApiKeyAuthenticator.authenticate`, which caches
answers (found or not) for a few seconds: a revocation takes effect within that time.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from services.channels import repository as repo

_KEY_FORMAT = re.compile(r"mpk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")


def new_api_key() -> tuple[str, str]:
    """(key id, the key itself). The key is shown to the caller once and never stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"mpk_{key_id}_{secrets.token_urlsafe(32)}"


def key_sha256(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def key_id_of(api_key: str) -> str | None:
    match = _KEY_FORMAT.fullmatch(api_key)
    return match.group(1) if match else None


@dataclass(frozen=True)
class ApiKey:
    """An authenticated upstream caller. Holds no secret."""

    key_id: str
    label: str
    channel_ids: frozenset[str]

    def allows(self, channel_id: str) -> bool:
        return channel_id in self.channel_ids


class ApiKeyAuthenticator:
    """`await authenticate(key)` -> ApiKey, or None for an unknown, malformed or revoked key.

    The ingress answers None with 401 and a key whose `allows(channel_id)` is False with 403.
    """

    def __init__(self, pool: AsyncConnectionPool, *, ttl_s: float = 30.0, entries_max: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self._pool = pool
        self._ttl_s = ttl_s
        self._entries_max = entries_max
        self._clock = clock
        # sha256 of a presented key -> (expires at, answer). Keyed by the hash so no key is kept in memory.
        self._answers: OrderedDict[bytes, tuple[float, ApiKey | None]] = OrderedDict()

    async def authenticate(self, presented: str | None) -> ApiKey | None:
        key_id = key_id_of(presented) if isinstance(presented, str) else None
        if presented is None or key_id is None:
            return None  # malformed: no database round trip
        digest = key_sha256(presented)
        cached = self._answers.get(digest)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        answer = await self._load(key_id, digest)
        self._remember(digest, answer)
        return answer

    def forget_all(self) -> None:
        self._answers.clear()

    async def _load(self, key_id: str, digest: bytes) -> ApiKey | None:
        async with self._pool.connection() as conn:
            row = await repo.api_key_for_authentication(conn, key_id)
        if row is None or row["revoked_at"] is not None:
            return None
        if not hmac.compare_digest(bytes(row["key_sha256"]), digest):
            return None
        return ApiKey(row["key_id"], row["label"], frozenset(row["channel_ids"]))

    def _remember(self, digest: bytes, answer: ApiKey | None) -> None:
        self._answers.pop(digest, None)
        while len(self._answers) >= self._entries_max:
            self._answers.popitem(last=False)
        self._answers[digest] = (self._clock() + self._ttl_s, answer)
