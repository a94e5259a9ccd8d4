"""The SQL of webhook endpoint management, one function per statement group; callers own the
transaction. Never reads a sealed secret back: this side only writes them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from services.channels.vault import SealedCredentials
from services.channels.webhook_model import EndpointInput, RedeliverySelector


@dataclass(frozen=True)
class SecretSummary:
    """What may be shown about a signing secret: its version and fingerprint, never the secret."""

    version: int
    fingerprint: str
    created_at: datetime
    expires_at: datetime | None

    def view(self) -> dict[str, Any]:
        return {"version": self.version, "fingerprint": self.fingerprint, "createdAt": _iso(self.created_at),
                "expiresAt": _iso(self.expires_at)}


@dataclass(frozen=True)
class EndpointRecord:
    endpoint_id: str
    channel_id: str
    settings: EndpointInput
    status: str
    disabled_reason: str | None
    failing_since: datetime | None
    created_at: datetime
    created_by: str
    updated_at: datetime
    signing_secrets: tuple[SecretSummary, ...]  # the versions that sign now, newest first

    def view(self) -> dict[str, Any]:
        return {"endpointId": self.endpoint_id, "channelId": self.channel_id, "url": self.settings.url,
                "eventTypes": list(self.settings.event_types), "description": self.settings.description,
                "status": self.status, "disabledReason": self.disabled_reason,
                "failingSince": _iso(self.failing_since), "createdAt": _iso(self.created_at),
                "createdBy": self.created_by, "updatedAt": _iso(self.updated_at),
                "signingSecrets": [s.view() for s in self.signing_secrets]}


_ENDPOINT_COLUMNS = ("endpoint_id, channel_id, url, event_types, description, status, disabled_reason, failing_since,"
                     " created_at, created_by, updated_at")
_DELIVERY_COLUMNS = ("id, webhook_id, event_id, endpoint_id, channel_id, payment_id, event_type, occurred_at, state,"
                     " attempts, next_attempt_at, created_at, finished_at, last_http_status, last_error")


async def lock_channel(conn: AsyncConnection, channel_id: str) -> bool:
    """Serialises endpoint creation per channel (the count limit); False when there is no such channel."""
    cur = await conn.execute("SELECT 1 FROM channels WHERE channel_id = %s FOR NO KEY UPDATE", (channel_id,))
    return await cur.fetchone() is not None


async def live_endpoints(conn: AsyncConnection, channel_id: str) -> dict[str, str]:
    """{url: endpoint id} of the channel's endpoints that are not deleted."""
    cur = await conn.execute("SELECT url, endpoint_id FROM webhook_endpoints WHERE channel_id = %s"
                             " AND status <> 'deleted'", (channel_id,))
    return {row[0]: row[1] for row in await cur.fetchall()}


async def insert_endpoint(conn: AsyncConnection, endpoint_id: str, channel_id: str, settings: EndpointInput,
                          created_by: str) -> None:
    await conn.execute("INSERT INTO webhook_endpoints (endpoint_id, channel_id, url, event_types, description,"
                       " created_by) VALUES (%s, %s, %s, %s, %s, %s)",
                       (endpoint_id, channel_id, settings.url, list(settings.event_types), settings.description,
                        created_by))


async def insert_secret(conn: AsyncConnection, endpoint_id: str, version: int, sealed: SealedCredentials, *,
                        fingerprint: str, created_by: str) -> None:
    await conn.execute("INSERT INTO webhook_secrets (endpoint_id, version, key_id, wrapped_key, nonce, ciphertext,"
                       " fingerprint, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                       (endpoint_id, version, sealed.key_id, sealed.wrapped_key, sealed.nonce, sealed.ciphertext,
                        fingerprint, created_by))


async def endpoint(conn: AsyncConnection, endpoint_id: str, *, for_update: bool = False) -> EndpointRecord | None:
    """The endpoint; for_update locks its row (every change to it and its secrets takes this lock)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE endpoint_id = %s"
                      + (" FOR UPDATE" if for_update else ""), (endpoint_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    return _record(row, (await signing_secrets(conn, [endpoint_id])).get(endpoint_id, ()))


async def endpoints(conn: AsyncConnection, channel_id: str, *, include_deleted: bool) -> list[EndpointRecord]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE channel_id = %s"
                      + ("" if include_deleted else " AND status <> 'deleted'") + " ORDER BY created_at, endpoint_id",
                      (channel_id,))
    rows = await cur.fetchall()
    secrets = await signing_secrets(conn, [row["endpoint_id"] for row in rows])
    return [_record(row, secrets.get(row["endpoint_id"], ())) for row in rows]


async def signing_secrets(conn: AsyncConnection, endpoint_ids: list[str]) -> dict[str, tuple[SecretSummary, ...]]:
    """The versions that still sign (no expiry yet, or one in the future), newest first."""
    cur = await conn.execute(
        "SELECT endpoint_id, version, fingerprint, created_at, expires_at FROM webhook_secrets"
        " WHERE endpoint_id = ANY(%s) AND (expires_at IS NULL OR expires_at > now())"
        " ORDER BY endpoint_id, version DESC", (endpoint_ids,))
    found: dict[str, list[SecretSummary]] = {}
    for row in await cur.fetchall():
        found.setdefault(row[0], []).append(SecretSummary(row[1], row[2], row[3], row[4]))
    return {k: tuple(v) for k, v in found.items()}


async def update_endpoint(conn: AsyncConnection, endpoint_id: str, settings: EndpointInput) -> None:
    await conn.execute("UPDATE webhook_endpoints SET url = %s, event_types = %s, description = %s, updated_at = now()"
                       " WHERE endpoint_id = %s",
                       (settings.url, list(settings.event_types), settings.description, endpoint_id))


async def set_status(conn: AsyncConnection, endpoint_id: str, status: str, reason: str | None) -> None:
    """Enabling (reason None) clears the failure run too: the endpoint starts with a clean record."""
    await conn.execute("UPDATE webhook_endpoints SET status = %s, disabled_reason = %s, updated_at = now(),"
                       " failing_since = CASE WHEN %s = 'enabled' THEN NULL ELSE failing_since END"
                       " WHERE endpoint_id = %s", (status, reason, status, endpoint_id))


async def newest_secret_version(conn: AsyncConnection, endpoint_id: str) -> int:
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM webhook_secrets WHERE endpoint_id = %s",
                             (endpoint_id,))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def retire_secrets(conn: AsyncConnection, endpoint_id: str, previous: int, overlap_s: int) -> None:
    """Before a new version: `previous` signs for overlap_s more seconds (not longer than it already
    would), every older version that still signs stops now. Database time, as the notifier reads it."""
    await conn.execute(
        "UPDATE webhook_secrets SET expires_at = CASE"
        " WHEN version = %(previous)s THEN least(coalesce(expires_at, 'infinity'), now() + %(s)s * interval '1 second')"
        " ELSE now() END"
        " WHERE endpoint_id = %(endpoint)s AND version <= %(previous)s AND (expires_at IS NULL OR expires_at > now())",
        {"previous": previous, "s": overlap_s, "endpoint": endpoint_id})


async def expire_all_secrets(conn: AsyncConnection, endpoint_id: str) -> None:
    await conn.execute("UPDATE webhook_secrets SET expires_at = now() WHERE endpoint_id = %s"
                       " AND (expires_at IS NULL OR expires_at > now())", (endpoint_id,))


async def cancel_pending(conn: AsyncConnection, endpoint_id: str) -> int:
    cur = await conn.execute("UPDATE webhook_deliveries SET state = 'cancelled', finished_at = now(),"
                             " leased_by = NULL, leased_until = NULL WHERE endpoint_id = %s AND state = 'pending'",
                             (endpoint_id,))
    return cur.rowcount


async def deliveries(conn: AsyncConnection, endpoint_id: str, *, state: str | None, since: datetime | None,
                     before_id: int | None, limit: int) -> list[dict[str, Any]]:
    """Newest first (by id), without bodies."""
    clauses: list[str] = ["endpoint_id = %s"]
    params: list[object] = [endpoint_id]
    filters: tuple[tuple[str, object], ...] = (("state = %s", state), ("occurred_at >= %s", since),
                                               ("id < %s", before_id))
    for clause, value in filters:
        if value is not None:
            clauses.append(clause)
            params.append(value)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE {' AND '.join(clauses)}"
                      " ORDER BY id DESC LIMIT %s", (*params, limit))
    return await cur.fetchall()


async def delivery(conn: AsyncConnection, delivery_id: int) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_DELIVERY_COLUMNS}, body FROM webhook_deliveries WHERE id = %s", (delivery_id,))
    return await cur.fetchone()


async def attempts(conn: AsyncConnection, delivery_id: int, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` attempts, oldest first."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT * FROM (SELECT id, at, http_status, latency_ms, error, outcome FROM webhook_attempts"
                      " WHERE delivery_id = %s ORDER BY id DESC LIMIT %s) newest ORDER BY id", (delivery_id, limit))
    return await cur.fetchall()


# Which rows a redelivery touches: finished ones go back to pending; pending ones that no notifier
# holds are simply due now. A pending row under a live lease is being attempted: left to its holder,
# whose outcome would otherwise be written over.
_REDELIVERABLE = ("(state IN ('delivered', 'parked') OR (state = 'pending'"
                  " AND (leased_until IS NULL OR leased_until < now())))")
_REQUEUE = ("UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = now(), finished_at = NULL,"
            " leased_by = NULL, leased_until = NULL")


def _selection(endpoint_id: str, selector: RedeliverySelector) -> tuple[str, dict[str, Any]]:
    clauses = ["endpoint_id = %(endpoint)s", _REDELIVERABLE]
    params: dict[str, Any] = {"endpoint": endpoint_id}
    if selector.event_id is not None:
        clauses.append("event_id = %(event)s")
        params["event"] = selector.event_id
    if selector.since is not None:
        clauses.append("occurred_at >= %(since)s")
        params["since"] = selector.since
    if selector.until is not None:
        clauses.append("occurred_at < %(until)s")
        params["until"] = selector.until
    return " AND ".join(clauses), params


async def count_redeliverable(conn: AsyncConnection, endpoint_id: str, selector: RedeliverySelector) -> int:
    where, params = _selection(endpoint_id, selector)
    cur = await conn.execute(f"SELECT count(*) FROM webhook_deliveries WHERE {where}", params)
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def requeue(conn: AsyncConnection, endpoint_id: str, selector: RedeliverySelector) -> int:
    where, params = _selection(endpoint_id, selector)
    cur = await conn.execute(f"{_REQUEUE} WHERE {where} RETURNING endpoint_id, payment_id", params)
    return await _followers_due_now(conn, await cur.fetchall())


async def requeue_one(conn: AsyncConnection, delivery_id: int) -> int:
    cur = await conn.execute(f"{_REQUEUE} WHERE id = %s AND {_REDELIVERABLE} RETURNING endpoint_id, payment_id",
                             (delivery_id,))
    return await _followers_due_now(conn, await cur.fetchall())


async def _followers_due_now(conn: AsyncConnection, requeued: list[tuple[Any, ...]]) -> int:
    """The other pending deliveries of the requeued ones' payments are due now too: the notifier makes
    those behind a delivery to retry due no sooner than its retry, which the requeue just brought
    forward. Returns how many were requeued."""
    chains = sorted({(row[0], row[1]) for row in requeued})
    if chains:
        await conn.execute("UPDATE webhook_deliveries d SET next_attempt_at = now()"
                           " FROM unnest(%s::text[], %s::text[]) AS c(endpoint_id, payment_id)"
                           " WHERE d.endpoint_id = c.endpoint_id AND d.payment_id = c.payment_id"
                           "  AND d.state = 'pending' AND d.next_attempt_at > now()",
                           ([c[0] for c in chains], [c[1] for c in chains]))
    return len(requeued)


def delivery_view(row: dict[str, Any]) -> dict[str, Any]:
    view = {"deliveryId": str(row["id"]), "webhookId": row["webhook_id"], "eventId": row["event_id"],
            "endpointId": row["endpoint_id"], "channelId": row["channel_id"], "paymentId": row["payment_id"],
            "eventType": row["event_type"], "occurredAt": _iso(row["occurred_at"]), "state": row["state"],
            "attempts": row["attempts"], "nextAttemptAt": _iso(row["next_attempt_at"]) if row["state"] == "pending"
            else None, "createdAt": _iso(row["created_at"]), "finishedAt": _iso(row["finished_at"]),
            "lastHttpStatus": row["last_http_status"], "lastError": row["last_error"]}
    if "body" in row:
        try:
            view["body"] = json.loads(row["body"])  # our own JSON (services/notifier/events.py)
        except ValueError:
            view["body"] = row["body"]
    return view


def attempt_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"at": _iso(row["at"]), "httpStatus": row["http_status"], "latencyMs": round(row["latency_ms"], 1),
            "error": row["error"], "outcome": row["outcome"]}


def _record(row: dict[str, Any], secrets: tuple[SecretSummary, ...]) -> EndpointRecord:
    settings = EndpointInput(row["url"], tuple(row["event_types"]), row["description"])
    return EndpointRecord(row["endpoint_id"], row["channel_id"], settings, row["status"], row["disabled_reason"],
                          row["failing_since"], row["created_at"], row["created_by"], row["updated_at"], secrets)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
