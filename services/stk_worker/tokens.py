"""Daraja's access tokens shared by every STK worker process, through PostgreSQL.

Each token Daraja issues invalidates the app's previous one (docs/daraja.md §1). One worker keeps one
token per app in memory; two workers minting their own would take turns invalidating each other, and a
call refused twice in a row is a permanent error (the push fails). So a worker that needs a token (none
yet, near its expiry, or refused) asks here: under a per-app advisory lock, it takes the token another
worker stored if that one is still good and not the one just refused, and mints (then stores) one
only if not. The token is sealed with the vault's key, as channel credentials are (docs/scaling.md,
"Daraja's tokens").

If PostgreSQL cannot be reached the worker mints on its own, as it did alone: no push waits on the
token store (a push needs its claim in PostgreSQL anyway, so such a mint is rare).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

import psycopg
from psycopg_pool import AsyncConnectionPool

from services.channels.vault import KeyProvider, SealedCredentials, VaultError, open_bytes, seal_bytes
from services.daraja.models import AccessToken, AppCredentials

log = logging.getLogger(__name__)

LOCK_WAIT_MS = 5000
_TOKEN_LOCKS = 7_262_025  # first key of the per-app advisory locks (7_262_021-24 are taken: ledger/store.py)


def app_ref(app: AppCredentials) -> str:
    """Names the app (and its secret: a rotated secret is another token) without revealing either."""
    return hashlib.sha256(f"{app.consumer_key}\x00{app.consumer_secret}".encode()).hexdigest()


def _aad(ref: str) -> bytes:
    return f"mpesa-pipeline/daraja-token/v1\x00{ref}".encode()


class SharedTokens:
    def __init__(self, pool: AsyncConnectionPool, vault: KeyProvider):
        self.pool, self.vault = pool, vault

    async def obtain(self, app: AppCredentials, refused: str | None, mint: Callable[[], Awaitable[AccessToken]],
                     min_remaining_s: float) -> AccessToken:
        """The app's token: the stored one if it has `min_remaining_s` left (half its life, if shorter:
        the client's own refresh rule) and is not `refused`, else one `mint` asks Daraja for, stored for
        the other workers. Daraja's errors pass through."""
        ref = app_ref(app)
        minted = None
        try:
            async with self.pool.connection() as conn, conn.transaction():
                # Held while minting: the other workers wait for this token rather than mint their own,
                # but not for ever: a worker frozen mid-mint (its Daraja call is bounded by the client's
                # timeouts, a stopped process is not) costs the others LOCK_WAIT, then they mint alone.
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_WAIT_MS}ms'")
                await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_TOKEN_LOCKS, ref))
                stored = await self._stored(conn, ref, refused, min_remaining_s)
                if stored is not None:
                    return stored
                minted = await mint()
                await self._store(conn, ref, minted)
        except psycopg.Error as exc:  # the store is away: a token all the same (minted once)
            log.warning("shared Daraja token store unavailable (%s); minting for this worker alone", type(exc).__name__)
            return minted or await mint()
        return minted

    async def _stored(self, conn: psycopg.AsyncConnection, ref: str, refused: str | None,
                      min_remaining_s: float) -> AccessToken | None:
        cur = await conn.execute("SELECT key_id, wrapped_key, nonce, ciphertext,"
                                 " extract(epoch FROM expires_at - now())::float8,"
                                 " extract(epoch FROM expires_at - minted_at)::float8"
                                 " FROM daraja_tokens WHERE app = %s",
                                 (ref,))
        row = await cur.fetchone()
        if row is None or row[4] <= min(min_remaining_s, row[5] / 2):
            return None
        try:
            value = open_bytes(SealedCredentials(row[0], bytes(row[1]), bytes(row[2]), bytes(row[3])), _aad(ref),
                               self.vault, "a shared Daraja token").decode()
        except VaultError as exc:  # sealed under a key this worker does not hold (retired): mint anew
            log.warning("shared Daraja token cannot be opened: %s", type(exc).__name__)
            return None
        return None if value == refused else AccessToken(value, int(row[4]))

    async def _store(self, conn: psycopg.AsyncConnection, ref: str, token: AccessToken) -> None:
        sealed = seal_bytes(token.value.encode(), _aad(ref), self.vault)
        await conn.execute(
            "INSERT INTO daraja_tokens (app, key_id, wrapped_key, nonce, ciphertext, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, now() + %s) ON CONFLICT (app) DO UPDATE SET key_id = EXCLUDED.key_id,"
            " wrapped_key = EXCLUDED.wrapped_key, nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext,"
            " expires_at = EXCLUDED.expires_at, minted_at = now()",
            (ref, sealed.key_id, sealed.wrapped_key, sealed.nonce, sealed.ciphertext,
             timedelta(seconds=token.expires_in_s)))
