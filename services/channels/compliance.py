"""The compliance report (`mpesa-pipeline channels compliance`, GET /admin/channels/compliance): per
channel, what a merchant's agreement asks us to show (docs/data-protection.md, "The merchant
agreement"): the processing agreement and lawful basis, the merchant's consent, how old its Daraja
credentials are, how long its payers' data is kept, and when a payer's data was last erased.

`assess` is pure; `compliance_rows` is the one query.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from services.channels.model import AGREEMENT_FIELDS

CREDENTIALS_MAX_AGE_DAYS = 365  # a yearly rotation at least: an old secret has had longer to leak

NO_AGREEMENT = "no_agreement"
NO_CONSENT = "no_consent"
NO_CREDENTIALS = "no_credentials"
CREDENTIALS_STALE = "credentials_older_than_365_days"
FLAGS = (NO_AGREEMENT, NO_CONSENT, NO_CREDENTIALS, CREDENTIALS_STALE)

# payer_data_retention_days comes with the retention of payers' data (migration 0021), payer_requests
# with the erasure commands (migration 0022).
_QUERY = (
    "SELECT c.channel_id, c.display_name, c.status, c.agreement_reference, c.agreement_version,"
    " c.agreement_signed_on, c.lawful_basis, c.consent_reference, c.consent_date, c.payer_data_retention_days,"
    " cc.version AS credentials_version, cc.created_at AS credentials_created_at,"
    " (SELECT max(r.at) FROM payer_requests r WHERE r.kind = 'erase' AND r.channel_id = c.channel_id)"
    " AS last_erasure_at"
    " FROM channels c LEFT JOIN LATERAL (SELECT version, created_at FROM channel_credentials"
    " WHERE channel_id = c.channel_id ORDER BY version DESC LIMIT 1) cc ON true"
    " ORDER BY c.channel_id")


@dataclass(frozen=True)
class ComplianceRow:
    """One channel as the report query reads it."""

    channel_id: str
    display_name: str
    status: str
    agreement_reference: str | None
    agreement_version: str | None
    agreement_signed_on: date | None
    lawful_basis: str | None
    consent_reference: str | None
    consent_date: date | None
    payer_data_retention_days: int | None  # None: the privacy service's default applies
    credentials_version: int | None
    credentials_created_at: datetime | None
    last_erasure_at: datetime | None


async def compliance_rows(conn: AsyncConnection) -> list[ComplianceRow]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_QUERY)
    return [ComplianceRow(**row) for row in await cur.fetchall()]


def assess(row: ComplianceRow, now: datetime) -> dict[str, Any]:
    """The channel's entry in the report, with what is wrong as flags (FLAGS)."""
    missing = [name for name, value in zip(AGREEMENT_FIELDS, (
        row.agreement_reference, row.agreement_version, row.agreement_signed_on, row.lawful_basis), strict=True)
        if value is None]
    age_days = (now - row.credentials_created_at).days if row.credentials_created_at else None
    flags = [flag for flag, raised in [
        (NO_AGREEMENT, bool(missing)),
        (NO_CONSENT, row.consent_reference is None),
        (NO_CREDENTIALS, row.credentials_version is None),
        (CREDENTIALS_STALE, age_days is not None and age_days > CREDENTIALS_MAX_AGE_DAYS),
    ] if raised]
    return {
        "channelId": row.channel_id, "displayName": row.display_name, "status": row.status,
        "agreementReference": row.agreement_reference, "agreementVersion": row.agreement_version,
        "agreementSignedOn": _iso(row.agreement_signed_on), "lawfulBasis": row.lawful_basis,
        "missingAgreementFields": missing,
        "consentReference": row.consent_reference, "consentDate": _iso(row.consent_date),
        "credentialsVersion": row.credentials_version, "credentialsCreatedAt": _iso(row.credentials_created_at),
        "credentialsAgeDays": age_days,
        "payerDataRetentionDays": row.payer_data_retention_days,
        "lastErasureAt": _iso(row.last_erasure_at),
        "flags": flags,
    }


def report(rows: list[ComplianceRow], now: datetime) -> dict[str, Any]:
    channels = [assess(row, now) for row in rows]
    return {"generatedAt": now.isoformat(), "channels": channels,
            # An active channel with a flag takes payments today without what the agreement asks.
            "activeFlagged": [c["channelId"] for c in channels if c["status"] == "active" and c["flags"]]}


def _iso(value: date | datetime | None) -> str | None:
    return value.isoformat() if value else None
