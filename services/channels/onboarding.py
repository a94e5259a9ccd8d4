"""The onboarding operations, shared by the admin API and the command line.

Each operation validates its input first (errors by field, nothing written), then makes its change
and the audit entry in one transaction. Credentials are sealed with the vault's public key: this
side of the system can write credentials but never read them back.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.channels import apikeys, compliance, repository as repo
from services.channels.model import (
    ACTIVE,
    SUSPENDED,
    Errors,
    activation_errors,
    channel_id_error,
    parse_api_key_request,
    parse_channel_changes,
    parse_credentials,
    parse_new_channel,
)
from services.channels.repository import ChannelRecord
from services.channels.vault import KeyFileError, PublicKeyWrapper, fingerprint, seal
from services.daraja.client import DarajaClient, DarajaTimeouts
from services.daraja.errors import DarajaError, ErrorKind
from services.daraja.models import AppCredentials

log = logging.getLogger(__name__)

NAIROBI = timezone(timedelta(hours=3))  # EAT, no daylight saving: consent dates are Kenyan dates


class OnboardingError(Exception):
    """An expected refusal; `status` and `title` become the problem response."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str, errors: Errors | None = None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or {}


class InvalidInput(OnboardingError):
    status, title = 400, "Invalid input"


class NotFound(OnboardingError):
    status, title = 404, "Not found"


class Conflict(OnboardingError):
    status, title = 409, "Conflict"


class CredentialsRefused(OnboardingError):
    status, title = 422, "Daraja refused the credentials"


class DependencyUnavailable(OnboardingError):
    status, title = 503, "Service unavailable"


CredentialCheck = Callable[[AppCredentials], Awaitable[None]]


def daraja_credential_check(base_url: str, timeouts: DarajaTimeouts = DarajaTimeouts()) -> CredentialCheck:
    """Checks credentials by asking Daraja for an OAuth token.

    A client per check, closed at once: the onboarding side keeps no credentials or tokens in memory.
    Note that a new token may invalidate the app's previous one (docs/daraja.md §1); the STK worker's
    client refreshes once when that happens.
    """
    async def check(app: AppCredentials) -> None:
        try:
            async with DarajaClient(base_url, timeouts=timeouts) as client:
                await client.fetch_token(app)
        except DarajaError as error:  # its message is redacted and names no credential
            if error.kind is ErrorKind.PERMANENT:
                raise CredentialsRefused(f"Daraja at {base_url} issued no token for these credentials: {error}; "
                                         "nothing was stored") from None
            raise DependencyUnavailable(f"Daraja at {base_url} could not be asked to check the credentials: "
                                        f"{error}; nothing was stored, try again") from None
    return check


class Onboarding:
    def __init__(self, pool: AsyncConnectionPool, *, public_key_file: Path,
                 credential_check: CredentialCheck | None = None,
                 today: Callable[[], date] = lambda: datetime.now(NAIROBI).date(),
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self._pool = pool
        self._public_key_file = Path(public_key_file)
        self._credential_check = credential_check
        self._today = today
        self._now = now

    # Channels

    async def create_channel(self, body: Any, actor: str) -> ChannelRecord:
        channel, errors = parse_new_channel(body, self._today())
        if channel is None:
            raise InvalidInput("one or more fields are invalid; nothing was changed", errors)
        async with self._pool.connection() as conn, conn.transaction():
            if not await repo.insert_channel(conn, channel):
                raise Conflict(f"channel {channel.channel_id!r} already exists")
            await repo.audit(conn, actor, "channel_created", channel_id=channel.channel_id)
            record = await _written(conn, channel.channel_id)
        log.info("channel created", extra={"channel_id": channel.channel_id})
        return record

    async def update_channel(self, channel_id: str, body: Any, actor: str) -> ChannelRecord:
        async with self._pool.connection() as conn, conn.transaction():
            record = await self._locked(conn, channel_id)
            changed, errors = parse_channel_changes(record.channel, body, self._today())
            if changed is None:
                raise InvalidInput("one or more fields are invalid; nothing was changed", errors)
            if changed == record.channel:
                return record
            await repo.update_channel(conn, changed)
            fields = ", ".join(sorted(k for k in body if k != "channelId"))
            await repo.audit(conn, actor, "channel_updated", channel_id=channel_id, detail=f"changed {fields}")
            record = await _written(conn, channel_id)
        log.info("channel updated", extra={"channel_id": channel_id})
        return record

    async def channel(self, channel_id: str) -> ChannelRecord:
        async with self._pool.connection() as conn:
            record = await repo.channel_record(conn, channel_id) if not channel_id_error(channel_id) else None
        if record is None:
            raise NotFound(f"no channel {channel_id!r}")
        return record

    async def channels(self) -> list[ChannelRecord]:
        async with self._pool.connection() as conn:
            return await repo.channel_records(conn)

    async def compliance(self) -> dict[str, Any]:
        """The compliance report of every channel (services/channels/compliance.py)."""
        async with self._pool.connection() as conn:
            rows = await compliance.compliance_rows(conn)
        return compliance.report(rows, self._now())

    async def suspend(self, channel_id: str, actor: str) -> ChannelRecord:
        return await self._set_status(channel_id, SUSPENDED, actor)

    async def resume(self, channel_id: str, actor: str) -> ChannelRecord:
        """Activates the channel: the first time after onboarding, or again after a suspension."""
        return await self._set_status(channel_id, ACTIVE, actor)

    async def _set_status(self, channel_id: str, status: str, actor: str) -> ChannelRecord:
        async with self._pool.connection() as conn, conn.transaction():
            record = await self._locked(conn, channel_id)
            if record.channel.status == status:
                return record
            if status == ACTIVE:
                errors = activation_errors(record.channel, record.credentials is not None)
                if errors:  # the fields in the first line too: the command line's one line says it all
                    raise InvalidInput(f"channel {channel_id!r} cannot be activated yet: it lacks "
                                       f"{', '.join(errors)}; nothing was changed", errors)
            await repo.set_status(conn, channel_id, status)
            action = "channel_activated" if status == ACTIVE else "channel_suspended"
            await repo.audit(conn, actor, action, channel_id=channel_id, detail=f"was {record.channel.status}")
            record = await _written(conn, channel_id)
        log.info("channel %s", status, extra={"channel_id": channel_id})
        return record

    # Credentials

    async def set_credentials(self, channel_id: str, body: Any, actor: str) -> ChannelRecord:
        """The channel's first credentials."""
        return await self._write_credentials(channel_id, body, actor, rotate=False)

    async def rotate_credentials(self, channel_id: str, body: Any, actor: str) -> ChannelRecord:
        """A new credential version; older versions stay readable for payments already in flight."""
        return await self._write_credentials(channel_id, body, actor, rotate=True)

    async def _write_credentials(self, channel_id: str, body: Any, actor: str, *, rotate: bool) -> ChannelRecord:
        given, errors = parse_credentials(body)
        if given is None:
            raise InvalidInput("one or more fields are invalid; nothing was stored", errors)
        self._wrapper()  # fail early, before asking Daraja, if credentials cannot be sealed here
        _check_credentials_state(await self.channel(channel_id), rotate)
        validated_at = None
        if given.validate:
            await self._validate(channel_id, given.app, actor)  # before any lock: Daraja may be slow
            validated_at = datetime.now(timezone.utc)
        async with self._pool.connection() as conn, conn.transaction():
            record = await self._locked(conn, channel_id)
            _check_credentials_state(record, rotate)
            version = record.credentials.version + 1 if record.credentials else 1
            await repo.lock_keks(conn, exclusive=False)
            sealed = seal(given.app, channel_id, version, self._wrapper())  # read now: a KEK rotation may be under way
            await repo.insert_credentials(conn, channel_id, version, sealed, fingerprint=fingerprint(given.app),
                                          app_key_id=given.app.key_id, validated_at=validated_at, created_by=actor)
            if validated_at:
                await repo.audit(conn, actor, "credentials_validated", channel_id=channel_id, version=version,
                                 detail="Daraja issued an OAuth token")
            await repo.audit(conn, actor, "credentials_rotated" if rotate else "credentials_set",
                             channel_id=channel_id, version=version, kek_id=sealed.key_id,
                             detail=f"fingerprint {fingerprint(given.app)}")
            record = await _written(conn, channel_id)
        log.info("credentials %s: version %d sealed to key %s", "rotated" if rotate else "set", version,
                 sealed.key_id, extra={"channel_id": channel_id})
        return record

    def _wrapper(self) -> PublicKeyWrapper:
        try:
            return PublicKeyWrapper.from_file(self._public_key_file)
        except KeyFileError as exc:
            raise DependencyUnavailable(f"credentials cannot be sealed: {exc}") from None

    async def _validate(self, channel_id: str, app: AppCredentials, actor: str) -> None:
        if self._credential_check is None:
            raise DependencyUnavailable("no Daraja is configured to validate credentials")
        try:
            await self._credential_check(app)
        except CredentialsRefused as refused:
            async with self._pool.connection() as conn, conn.transaction():
                await repo.audit(conn, actor, "credentials_refused", channel_id=channel_id, detail=refused.detail)
            log.warning("Daraja refused submitted credentials", extra={"channel_id": channel_id})
            raise

    # API keys

    async def issue_api_key(self, body: Any, actor: str) -> tuple[dict[str, Any], str]:
        """(the key's record, the key itself: shown to the caller this once)."""
        request, errors = parse_api_key_request(body)
        if request is None:
            raise InvalidInput("one or more fields are invalid; nothing was changed", errors)
        key_id, api_key = apikeys.new_api_key()
        async with self._pool.connection() as conn, conn.transaction():
            known = await repo.existing_channel_ids(conn, list(request.channel_ids))
            unknown = [c for c in request.channel_ids if c not in known]
            if unknown:
                raise InvalidInput("the key would be scoped to channels that do not exist; nothing was changed",
                                   {"channelIds": f"unknown channels: {', '.join(unknown)}"})
            await repo.insert_api_key(conn, key_id, apikeys.key_sha256(api_key), request.label,
                                      list(request.channel_ids), actor)
            await repo.audit(conn, actor, "api_key_issued", api_key_id=key_id,
                             detail=f"channels {', '.join(request.channel_ids)}")
            row = await repo.api_key(conn, key_id)
        assert row is not None, "inserted in this transaction"
        log.info("api key %s issued", key_id)
        return repo.api_key_view(row), api_key

    async def revoke_api_key(self, key_id: str, actor: str) -> dict[str, Any]:
        async with self._pool.connection() as conn, conn.transaction():
            if await repo.revoke_api_key(conn, key_id, actor):
                await repo.audit(conn, actor, "api_key_revoked", api_key_id=key_id)
                log.info("api key %s revoked", key_id)
            row = await repo.api_key(conn, key_id)
        if row is None:
            raise NotFound(f"no API key {key_id!r}")
        return repo.api_key_view(row)

    async def api_keys(self) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            return [repo.api_key_view(row) for row in await repo.api_keys(conn)]

    async def _locked(self, conn: AsyncConnection, channel_id: str) -> ChannelRecord:
        record = await repo.channel_record(conn, channel_id, for_update=True) if not channel_id_error(channel_id) \
            else None
        if record is None:
            raise NotFound(f"no channel {channel_id!r}")
        return record


async def _written(conn: AsyncConnection, channel_id: str) -> ChannelRecord:
    record = await repo.channel_record(conn, channel_id)
    assert record is not None, "written in this transaction"
    return record


def _check_credentials_state(record: ChannelRecord, rotate: bool) -> None:
    if rotate and record.credentials is None:
        raise Conflict(f"channel {record.channel.channel_id!r} has no credentials to rotate: set them first")
    if not rotate and record.credentials is not None:
        raise Conflict(f"channel {record.channel.channel_id!r} already has credentials (version "
                       f"{record.credentials.version}): rotate them instead")
