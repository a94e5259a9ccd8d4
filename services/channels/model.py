"""The channel record and the validation of onboarding input: clean values, or errors by field.

Pure: no I/O. Error keys are the camelCase field names of the JSON API, so a problem response
names exactly what the caller sent. Messages never repeat a submitted value: it may be a secret.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from services.common.payment import AMOUNT_MAX, CHANNEL_ID, METADATA_ENTRIES_MAX, METADATA_KEY_LENGTH_MAX
from services.common.text import untrusted
from services.daraja.models import AppCredentials, Shortcode, ShortcodeType

_SHORTCODE = re.compile(r"[0-9]{5,7}")  # the Daraja client's rule for paybills, stores and tills
# No control character (C0, DEL, C1), line separator or lone surrogate (UTF-8 cannot encode it, so
# PostgreSQL could not store it).
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")
_SECRET_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: no spaces, no control characters

SHORTCODE_TYPES = ("paybill", "till")
ENVIRONMENTS = ("sandbox", "production")
ONBOARDING, ACTIVE, SUSPENDED = "onboarding", "active", "suspended"
STATUSES = (ONBOARDING, ACTIVE, SUSPENDED)
DISPLAY_NAME_MAX = 100
CONSENT_REFERENCE_MAX = 128
AGREEMENT_REFERENCE_MAX = 128
AGREEMENT_VERSION_MAX = 32
# The lawful bases of the Data Protection Act 2019, s.30, that a merchant may rely on for its payers'
# data (the research basis is not offered: taking a payment is never research).
LAWFUL_BASES = ("consent", "contract", "legal_obligation", "vital_interests", "public_interest",
                "legitimate_interests")
PUSHES_PER_SECOND_MAX = 1000
RETENTION_DAYS_MAX = 3650  # ten years: beyond it the retention is no limit at all
SECRET_LENGTH_MAX = 512
LABEL_MAX = 100
API_KEY_CHANNELS_MAX = 100

Errors = dict[str, str]


@dataclass(frozen=True)
class Channel:
    """One merchant we act for. `status` moves only through suspend/resume (onboarding.py)."""

    channel_id: str
    display_name: str
    shortcode_type: ShortcodeType
    business_shortcode: str  # the paybill number, or the till's store (head-office) number
    environment: str  # sandbox | production
    till_number: str | None = None  # PartyB of a till; None for a paybill
    status: str = ONBOARDING
    consent_reference: str | None = None  # the merchant's signed consent to be onboarded
    consent_date: date | None = None
    max_amount: int | None = None  # KES per payment, below Daraja's own ceiling
    pushes_per_second: float | None = None
    confirm_success_by_query: bool = False  # every success confirmed by an STK query before Settled
    payer_data_retention_days: int | None = None  # None: PAYER_DATA_RETENTION_DAYS (services/privacy)
    # The processing agreement under which we process the merchant's payers' data (its controller's).
    agreement_reference: str | None = None
    agreement_version: str | None = None
    agreement_signed_on: date | None = None
    lawful_basis: str | None = None  # one of LAWFUL_BASES
    analytics_metadata_keys: tuple[str, ...] = ()  # metadata keys the status topic may carry; none by default

    @property
    def shortcode(self) -> Shortcode:
        """What the Daraja client needs to address this merchant's shortcode."""
        return Shortcode(self.business_shortcode, self.shortcode_type, self.till_number)

    @property
    def is_active(self) -> bool:
        return self.status == ACTIVE

    @property
    def missing_agreement_fields(self) -> tuple[str, ...]:
        """The API names of the agreement's fields not recorded yet; () when it is complete."""
        return tuple(name for name in AGREEMENT_FIELDS if getattr(self, _FIELDS[name][0]) is None)


@dataclass(frozen=True)
class CredentialsInput:
    app: AppCredentials  # masks its secrets in repr
    validate: bool  # obtain a Daraja token with them before storing


@dataclass(frozen=True)
class ApiKeyRequest:
    label: str
    channel_ids: tuple[str, ...]


# Parsers: each takes the submitted value and returns (clean value, error message or None).

def _display_name(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, str) or not value.strip() or not _PRINTABLE.fullmatch(value):
        return None, "must be a non-empty string without control characters"
    if len(value) > DISPLAY_NAME_MAX:
        return None, f"must be at most {DISPLAY_NAME_MAX} characters"
    return value.strip(), None


def _one_of(*options: str) -> Callable[[Any], tuple[Any, str | None]]:
    def parse(value: Any) -> tuple[Any, str | None]:
        return (value, None) if value in options else (None, f"must be one of: {', '.join(options)}")
    return parse


def _shortcode_digits(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, str) or not _SHORTCODE.fullmatch(value):
        return None, "must be a string of 5 to 7 digits"
    return value, None


def _consent_reference(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, str) or not value.strip() or not _PRINTABLE.fullmatch(value):
        return None, "must be a non-empty string without control characters"
    if len(value) > CONSENT_REFERENCE_MAX:
        return None, f"must be at most {CONSENT_REFERENCE_MAX} characters"
    return value.strip(), None


def _bounded_text(maximum: int) -> Callable[[Any], tuple[Any, str | None]]:
    """A document reference: printable, and without format characters (a right-to-left override
    would make the compliance report show another reference than the one stored)."""
    def parse(value: Any) -> tuple[Any, str | None]:
        if not isinstance(value, str) or not value.strip() or not _PRINTABLE.fullmatch(value) \
                or any(unicodedata.category(c) == "Cf" for c in value):
            return None, "must be a non-empty string without control or format characters"
        if len(value) > maximum:
            return None, f"must be at most {maximum} characters"
        return value.strip(), None
    return parse


def _iso_date(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        try:
            return date.fromisoformat(value), None
        except ValueError:
            pass
    return None, "must be a date as YYYY-MM-DD"


def _max_amount(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= AMOUNT_MAX:
        return None, f"must be a whole number of shillings between 1 and {AMOUNT_MAX}"
    return value, None


def _pushes_per_second(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= PUSHES_PER_SECOND_MAX:
        return None, f"must be a number above 0 and at most {PUSHES_PER_SECOND_MAX}"
    return float(value), None


def _retention_days(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= RETENTION_DAYS_MAX:
        return None, f"must be a whole number of days between 1 and {RETENTION_DAYS_MAX}"
    return value, None


def _boolean(value: Any) -> tuple[Any, str | None]:
    return (value, None) if isinstance(value, bool) else (None, "must be true or false")


def _metadata_keys(value: Any) -> tuple[Any, str | None]:
    """Key names as the ingress accepts them in metadata (at most as many as a payment may carry)."""
    rule = (f"must be a list of at most {METADATA_ENTRIES_MAX} distinct key names of 1-{METADATA_KEY_LENGTH_MAX}"
            " printable characters")
    if not isinstance(value, list) or len(value) > METADATA_ENTRIES_MAX:
        return None, rule
    if not all(isinstance(k, str) and 0 < len(k) <= METADATA_KEY_LENGTH_MAX and k.isprintable() for k in value):
        return None, rule
    if len(set(value)) != len(value):
        return None, rule
    return tuple(value), None


# API field name -> (Channel attribute, parser).
_FIELDS: dict[str, tuple[str, Callable[[Any], tuple[Any, str | None]]]] = {
    "displayName": ("display_name", _display_name),
    "shortcodeType": ("shortcode_type", _one_of(*SHORTCODE_TYPES)),
    "businessShortcode": ("business_shortcode", _shortcode_digits),
    "tillNumber": ("till_number", _shortcode_digits),
    "environment": ("environment", _one_of(*ENVIRONMENTS)),
    "consentReference": ("consent_reference", _consent_reference),
    "consentDate": ("consent_date", _iso_date),
    "agreementReference": ("agreement_reference", _bounded_text(AGREEMENT_REFERENCE_MAX)),
    "agreementVersion": ("agreement_version", _bounded_text(AGREEMENT_VERSION_MAX)),
    "agreementSignedOn": ("agreement_signed_on", _iso_date),
    "lawfulBasis": ("lawful_basis", _one_of(*LAWFUL_BASES)),
    "maxAmount": ("max_amount", _max_amount),
    "pushesPerSecond": ("pushes_per_second", _pushes_per_second),
    "confirmSuccessByQuery": ("confirm_success_by_query", _boolean),
    "payerDataRetentionDays": ("payer_data_retention_days", _retention_days),
    "analyticsMetadataKeys": ("analytics_metadata_keys", _metadata_keys),
}
_REQUIRED_ON_CREATE = ("displayName", "shortcodeType", "businessShortcode", "environment")
AGREEMENT_FIELDS = ("agreementReference", "agreementVersion", "agreementSignedOn", "lawfulBasis")
_REMOVABLE = ("tillNumber", "consentReference", "consentDate", *AGREEMENT_FIELDS, "maxAmount", "pushesPerSecond",
              "payerDataRetentionDays")
_STATUS_READ_ONLY = "is read-only: use suspend and resume"


RESERVED_CHANNEL_IDS = ("compliance",)  # GET /admin/channels/compliance is the compliance report
_CHANNEL_ID_RULE = "must be 1-64 lower-case letters, digits, '-' or '_', starting with a letter or digit"


def channel_id_error(value: Any) -> str | None:
    if not isinstance(value, str) or not CHANNEL_ID.fullmatch(value):
        return _CHANNEL_ID_RULE
    return None


def parse_new_channel(body: Any, today: date) -> tuple[Channel | None, Errors]:
    """A new channel (status onboarding) from a create request."""
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors = _unknown_fields(body, {"channelId", *_FIELDS})
    if "status" in body:
        errors["status"] = _STATUS_READ_ONLY
    if problem := channel_id_error(body.get("channelId")):
        errors["channelId"] = problem
    elif body["channelId"] in RESERVED_CHANNEL_IDS:
        errors["channelId"] = "is reserved: /admin/channels/" + body["channelId"] + " is another route"
    for name in _REQUIRED_ON_CREATE:
        if body.get(name) is None:
            errors[name] = "is required"
    values, field_errors = _parse_fields({k: v for k, v in body.items() if k in _FIELDS and v is not None})
    errors = {**field_errors, **errors}
    if errors:
        return None, errors
    channel = Channel(channel_id=body["channelId"], **values)
    errors = consistency_errors(channel, today)
    return (None, errors) if errors else (channel, {})


def parse_channel_changes(channel: Channel, body: Any, today: date) -> tuple[Channel | None, Errors]:
    """The channel with a partial update applied; `null` removes an optional field."""
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors = _unknown_fields(body, {"channelId", *_FIELDS})
    if "status" in body:
        errors["status"] = _STATUS_READ_ONLY
    if "channelId" in body and body["channelId"] != channel.channel_id:
        errors["channelId"] = "cannot be changed"
    for name in _FIELDS:
        if name in body and body[name] is None and name not in _REMOVABLE:
            errors[name] = "cannot be removed"
    present = {k: v for k, v in body.items() if k in _FIELDS and v is not None}
    values, field_errors = _parse_fields(present)
    errors = {**field_errors, **errors}
    if errors:
        return None, errors
    removed: dict[str, Any] = {_FIELDS[name][0]: None for name in _REMOVABLE if name in body and body[name] is None}
    changed = replace(channel, **values, **removed)
    errors = consistency_errors(changed, today)
    # Only a change that touches the agreement must leave it complete: a channel active from before
    # agreements were recorded keeps working, and is refused at its next activation.
    if changed.is_active and any(name in body for name in AGREEMENT_FIELDS):
        errors |= {name: "is required while the channel is active (the signed processing agreement)"
                   for name in changed.missing_agreement_fields}
    return (None, errors) if errors else (changed, {})


def consistency_errors(channel: Channel, today: date) -> Errors:
    """Rules between fields; the same rules are CHECK constraints in migrations/0002_channels.sql."""
    errors: Errors = {}
    if channel.shortcode_type == "till" and channel.till_number is None:
        errors["tillNumber"] = "is required for a till: it is the PartyB customers pay to"
    if channel.shortcode_type == "paybill" and channel.till_number is not None:
        errors["tillNumber"] = "must be absent for a paybill"
    if channel.consent_reference is not None and channel.consent_date is None:
        errors["consentDate"] = "is required together with consentReference"
    if channel.consent_date is not None and channel.consent_reference is None:
        errors["consentReference"] = "is required together with consentDate"
    if channel.consent_date is not None and channel.consent_date > today:
        errors["consentDate"] = "must not be in the future"
    if channel.agreement_signed_on is not None and channel.agreement_signed_on > today:
        errors["agreementSignedOn"] = "must not be in the future"
    if channel.status == ACTIVE and channel.consent_reference is None:
        errors["consentReference"] = "is required while the channel is active (the merchant's signed consent)"
    return errors


def activation_errors(channel: Channel, has_credentials: bool) -> Errors:
    """What a channel lacks before it may take payments."""
    errors: Errors = {}
    if channel.consent_reference is None or channel.consent_date is None:
        errors["consentReference"] = "is required before activation: record the merchant's signed consent"
    for name in channel.missing_agreement_fields:
        errors[name] = "is required before activation: record the merchant's signed processing agreement"
    if not has_credentials:
        errors["credentials"] = "must be set before activation"
    return errors


def parse_credentials(body: Any) -> tuple[CredentialsInput | None, Errors]:
    """Daraja app credentials from a set/rotate request. Errors never quote what was sent."""
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors = _unknown_fields(body, {"consumerKey", "consumerSecret", "passkey", "validate"})
    for name in ("consumerKey", "consumerSecret", "passkey"):
        message = _secret_error(body.get(name))
        if message:
            errors[name] = message
    if "consumerKey" not in errors and ":" in body["consumerKey"]:
        errors["consumerKey"] = "must not contain ':'"
    if not isinstance(body.get("validate", False), bool):
        errors["validate"] = "must be true or false"
    if errors:
        return None, errors
    app = AppCredentials(body["consumerKey"], body["consumerSecret"], body["passkey"])
    return CredentialsInput(app, body.get("validate", False)), {}


def _secret_error(value: Any) -> str | None:
    if value is None:
        return "is required"
    if not isinstance(value, str) or not _SECRET_CHARACTERS.fullmatch(value):
        return "must be a non-empty string of visible characters without spaces"
    if len(value) > SECRET_LENGTH_MAX:
        return f"must be at most {SECRET_LENGTH_MAX} characters"
    return None


def parse_api_key_request(body: Any) -> tuple[ApiKeyRequest | None, Errors]:
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors = _unknown_fields(body, {"label", "channelIds"})
    label = body.get("label")
    if not isinstance(label, str) or not label.strip() or not _PRINTABLE.fullmatch(label) or len(label) > LABEL_MAX:
        errors["label"] = f"must be a non-empty string of at most {LABEL_MAX} characters"
    channel_ids = body.get("channelIds")
    if not isinstance(channel_ids, list) or not 1 <= len(channel_ids) <= API_KEY_CHANNELS_MAX:
        errors["channelIds"] = f"must be a list of 1 to {API_KEY_CHANNELS_MAX} channel ids"
    elif any(channel_id_error(c) for c in channel_ids):
        errors["channelIds"] = "every entry " + _CHANNEL_ID_RULE
    if errors:
        return None, errors
    assert isinstance(label, str) and isinstance(channel_ids, list), "checked above"
    return ApiKeyRequest(label.strip(), tuple(dict.fromkeys(channel_ids))), {}


def channel_view(channel: Channel) -> dict[str, Any]:
    """The channel as the API shows it (camelCase); credentials are added by the caller."""
    return {
        "channelId": channel.channel_id, "displayName": channel.display_name,
        "shortcodeType": channel.shortcode_type, "businessShortcode": channel.business_shortcode,
        "tillNumber": channel.till_number, "environment": channel.environment, "status": channel.status,
        "consentReference": channel.consent_reference,
        "consentDate": channel.consent_date.isoformat() if channel.consent_date else None,
        "agreementReference": channel.agreement_reference, "agreementVersion": channel.agreement_version,
        "agreementSignedOn": channel.agreement_signed_on.isoformat() if channel.agreement_signed_on else None,
        "lawfulBasis": channel.lawful_basis,
        "maxAmount": channel.max_amount, "pushesPerSecond": channel.pushes_per_second,
        "confirmSuccessByQuery": channel.confirm_success_by_query,
        "payerDataRetentionDays": channel.payer_data_retention_days,
        "analyticsMetadataKeys": list(channel.analytics_metadata_keys),
    }


def _parse_fields(present: dict[str, Any]) -> tuple[dict[str, Any], Errors]:
    values, errors = {}, {}
    for name, raw in present.items():
        attribute, parse = _FIELDS[name]
        value, message = parse(raw)
        if message:
            errors[name] = message
        else:
            values[attribute] = value
    return values, errors


def _unknown_fields(body: dict[str, Any], known: set[str]) -> Errors:
    return {untrusted(name, 64): "is not a known field" for name in body if name not in known}
