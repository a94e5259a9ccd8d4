"""The channels' SQL, one function per statement group; callers own the transaction."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from services.channels import vault
from services.channels.model import Channel, channel_view
from services.channels.vault import SealedCredentials
from services.notifier import secrets as webhook_secrets


@dataclass(frozen=True)
class CredentialSummary:
    """What may be shown about a credential version: never the secret, only its fingerprint."""

    version: int
    fingerprint: str
    app_key_id: str
    kek_id: str
    validated_at: datetime | None
    created_at: datetime
    created_by: str

    def view(self) -> dict[str, Any]:
        return {"version": self.version, "fingerprint": self.fingerprint, "appKeyId": self.app_key_id,
                "kekId": self.kek_id, "validatedAt": _iso(self.validated_at),
                "createdAt": _iso(self.created_at), "createdBy": self.created_by}


@dataclass(frozen=True)
class ChannelRecord:
    channel: Channel
    created_at: datetime
    updated_at: datetime
    credentials: CredentialSummary | None  # the newest version

    def view(self) -> dict[str, Any]:
        return {**channel_view(self.channel), "credentials": self.credentials.view() if self.credentials else None,
                "createdAt": _iso(self.created_at), "updatedAt": _iso(self.updated_at)}


_CHANNEL_COLUMNS = ("channel_id, display_name, shortcode_type, business_shortcode, environment, till_number, status,"
                    " consent_reference, consent_date, max_amount, pushes_per_second, confirm_success_by_query,"
                    " payer_data_retention_days, agreement_reference, agreement_version, agreement_signed_on,"
                    " lawful_basis, analytics_metadata_keys")
_RECORD_QUERY = (
    "SELECT c.channel_id, c.display_name, c.shortcode_type, c.business_shortcode, c.environment, c.till_number,"
    " c.status, c.consent_reference, c.consent_date, c.max_amount, c.pushes_per_second, c.confirm_success_by_query,"
    " c.payer_data_retention_days, c.agreement_reference, c.agreement_version, c.agreement_signed_on, c.lawful_basis,"
    " c.analytics_metadata_keys, c.created_at, c.updated_at,"
    " cc.version, cc.fingerprint, cc.app_key_id, cc.key_id, cc.validated_at, cc.created_at AS credentials_created_at,"
    " cc.created_by AS credentials_created_by"
    # Named columns, never the sealed ones: the ingress may read only these (migrations/0009_roles.sql).
    " FROM channels c LEFT JOIN LATERAL (SELECT version, fingerprint, app_key_id, key_id, validated_at, created_at,"
    " created_by FROM channel_credentials WHERE channel_id = c.channel_id"
    " ORDER BY version DESC LIMIT 1) cc ON true")


async def insert_channel(conn: AsyncConnection, channel: Channel) -> bool:
    """False when the channel id is taken."""
    cur = await conn.execute(
        f"INSERT INTO channels ({_CHANNEL_COLUMNS}) VALUES ({', '.join(['%s'] * len(_channel_values(channel)))})"
        " ON CONFLICT (channel_id) DO NOTHING", _channel_values(channel))
    return cur.rowcount == 1


async def update_channel(conn: AsyncConnection, channel: Channel) -> None:
    await conn.execute(
        "UPDATE channels SET display_name = %s, shortcode_type = %s, business_shortcode = %s, environment = %s,"
        " till_number = %s, status = %s, consent_reference = %s, consent_date = %s, max_amount = %s,"
        " pushes_per_second = %s, confirm_success_by_query = %s, payer_data_retention_days = %s,"
        " agreement_reference = %s, agreement_version = %s, agreement_signed_on = %s, lawful_basis = %s,"
        " analytics_metadata_keys = %s, updated_at = now() WHERE channel_id = %s",
        (*_channel_values(channel)[1:], channel.channel_id))


async def channel_record(conn: AsyncConnection, channel_id: str, *, for_update: bool = False) -> ChannelRecord | None:
    """The channel with its newest credential version; for_update locks the channel row."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_RECORD_QUERY + " WHERE c.channel_id = %s" + (" FOR UPDATE OF c" if for_update else ""),
                      (channel_id,))
    row = await cur.fetchone()
    return _record(row) if row else None


async def channel_records(conn: AsyncConnection) -> list[ChannelRecord]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_RECORD_QUERY + " ORDER BY c.channel_id")
    return [_record(row) for row in await cur.fetchall()]


async def insert_credentials(conn: AsyncConnection, channel_id: str, version: int, sealed: SealedCredentials, *,
                             fingerprint: str, app_key_id: str, validated_at: datetime | None, created_by: str) -> None:
    await conn.execute(
        "INSERT INTO channel_credentials (channel_id, version, key_id, wrapped_key, nonce, ciphertext, fingerprint,"
        " app_key_id, validated_at, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (channel_id, version, sealed.key_id, sealed.wrapped_key, sealed.nonce, sealed.ciphertext, fingerprint,
         app_key_id, validated_at, created_by))


@dataclass(frozen=True)
class SealedTable:
    """A table of vault-sealed rows (key_id, wrapped_key, nonce, ciphertext per owner and version),
    and what a KEK rotation needs to know to re-wrap and audit them."""

    name: str
    owner_column: str  # with `version`, the primary key
    associated_data: Callable[[str, int], bytes]  # what the row was sealed with (owner, version)
    describes: str  # "<describes> 'owner' version n" names a row in messages
    audit_owner: str  # the credential_audit column that names the owner
    rewrapped_action: str
    rewrap_failed_action: str

    def where(self, owner: str, version: int) -> str:
        return f"{self.describes} {owner!r} version {version}"


CREDENTIALS = SealedTable("channel_credentials", "channel_id", vault.associated_data, "credentials of channel",
                          "channel_id", "credentials_rewrapped", "credentials_rewrap_failed")
WEBHOOK_SECRETS = SealedTable("webhook_secrets", "endpoint_id", webhook_secrets.associated_data,
                              "signing secret of webhook endpoint", "webhook_endpoint_id",
                              "webhook_secret_rewrapped", "webhook_secret_rewrap_failed")
# Every table holding rows wrapped by a KEK: a key is retired only when none of them uses it.
SEALED_TABLES = (CREDENTIALS, WEBHOOK_SECRETS)


async def sealed_credentials(conn: AsyncConnection, owner: str, version: int, *, for_update: bool = False,
                             table: SealedTable = CREDENTIALS) -> SealedCredentials | None:
    # Table and column names come from the SealedTable constants above, never from input.
    cur = await conn.execute(
        f"SELECT key_id, wrapped_key, nonce, ciphertext FROM {table.name} WHERE {table.owner_column} = %s"
        " AND version = %s" + (" FOR UPDATE" if for_update else ""), (owner, version))
    row = await cur.fetchone()
    return SealedCredentials(row[0], bytes(row[1]), bytes(row[2]), bytes(row[3])) if row else None


async def replace_wrapping(conn: AsyncConnection, owner: str, version: int, sealed: SealedCredentials, *,
                           table: SealedTable = CREDENTIALS) -> None:
    await conn.execute(f"UPDATE {table.name} SET key_id = %s, wrapped_key = %s WHERE {table.owner_column} = %s"
                       " AND version = %s", (sealed.key_id, sealed.wrapped_key, owner, version))


async def versions_wrapped_by(conn: AsyncConnection, key_ids: list[str], *,
                              table: SealedTable = CREDENTIALS) -> list[tuple[str, int]]:
    cur = await conn.execute(f"SELECT {table.owner_column}, version FROM {table.name} WHERE key_id = ANY(%s)"
                             f" ORDER BY {table.owner_column}, version", (key_ids,))
    return [(row[0], row[1]) for row in await cur.fetchall()]


async def rows_per_kek(conn: AsyncConnection, *, table: SealedTable = CREDENTIALS) -> dict[str, int]:
    cur = await conn.execute(f"SELECT key_id, count(*) FROM {table.name} GROUP BY key_id ORDER BY key_id")
    return {row[0]: row[1] for row in await cur.fetchall()}


async def rows_per_kek_in_every_table(conn: AsyncConnection) -> dict[str, int]:
    """What retiring a key must check: a key id is derived from its public key, so one keyring's ids
    never count another's rows, and a key given the wrong table is still seen in use."""
    usage: dict[str, int] = {}
    for table in SEALED_TABLES:
        for key_id, rows in (await rows_per_kek(conn, table=table)).items():
            usage[key_id] = usage.get(key_id, 0) + rows
    return usage


# Writes of sealed rows (credentials, webhook signing secrets) hold this lock shared while they read
# the public key and insert; retiring a KEK holds it exclusively, so no row sealed to a key can land
# after that key was found unused.
_KEK_LOCK = 7_262_026  # advisory lock id (7_262_021-25 are taken: common/db.py, ledger/store.py, stk_worker/tokens.py)


async def lock_keks(conn: AsyncConnection, *, exclusive: bool) -> None:
    function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    await conn.execute(f"SELECT {function}(%s)", (_KEK_LOCK,))


async def set_status(conn: AsyncConnection, channel_id: str, status: str) -> None:
    await conn.execute("UPDATE channels SET status = %s, updated_at = now() WHERE channel_id = %s",
                       (status, channel_id))


async def existing_channel_ids(conn: AsyncConnection, channel_ids: list[str]) -> set[str]:
    cur = await conn.execute("SELECT channel_id FROM channels WHERE channel_id = ANY(%s)", (channel_ids,))
    return {row[0] for row in await cur.fetchall()}


async def audit(conn: AsyncConnection, actor: str, action: str, *, channel_id: str | None = None,
                version: int | None = None, kek_id: str | None = None, api_key_id: str | None = None,
                webhook_endpoint_id: str | None = None, detail: str | None = None) -> None:
    await conn.execute(
        "INSERT INTO credential_audit (actor, action, channel_id, version, kek_id, api_key_id, webhook_endpoint_id,"
        " detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (actor[:200], action, channel_id, version, kek_id, api_key_id, webhook_endpoint_id, detail))


# API keys

_API_KEY_COLUMNS = "key_id, label, channel_ids, created_at, created_by, revoked_at, revoked_by"


async def insert_api_key(conn: AsyncConnection, key_id: str, key_sha256: bytes, label: str, channel_ids: list[str],
                         created_by: str) -> None:
    await conn.execute("INSERT INTO api_keys (key_id, key_sha256, label, channel_ids, created_by)"
                       " VALUES (%s, %s, %s, %s, %s)", (key_id, key_sha256, label, channel_ids, created_by))


async def api_key_for_authentication(conn: AsyncConnection, key_id: str) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT key_sha256, {_API_KEY_COLUMNS} FROM api_keys WHERE key_id = %s", (key_id,))
    return await cur.fetchone()


async def api_key(conn: AsyncConnection, key_id: str) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE key_id = %s", (key_id,))
    return await cur.fetchone()


async def api_keys(conn: AsyncConnection) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_API_KEY_COLUMNS} FROM api_keys ORDER BY created_at, key_id")
    return await cur.fetchall()


async def revoke_api_key(conn: AsyncConnection, key_id: str, revoked_by: str) -> bool:
    """False when there is no such key or it was already revoked."""
    cur = await conn.execute("UPDATE api_keys SET revoked_at = now(), revoked_by = %s"
                             " WHERE key_id = %s AND revoked_at IS NULL", (revoked_by, key_id))
    return cur.rowcount == 1


def api_key_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"keyId": row["key_id"], "label": row["label"], "channelIds": list(row["channel_ids"]),
            "createdAt": _iso(row["created_at"]), "createdBy": row["created_by"],
            "revokedAt": _iso(row["revoked_at"]), "revokedBy": row["revoked_by"]}


def _channel_values(c: Channel) -> tuple:
    return (c.channel_id, c.display_name, c.shortcode_type, c.business_shortcode, c.environment, c.till_number,
            c.status, c.consent_reference, c.consent_date, c.max_amount, c.pushes_per_second,
            c.confirm_success_by_query, c.payer_data_retention_days, c.agreement_reference, c.agreement_version,
            c.agreement_signed_on, c.lawful_basis, list(c.analytics_metadata_keys))


def _record(row: dict[str, Any]) -> ChannelRecord:
    channel = Channel(
        channel_id=row["channel_id"], display_name=row["display_name"], shortcode_type=row["shortcode_type"],
        business_shortcode=row["business_shortcode"], environment=row["environment"],
        till_number=row["till_number"], status=row["status"], consent_reference=row["consent_reference"],
        consent_date=row["consent_date"], max_amount=row["max_amount"], pushes_per_second=row["pushes_per_second"],
        confirm_success_by_query=row["confirm_success_by_query"],
        payer_data_retention_days=row["payer_data_retention_days"], agreement_reference=row["agreement_reference"],
        agreement_version=row["agreement_version"], agreement_signed_on=row["agreement_signed_on"],
        lawful_basis=row["lawful_basis"], analytics_metadata_keys=tuple(row["analytics_metadata_keys"] or ()))
    credentials = None
    if row["version"] is not None:
        credentials = CredentialSummary(row["version"], row["fingerprint"], row["app_key_id"], row["key_id"],
                                        row["validated_at"], row["credentials_created_at"],
                                        row["credentials_created_by"])
    return ChannelRecord(channel, row["created_at"], row["updated_at"], credentials)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
