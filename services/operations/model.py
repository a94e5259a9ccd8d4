"""The review desk's rules, pure: what a search may ask for and the cursor that pages it, what an
operator's instruction must say, and how a payment is shown without its payer's number.

Everything here comes from an operator's browser or shell, through the one shared admin token: it is
checked field by field, refused with the field named, and never echoed when it may hold a phone.
"""
from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.common.payment import (
    OPEN_STATES,
    ORDER_REFERENCE_LENGTH_MAX,
    PaymentState,
    mask_phone,
    mask_phones_in,
    normalise_phone,
    validate_channel_id,
)
from services.ingress.upstream import PAYMENT_ID

Errors = dict[str, str]

PAGE_SIZE_DEFAULT = 50
PAGE_SIZE_MAX = 200
REASON_MAX = 500  # characters (schemas/operator_command.avsc)
OPERATOR_MAX = 64
# Who the operator says they are: a login name or an e-mail address, nothing that could forge the
# rest of the actor text ("<operator> via admin-api from <address>") or a log line.
OPERATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
RECEIPT = re.compile(r"[A-Z0-9]{10}")  # M-Pesa's receipt form, as migration 0008 checks it
CHECKOUT_REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # Daraja's ws_CO_<digits>...; nothing else is stored
_PRINTABLE_ONE_LINE = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")

SEARCH_PARAMETERS = ("channel", "state", "from", "to", "orderReference", "receipt", "checkoutRequestId", "phone",
                     "cursor", "limit")


class Action(enum.StrEnum):
    """schemas/operator_command.avsc OperatorAction."""

    QUERY = "QUERY"
    SETTLE = "SETTLE"
    CANCEL = "CANCEL"


OUTCOMES = {"Settled": Action.SETTLE, "Cancelled": Action.CANCEL}


class DeskError(Exception):
    """An expected refusal; `status` and `title` become the problem response, or the one line a
    command prints. The detail never quotes a phone number or a reason."""

    status = 400
    title = "Invalid input"

    def __init__(self, detail: str, errors: Errors | None = None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or {}


class InvalidInput(DeskError):
    status, title = 400, "Invalid input"


class NotFound(DeskError):
    status, title = 404, "Not found"


class Refused(DeskError):
    """The instruction would surely fail at the ledger: nothing was published."""

    status, title = 409, "Conflict"


class Unavailable(DeskError):
    status, title = 503, "Service unavailable"


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last payment shown, newest first."""

    requested_at: datetime
    payment_id: str

    def encode(self) -> str:
        raw = json.dumps([self.requested_at.isoformat(), self.payment_id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor | None:
    """The cursor a previous page gave, or None if it is not one (tampered, cut, foreign)."""
    if len(text) > 400 or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return None
    try:
        at, payment_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        requested_at = datetime.fromisoformat(at)
    except (ValueError, TypeError, binascii.Error, RecursionError):
        return None
    if requested_at.tzinfo is None or not isinstance(payment_id, str) or not PAYMENT_ID.fullmatch(payment_id):
        return None
    return Cursor(requested_at, payment_id)


@dataclass(frozen=True)
class Search:
    """A validated search: every field None means "any"."""

    channel_id: str | None = None
    state: PaymentState | None = None
    requested_from: datetime | None = None
    requested_to: datetime | None = None
    order_reference: str | None = None
    receipt: str | None = None
    checkout_request_id: str | None = None
    phone: str | None = None  # normalised (2547…); never shown
    cursor: Cursor | None = None
    limit: int = PAGE_SIZE_DEFAULT


def parse_search(query: Mapping[str, str], repeated: frozenset[str] = frozenset()) -> tuple[Search | None, Errors]:
    """A search from query parameters (the admin API's, or the command's options under the same
    names). `repeated` names the parameters given more than once, which are refused as ambiguous."""
    errors: Errors = {}
    unknown = sorted(set(query) - set(SEARCH_PARAMETERS))
    for name in unknown[:5]:
        errors[_shown_name(name)] = "is not a search parameter (" + ", ".join(SEARCH_PARAMETERS) + ")"
    for name in sorted(repeated & set(SEARCH_PARAMETERS)):
        errors[name] = "is given more than once"
    fields: dict[str, Any] = {}
    for name, key, parse in _SEARCH_FIELDS:
        raw = query.get(name)
        if raw is None or name in errors:
            continue
        value, error = parse(raw)
        if error:
            errors[name] = error
        else:
            fields[key] = value
    start, end = fields.get("requested_from"), fields.get("requested_to")
    if start is not None and end is not None and start >= end:
        errors["to"] = "must be later than from"
    return (None, errors) if errors else (Search(**fields), {})


def _shown_name(name: str) -> str:
    """A parameter name the client made up, fit to quote back: cut and cleaned."""
    cleaned = "".join(c if c.isprintable() else "?" for c in name[:40])
    return cleaned or "?"


def _parse_channel(raw: str) -> tuple[Any, str | None]:
    return (raw, None) if validate_channel_id(raw) is None else (None, "is not a channel id")


def _parse_state(raw: str) -> tuple[Any, str | None]:
    try:
        return PaymentState(raw), None
    except ValueError:
        return None, "must be one of " + ", ".join(s.value for s in PaymentState)


def _parse_time(raw: str) -> tuple[Any, str | None]:
    error = "must be an RFC 3339 time with its offset, e.g. 2026-11-30T08:00:00+03:00"
    if len(raw) > 40:
        return None, error
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        return None, error
    return (at, None) if at.tzinfo is not None else (None, error)


def _parse_order_reference(raw: str) -> tuple[Any, str | None]:
    if not 1 <= len(raw) <= ORDER_REFERENCE_LENGTH_MAX or not _PRINTABLE_ONE_LINE.fullmatch(raw):
        return None, f"must be 1-{ORDER_REFERENCE_LENGTH_MAX} printable characters"
    return raw, None


def _parse_receipt(raw: str) -> tuple[Any, str | None]:
    receipt = raw.strip().upper()
    return (receipt, None) if RECEIPT.fullmatch(receipt) else (None, "must be an M-Pesa receipt: 10 letters and digits")


def _parse_checkout(raw: str) -> tuple[Any, str | None]:
    return (raw, None) if CHECKOUT_REQUEST_ID.fullmatch(raw) else (None, "is not a CheckoutRequestID")


def _parse_phone(raw: str) -> tuple[Any, str | None]:
    phone = normalise_phone(raw)
    # The value is never quoted back: it may be a payer's number typed almost right.
    return (phone, None) if phone else (None, "is not a Kenyan mobile number (07…, 01…, 2547…, +2547…)")


def _parse_cursor(raw: str) -> tuple[Any, str | None]:
    cursor = decode_cursor(raw)
    return (cursor, None) if cursor else (None, "is not a cursor this API gave (use nextCursor as it is)")


def _parse_limit(raw: str) -> tuple[Any, str | None]:
    if not re.fullmatch(r"[0-9]{1,4}", raw) or not 1 <= int(raw) <= PAGE_SIZE_MAX:
        return None, f"must be a whole number from 1 to {PAGE_SIZE_MAX}"
    return int(raw), None


_SEARCH_FIELDS = [("channel", "channel_id", _parse_channel), ("state", "state", _parse_state),
                  ("from", "requested_from", _parse_time), ("to", "requested_to", _parse_time),
                  ("orderReference", "order_reference", _parse_order_reference),
                  ("receipt", "receipt", _parse_receipt), ("checkoutRequestId", "checkout_request_id", _parse_checkout),
                  ("phone", "phone", _parse_phone), ("cursor", "cursor", _parse_cursor),
                  ("limit", "limit", _parse_limit)]


@dataclass(frozen=True)
class Instruction:
    """An operator's validated instruction about one payment."""

    action: Action
    operator: str
    reason: str
    receipt: str | None = None


def parse_query_instruction(body: Any) -> tuple[Instruction | None, Errors]:
    """POST …/query: {"reason", "operator"}."""
    return _instruction(body, Action.QUERY, ("reason", "operator"))


def parse_resolution(body: Any) -> tuple[Instruction | None, Errors]:
    """POST …/resolve: {"outcome": "Settled"|"Cancelled", "mpesaReceipt" (Settled only), "reason", "operator"}."""
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    outcome = body.get("outcome")
    action = OUTCOMES.get(outcome) if isinstance(outcome, str) else None
    if action is None:
        _, errors = _instruction(body, Action.QUERY, ("outcome", "mpesaReceipt", "reason", "operator"))
        return None, {"outcome": "is required: Settled or Cancelled", **errors}
    return _instruction(body, action, ("outcome", "mpesaReceipt", "reason", "operator"))


def _instruction(body: Any, action: Action, allowed: tuple[str, ...]) -> tuple[Instruction | None, Errors]:
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    errors: Errors = {}
    for name in sorted(set(body) - set(allowed))[:5]:
        errors[_shown_name(str(name))] = "is not a field of this request"
    operator, reason, receipt = body.get("operator"), body.get("reason"), body.get("mpesaReceipt")
    if not isinstance(operator, str) or not OPERATOR.fullmatch(operator):
        errors["operator"] = (f"is required: who you are, 1-{OPERATOR_MAX} letters, digits or . _ @ + - "
                              "(starting with a letter or digit)")
    reason_error = reason_problem(reason)
    if reason_error:
        errors["reason"] = reason_error
    if action is Action.SETTLE:
        if not isinstance(receipt, str) or not RECEIPT.fullmatch(receipt.strip().upper()):
            errors["mpesaReceipt"] = "is required to settle: the M-Pesa receipt, 10 letters and digits"
    elif receipt is not None:
        errors["mpesaReceipt"] = "is given only with outcome Settled"
    if errors:
        return None, errors
    assert isinstance(operator, str) and isinstance(reason, str)  # checked above
    settling_receipt = receipt.strip().upper() if action is Action.SETTLE and isinstance(receipt, str) else None
    return Instruction(action, operator, reason.strip(), settling_receipt), {}


def reason_problem(reason: Any) -> str | None:
    if not isinstance(reason, str) or not reason.strip():
        return f"is required: why, in 1-{REASON_MAX} characters"
    if len(reason.strip()) > REASON_MAX:
        return f"must be at most {REASON_MAX} characters"
    if not _PRINTABLE_ONE_LINE.fullmatch(reason.strip()):
        return "must be one line of printable text"
    return None


def refusal(instruction: Instruction, payment: Mapping[str, Any], receipt_owner: str | None) -> str | None:
    """Why the ledger would surely refuse this instruction (the ledger's rules stay authoritative:
    this is only the quick, clear answer), or None to send it."""
    state = payment["state"]
    if instruction.action is Action.QUERY:
        if state not in OPEN_STATES and state != PaymentState.REVIEW:
            return f"the payment is {state}: only an open payment or one in Review can be queried"
        if not (payment["checkout_request_id"] or payment["candidate_checkout_request_id"]):
            return "the payment has no CheckoutRequestID to query (Daraja never accepted its push)"
        return None
    if state != PaymentState.REVIEW:
        return f"the payment is {state}: only a payment in Review can be resolved"
    if receipt_owner is not None:
        return f"receipt {instruction.receipt} already proves payment {receipt_owner}"
    return None


def actor_of(operator: str, via: str) -> str:
    """What the audit trail records as who: "<operator> via cli" or "<operator> via admin-api from <address>"."""
    return f"{operator} via {via}"



# How a payment row is shown: camelCase as the other admin routes, times as RFC 3339, the phone masked
# and masked again inside any free text that might quote it.
_SUMMARY = [("paymentId", "payment_id"), ("channelId", "channel_id"), ("state", "state"), ("amount", "amount"),
            ("orderReference", "order_reference"), ("accountReference", "account_reference"),
            ("checkoutRequestId", "checkout_request_id"), ("mpesaReceipt", "mpesa_receipt"),
            ("lateMpesaReceipt", "late_receipt"), ("candidateReceipt", "candidate_receipt"),
            ("requestedAt", "requested_at"), ("finalAt", "final_at"), ("reviewReason", "review_reason")]
_DETAIL = [("description", "description"), ("metadata", "metadata"), ("merchantRequestId", "merchant_request_id"),
           ("transactionTime", "transaction_time"), ("resultCode", "result_code"), ("resultDesc", "result_desc"),
           ("updatedAt", "updated_at"), ("reviewAlert", "review_alert"), ("phoneCheck", "phone_check"),
           ("candidateCheckoutRequestId", "candidate_checkout_request_id"),
           ("candidateTransactionTime", "candidate_transaction_time"), ("candidateResultCode", "candidate_result_code"),
           ("contradiction", "contradiction"), ("pushUnknown", "push_unknown"), ("queryAttempts", "query_attempts")]
SUMMARY_COLUMNS = ("phone", *(column for _, column in _SUMMARY))
DETAIL_COLUMNS = (*SUMMARY_COLUMNS, *(column for _, column in _DETAIL))


def shown(value: Any) -> Any:
    """A column's value as JSON shows it; free text with any phone number in it masked."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        return mask_phones_in(value)
    if isinstance(value, dict):
        return {mask_phones_in(str(k)): shown(v) for k, v in value.items()}
    return value


# M-Pesa receipts, of their form (migration 0008), are shown as they are: one of a letter and nine
# digits reads as a number in text, and masked it could not be compared with the payer's SMS or
# given back to settle.
_RECEIPT_COLUMNS = frozenset({"mpesa_receipt", "late_receipt", "candidate_receipt"})
# Our own ids are shown as they are too: a UUID's digits may read as a number in text.
_AS_STORED = _RECEIPT_COLUMNS | {"payment_id", "channel_id"}


def payment_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"phone": mask_phone(row["phone"]),
            **{name: row[column] if column in _AS_STORED else shown(row[column]) for name, column in _SUMMARY}}


def payment_detail(row: Mapping[str, Any]) -> dict[str, Any]:
    return {**payment_summary(row), **{name: shown(row[column]) for name, column in _DETAIL}}


def history_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"at": shown(row["at"]), "state": row["state"], "previous": row["previous"],
            "reason": shown(row["reason"]), "eventId": str(row["event_id"])}


def audit_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"seq": row["seq"], "at": shown(row["at"]), "fact": row["fact"], "verdict": row["verdict"],
            "fromState": row["from_state"], "toState": row["to_state"], "detail": shown(row["detail"]),
            "actor": shown(row["actor"]), "eventId": None if row["event_id"] is None else str(row["event_id"])}


def callback_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    """A raw callback as received, its payer's number masked (Daraja sends it in PhoneNumber)."""
    return {"eventId": str(row["event_id"]), "receivedAt": shown(row["received_at"]), "verdict": row["verdict"],
            "body": mask_phones_in(row["body"])}
