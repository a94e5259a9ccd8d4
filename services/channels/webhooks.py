"""Webhook endpoint management, shared by the admin API and the command line (docs/webhooks.md,
"Managing endpoints").

As in onboarding.py: each operation validates first (errors by field, nothing written), then makes
its change and its audit entry in one transaction. A signing secret is generated here, sealed to
the notifier's public key, and returned once, to the caller of the operation that made it; this
side can never read a secret back, and no log line, error or audit row carries one (fingerprints
name them). The delivery rows are the notifier's; this side reads them and puts them back in the
queue (redeliver), nothing more.
"""
from __future__ import annotations

import asyncio
import logging
import secrets as random
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.channels import repository as repo, webhook_repository as store
from services.channels.model import channel_id_error
from services.channels.onboarding import Conflict, DependencyUnavailable, InvalidInput, NotFound
from services.channels.vault import KeyFileError, PublicKeyWrapper, SealedCredentials
from services.channels.webhook_model import (
    ATTEMPTS_SHOWN_MAX,
    DELETED,
    DISABLED,
    ENABLED,
    ENDPOINTS_PER_CHANNEL_MAX,
    REDELIVER_MAX,
    EndpointInput,
    delivery_id_of,
    endpoint_id_valid,
    parse_delivery_query,
    parse_disable,
    parse_endpoint_changes,
    parse_new_endpoint,
    parse_redelivery,
    parse_rotation,
)
from services.channels.webhook_repository import EndpointRecord
from services.common.text import untrusted
from services.notifier.destinations import DestinationPolicy, DestinationRefused
from services.notifier.secrets import fingerprint, new_secret, seal_secret

log = logging.getLogger(__name__)

DNS_TIMEOUT_S = 5.0
_INVALID = "one or more fields are invalid; nothing was changed"


def new_endpoint_id() -> str:
    return "ep_" + random.token_hex(10)


class WebhookManagement:
    def __init__(self, pool: AsyncConnectionPool, *, public_key_file: Path, policy: DestinationPolicy,
                 dns_timeout_s: float = DNS_TIMEOUT_S):
        self._pool = pool
        self._public_key_file = Path(public_key_file)
        self._policy = policy
        self._dns_timeout_s = dns_timeout_s

    # Endpoints

    async def add_endpoint(self, channel_id: str, body: Any, actor: str) -> tuple[EndpointRecord, str]:
        """(the endpoint, its signing secret: shown to the caller this once)."""
        if channel_id_error(channel_id):
            raise NotFound(f"no channel {channel_id!r}")
        settings, errors = parse_new_endpoint(body, self._policy)
        if settings is None:
            raise InvalidInput(_INVALID, errors)
        await self._check_destination(settings.url)  # before any lock: DNS may be slow
        endpoint_id, secret = new_endpoint_id(), new_secret()
        async with self._pool.connection() as conn, conn.transaction():
            if not await store.lock_channel(conn, channel_id):
                raise NotFound(f"no channel {channel_id!r}")
            live = await store.live_endpoints(conn, channel_id)
            if settings.url in live:  # a repeated `webhooks add` would deliver every event twice
                raise Conflict(f"channel {channel_id!r} already has endpoint {live[settings.url]} for this URL; "
                               "nothing was changed")
            if len(live) >= ENDPOINTS_PER_CHANNEL_MAX:
                raise Conflict(f"channel {channel_id!r} already has {len(live)} endpoints, the most a channel may "
                               "have (docs/webhooks.md, \"Managing endpoints\"): delete one first")
            await store.insert_endpoint(conn, endpoint_id, channel_id, settings, actor)
            sealed = await self._sealed(conn, secret, endpoint_id, 1)
            await store.insert_secret(conn, endpoint_id, 1, sealed, fingerprint=fingerprint(secret), created_by=actor)
            await repo.audit(conn, actor, "webhook_endpoint_created", channel_id=channel_id, version=1,
                             kek_id=sealed.key_id, webhook_endpoint_id=endpoint_id,
                             detail=f"{_described(settings)}; secret fingerprint {fingerprint(secret)}")
            record = await _written(conn, endpoint_id)
        log.info("webhook endpoint %s created", endpoint_id, extra={"channel_id": channel_id})
        return record, secret

    async def endpoints(self, channel_id: str, *, include_deleted: bool = False) -> list[EndpointRecord]:
        async with self._pool.connection() as conn:
            if channel_id_error(channel_id) or not await repo.existing_channel_ids(conn, [channel_id]):
                raise NotFound(f"no channel {channel_id!r}")
            return await store.endpoints(conn, channel_id, include_deleted=include_deleted)

    async def endpoint(self, endpoint_id: str) -> EndpointRecord:
        async with self._pool.connection() as conn:
            record = await store.endpoint(conn, endpoint_id) if endpoint_id_valid(endpoint_id) else None
        if record is None:
            raise NotFound(f"no webhook endpoint {endpoint_id!r}")
        return record

    async def update_endpoint(self, endpoint_id: str, body: Any, actor: str) -> EndpointRecord:
        current = await self.endpoint(endpoint_id)
        changed, errors = parse_endpoint_changes(current.settings, body, self._policy)
        if changed is None:
            raise InvalidInput(_INVALID, errors)
        if changed.url != current.settings.url:
            await self._check_destination(changed.url)  # before any lock: DNS may be slow
        async with self._pool.connection() as conn, conn.transaction():
            record = await self._locked(conn, endpoint_id, refuse_deleted=True)
            # Applied again to the locked row, so a concurrent change to another field is kept.
            changed, _ = parse_endpoint_changes(record.settings, body, self._policy)
            assert changed is not None, "the same body validated above"
            if changed == record.settings:
                return record
            if changed.url != record.settings.url:
                await store.lock_channel(conn, record.channel_id)  # as add_endpoint does: one URL per channel
                other = (await store.live_endpoints(conn, record.channel_id)).get(changed.url)
                if other is not None:
                    raise Conflict(f"channel {record.channel_id!r} already has endpoint {other} for this URL; "
                                   "nothing was changed")
            await store.update_endpoint(conn, endpoint_id, changed)
            fields = [name for name, before, after in (
                ("url", record.settings.url, changed.url), ("eventTypes", record.settings.event_types,
                                                            changed.event_types),
                ("description", record.settings.description, changed.description)) if before != after]
            await repo.audit(conn, actor, "webhook_endpoint_updated", channel_id=record.channel_id,
                             webhook_endpoint_id=endpoint_id,
                             detail=f"changed {', '.join(fields)}; now {_described(changed)}")
            record = await _written(conn, endpoint_id)
        log.info("webhook endpoint %s updated", endpoint_id, extra={"channel_id": record.channel_id})
        return record

    async def disable(self, endpoint_id: str, body: Any, actor: str) -> EndpointRecord:
        reason, errors = parse_disable(body)
        if reason is None:
            raise InvalidInput(_INVALID, errors)
        return await self._set_status(endpoint_id, DISABLED, reason, actor)

    async def enable(self, endpoint_id: str, actor: str) -> EndpointRecord:
        """Enabled again; the reason it was disabled and its failure run are cleared."""
        return await self._set_status(endpoint_id, ENABLED, None, actor)

    async def _set_status(self, endpoint_id: str, status: str, reason: str | None, actor: str) -> EndpointRecord:
        async with self._pool.connection() as conn, conn.transaction():
            record = await self._locked(conn, endpoint_id, refuse_deleted=True)
            if record.status == status:
                return record
            await store.set_status(conn, endpoint_id, status, reason)
            if status == ENABLED:
                action, detail = "webhook_endpoint_enabled", f"was disabled: {record.disabled_reason}"
            else:
                action, detail = "webhook_endpoint_disabled", f"reason: {reason}"
            await repo.audit(conn, actor, action, channel_id=record.channel_id, webhook_endpoint_id=endpoint_id,
                             detail=detail)
            record = await _written(conn, endpoint_id)
        log.info("webhook endpoint %s %s", endpoint_id, status, extra={"channel_id": record.channel_id})
        return record

    async def delete(self, endpoint_id: str, actor: str) -> EndpointRecord:
        """Deleted for good: never delivered to again, its pending deliveries cancelled and its secrets
        expired; the row stays for its delivery log."""
        async with self._pool.connection() as conn, conn.transaction():
            record = await self._locked(conn, endpoint_id)
            if record.status == DELETED:
                return record
            await store.set_status(conn, endpoint_id, DELETED, None)
            cancelled = await store.cancel_pending(conn, endpoint_id)
            await store.expire_all_secrets(conn, endpoint_id)
            await repo.audit(conn, actor, "webhook_endpoint_deleted", channel_id=record.channel_id,
                             webhook_endpoint_id=endpoint_id,
                             detail=f"was {record.status}; {cancelled} pending deliveries cancelled")
            record = await _written(conn, endpoint_id)
        log.info("webhook endpoint %s deleted, %d pending deliveries cancelled", endpoint_id, cancelled,
                 extra={"channel_id": record.channel_id})
        return record

    # Signing secrets

    async def rotate_secret(self, endpoint_id: str, body: Any, actor: str) -> tuple[EndpointRecord, str]:
        """A new secret version (returned this once); the previous one keeps signing for the overlap,
        so receivers switch without a gap, and older ones stop now: at most two sign at any time."""
        overlap_s, errors = parse_rotation(body)
        if overlap_s is None:
            raise InvalidInput(_INVALID, errors)
        secret = new_secret()
        async with self._pool.connection() as conn, conn.transaction():
            record = await self._locked(conn, endpoint_id, refuse_deleted=True)
            previous = await store.newest_secret_version(conn, endpoint_id)
            version = previous + 1
            await store.retire_secrets(conn, endpoint_id, previous, overlap_s)
            sealed = await self._sealed(conn, secret, endpoint_id, version)
            await store.insert_secret(conn, endpoint_id, version, sealed, fingerprint=fingerprint(secret),
                                      created_by=actor)
            await repo.audit(conn, actor, "webhook_secret_rotated", channel_id=record.channel_id, version=version,
                             kek_id=sealed.key_id, webhook_endpoint_id=endpoint_id,
                             detail=f"fingerprint {fingerprint(secret)}; version {previous} signs for {overlap_s} s "
                                    "more")
            record = await _written(conn, endpoint_id)
        log.info("webhook endpoint %s: signing secret version %d, the previous signs for %d s", endpoint_id, version,
                 overlap_s, extra={"channel_id": record.channel_id})
        return record, secret

    # The delivery log

    async def deliveries(self, endpoint_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        """One page, newest first; `nextCursor` asks for the next (older) page."""
        record = await self.endpoint(endpoint_id)
        wanted, errors = parse_delivery_query(query)
        if wanted is None:
            raise InvalidInput("one or more query parameters are invalid", errors)
        async with self._pool.connection() as conn:
            rows = await store.deliveries(conn, endpoint_id, state=wanted.state, since=wanted.since,
                                          before_id=wanted.before_id, limit=wanted.limit)
        next_cursor = str(rows[-1]["id"]) if len(rows) == wanted.limit else None
        return {"endpointId": record.endpoint_id, "deliveries": [store.delivery_view(r) for r in rows],
                "nextCursor": next_cursor}

    async def delivery(self, delivery_id: str) -> dict[str, Any]:
        """The delivery with its body (payment data, no phone number) and its attempts."""
        number = delivery_id_of(delivery_id)
        async with self._pool.connection() as conn:
            row = await store.delivery(conn, number) if number is not None else None
            if row is None:
                raise NotFound(f"no webhook delivery {delivery_id!r}")
            attempts = await store.attempts(conn, row["id"], ATTEMPTS_SHOWN_MAX)
        return {**store.delivery_view(row), "attemptLog": [store.attempt_view(a) for a in attempts]}

    async def attempts(self, delivery_id: str) -> dict[str, Any]:
        shown = await self.delivery(delivery_id)
        return {"deliveryId": shown["deliveryId"], "attempts": shown["attemptLog"]}

    async def redeliver_delivery(self, delivery_id: str, actor: str) -> dict[str, Any]:
        number = delivery_id_of(delivery_id)
        async with self._pool.connection() as conn, conn.transaction():
            row = await store.delivery(conn, number) if number is not None else None
            if row is None:
                raise NotFound(f"no webhook delivery {delivery_id!r}")
            record = await self._locked(conn, row["endpoint_id"], refuse_deleted=True, refuse_disabled=True)
            count = await store.requeue_one(conn, row["id"])
            await repo.audit(conn, actor, "webhook_redelivery_requested", channel_id=record.channel_id,
                             webhook_endpoint_id=record.endpoint_id,
                             detail=f"{count} deliveries requeued (delivery {row['id']})")
        log.info("webhook endpoint %s: delivery %d requeued", record.endpoint_id, row["id"],
                 extra={"channel_id": record.channel_id})
        return {"endpointId": record.endpoint_id, "requeued": count}

    async def redeliver(self, endpoint_id: str, body: Any, actor: str) -> dict[str, Any]:
        """One event (by its id) or every delivery whose event occurred since a time, back in the
        queue with the same webhook-id (so receivers that saw it already deduplicate)."""
        selector, errors = parse_redelivery(body)
        if selector is None:
            raise InvalidInput(_INVALID, errors)
        async with self._pool.connection() as conn, conn.transaction():
            record = await self._locked(conn, endpoint_id, refuse_deleted=True, refuse_disabled=True)
            if selector.since is not None:
                matching = await store.count_redeliverable(conn, endpoint_id, selector)
                if matching > REDELIVER_MAX:
                    raise InvalidInput(f"{matching} deliveries match, more than {REDELIVER_MAX} at once; nothing was "
                                       "changed", {"until": "narrow the window: add or move `until`"})
            count = await store.requeue(conn, endpoint_id, selector)
            if selector.event_id is not None and count == 0:
                raise NotFound(f"no delivery of event {untrusted(selector.event_id, 100)!r} to this endpoint that "
                               "can be redelivered (none, or being attempted right now)")
            await repo.audit(conn, actor, "webhook_redelivery_requested", channel_id=record.channel_id,
                             webhook_endpoint_id=endpoint_id,
                             detail=f"{count} deliveries requeued ({selector.describe()})")
        log.info("webhook endpoint %s: %d deliveries requeued", endpoint_id, count,
                 extra={"channel_id": record.channel_id})
        return {"endpointId": endpoint_id, "requeued": count}

    # Helpers

    async def _check_destination(self, url: str) -> None:
        """The DNS half of the destination rules: every address the host resolves to must be allowed."""
        try:
            async with asyncio.timeout(self._dns_timeout_s):
                await self._policy.check(url)
        except DestinationRefused as refused:
            raise InvalidInput("the URL may not receive webhooks; nothing was changed",
                               {"url": untrusted(str(refused), 300)}) from None
        except TimeoutError:
            raise InvalidInput("the URL may not receive webhooks; nothing was changed",
                               {"url": f"its host did not resolve within {self._dns_timeout_s:g} s"}) from None

    async def _sealed(self, conn: AsyncConnection, secret: str, endpoint_id: str, version: int) -> SealedCredentials:
        """Sealed to the public key read now, under the KEK lock (shared), as credential writes are:
        `vault rotate-kek --webhooks --retire-old` holds it exclusively while it checks that no row
        uses an old key, so no secret sealed to that key can land after it was found unused."""
        await repo.lock_keks(conn, exclusive=False)
        return seal_secret(secret, endpoint_id, version, self._wrapper())

    def _wrapper(self) -> PublicKeyWrapper:
        try:
            return PublicKeyWrapper.from_file(self._public_key_file)
        except KeyFileError as exc:
            raise DependencyUnavailable(f"webhook signing secrets cannot be sealed: {exc}") from None

    async def _locked(self, conn: AsyncConnection, endpoint_id: str, *, refuse_deleted: bool = False,
                      refuse_disabled: bool = False) -> EndpointRecord:
        record = await store.endpoint(conn, endpoint_id, for_update=True) if endpoint_id_valid(endpoint_id) else None
        if record is None:
            raise NotFound(f"no webhook endpoint {endpoint_id!r}")
        if refuse_deleted and record.status == DELETED:
            raise Conflict(f"webhook endpoint {endpoint_id} is deleted; nothing was changed")
        if refuse_disabled and record.status == DISABLED:
            raise Conflict(f"webhook endpoint {endpoint_id} is disabled: enable it first; nothing was changed")
        return record


async def _written(conn: AsyncConnection, endpoint_id: str) -> EndpointRecord:
    record = await store.endpoint(conn, endpoint_id)
    assert record is not None, "written in this transaction"
    return record


def _described(settings: EndpointInput) -> str:
    """For the audit: the URL without its query (a receiver may put a token of its own there)."""
    parts = urlsplit(settings.url)
    where = f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?…" if parts.query else "")
    return f"url {untrusted(where, 300)}, events {', '.join(settings.event_types)}"
