"""Pure translation of Daraja's answers (HTTP status + body bytes) into typed results or errors.

Nothing here assumes a well-formed body: answers may be non-JSON, JSON that is not an object,
Apigee/SOAP faults without `errorCode`, empty messages, or codes sent as strings or integers
(docs/daraja.md §2 "Synchronous error response", §4).
"""
from __future__ import annotations

import json
import re
from typing import Any

from services.daraja.errors import INVALID_TOKEN_CODES, DarajaError, ErrorKind
from services.daraja.models import AccessToken, PushAccepted, QueryResult, QueryStatus
from services.daraja.result_codes import FINAL_FAILURE_CODES

DOCUMENTED_TOKEN_TTL_S = 3599  # docs/daraja.md §1: expires_in is 3599 (often the string "3599")
# Reasons are cut here only to bound memory; DarajaError.redacted() masks secrets and then shortens.
REASON_CHARS_MAX = 2000

# The query's "no answer yet" code (docs/daraja.md §4): being processed, empty, or even "does not Exist".
QUERY_PENDING_ERROR_CODE = "500.001.1001"

_PERMANENT_CODES = frozenset({
    "400.002.02", "400.002.05", "400.003.02", "400.008.01", "400.008.02", "401.003.01",
    "404.001.01", "404.003.01", "404.001.04", "405.001", "500.002.1001",
}) | INVALID_TOKEN_CODES  # a token still refused after the client's one refresh is a credentials problem
_RETRYABLE_CODES = frozenset({"500.003.01", "500.003.1001", "500.003.02", "500.003.03"})
# Every errorCode this client knows (services/daraja/metrics.py counts the others as "other").
KNOWN_ERROR_CODES = _PERMANENT_CODES | _RETRYABLE_CODES | {QUERY_PENDING_ERROR_CODE}
# 500.001.1001 is one code for many things; its message decides (docs/daraja.md §2 table).
_LOCKED_SUBSCRIBER = "unable to lock subscriber"
_PERMANENT_1001_MESSAGES = ("wrong credentials", "merchant does not exist")
LOCKED_SUBSCRIBER_WAIT_S = 60.0  # docs/daraja.md §2: wait at least a minute
_GATEWAY_THROTTLE = re.compile(r"spike|quota|ratelimit|rate limit|too many", re.IGNORECASE)


def parse_token_response(status: int, body: bytes) -> AccessToken:
    obj = json_object(body)
    if _is_success(status) and obj is not None and isinstance(obj.get("access_token"), str) \
            and obj["access_token"].strip():
        return AccessToken(obj["access_token"].strip(), _expires_in_s(obj.get("expires_in")))
    raise classify_failure("oauth", status, body)


def parse_push_response(status: int, body: bytes) -> PushAccepted:
    obj = json_object(body)
    if obj is None or _error_code(obj) is not None or not _is_success(status):
        raise classify_failure("push", status, body)
    checkout_request_id = text(obj.get("CheckoutRequestID"))
    if not checkout_request_id:
        # A 2xx without the id: Daraja may well have prompted the phone. Only reconciliation can tell.
        raise DarajaError(ErrorKind.OUTCOME_UNKNOWN, "push", "success answer without CheckoutRequestID",
                          http_status=status)
    response_code = code_text(obj.get("ResponseCode"))
    if response_code not in (None, "0"):
        raise DarajaError(ErrorKind.PERMANENT, "push",
                          f"push refused with ResponseCode {response_code}: "
                          f"{_short(text(obj.get('ResponseDescription')))}", http_status=status)
    return PushAccepted(
        merchant_request_id=text(obj.get("MerchantRequestID")),
        checkout_request_id=checkout_request_id,
        response_code=response_code or "0",
        customer_message=text(obj.get("CustomerMessage")) or text(obj.get("ResponseDescription")),
    )


def parse_query_response(status: int, body: bytes) -> QueryResult:
    obj = json_object(body)
    if obj is None:
        raise classify_failure("query", status, body)
    error_code = _error_code(obj)
    if error_code is not None:
        message = _error_message(obj)
        if error_code == QUERY_PENDING_ERROR_CODE and not _is_permanent_1001(message):
            # docs/daraja.md §4: seen with HTTP 500 and HTTP 200, with "being processed", an empty
            # message, and "does not Exist" for payments that later succeeded.
            return QueryResult(QueryStatus.STILL_PROCESSING, None, message,
                               checkout_request_id=text(obj.get("requestId")) or None)
        raise classify_failure("query", status, body)
    result_code = code_text(obj.get("ResultCode"))
    if result_code is None:
        raise classify_failure("query", status, body)
    return QueryResult(
        status=query_status(result_code),
        result_code=result_code,
        result_desc=text(obj.get("ResultDesc")),
        merchant_request_id=text(obj.get("MerchantRequestID")) or None,
        checkout_request_id=text(obj.get("CheckoutRequestID")) or None,
    )


def query_status(result_code: str) -> QueryStatus:
    if result_code == "0":
        return QueryStatus.FINAL_SUCCESS
    if result_code.upper() in FINAL_FAILURE_CODES:
        return QueryStatus.FINAL_FAILURE
    # 4999 and codes outside the catalogue: not a verdict (docs/daraja.md §4 reconciliation pattern).
    return QueryStatus.STILL_PROCESSING


def classify_failure(operation: str, status: int, body: bytes) -> DarajaError:
    """Any answer that is not a usable result, as a DarajaError saying what to do next."""
    obj = json_object(body)
    if obj is not None and (error_code := _error_code(obj)) is not None:
        return _classify_daraja_code(operation, status, obj, error_code)
    return _classify_other(operation, status, obj, body)


def _classify_daraja_code(operation: str, status: int, obj: dict[str, Any], error_code: str) -> DarajaError:
    message = _error_message(obj)
    request_id = text(obj.get("requestId")) or None
    kind, retry_after_s = _kind_for_code(error_code, message)
    return DarajaError(kind, operation, _short(message) or "(empty errorMessage)", error_code=error_code,
                       http_status=status, request_id=request_id, retry_after_s=retry_after_s)


def _kind_for_code(error_code: str, message: str) -> tuple[ErrorKind, float | None]:
    if error_code == "500.001.1001":
        if _LOCKED_SUBSCRIBER in message.lower():
            return ErrorKind.RETRYABLE, LOCKED_SUBSCRIBER_WAIT_S
        if _is_permanent_1001(message):
            return ErrorKind.PERMANENT, None
        return ErrorKind.RETRYABLE, None
    if error_code in _PERMANENT_CODES:
        return ErrorKind.PERMANENT, None
    if error_code in _RETRYABLE_CODES:
        return ErrorKind.RETRYABLE, None
    # Unknown code: its first segment is the HTTP class Daraja meant (docs/daraja.md §2).
    return (ErrorKind.RETRYABLE, None) if error_code.startswith(("5", "429")) else (ErrorKind.PERMANENT, None)


def _classify_other(operation: str, status: int, obj: dict[str, Any] | None, body: bytes) -> DarajaError:
    fault = gateway_fault(obj) if obj is not None else None
    reason = f"gateway fault: {_short(fault)}" if fault else _describe_body(obj, body)
    return DarajaError(_kind_for_status(operation, status, fault), operation, reason, http_status=status)


def _kind_for_status(operation: str, status: int, fault: str | None) -> ErrorKind:
    if status in (403, 429) or (fault and _GATEWAY_THROTTLE.search(fault)):
        # Throttles and WAF blocks (docs/daraja.md §6: Incapsula 403 on bursts) reject before the backend.
        return ErrorKind.RETRYABLE
    may_have_acted = _is_success(status) or status >= 500 or status == 408
    if may_have_acted:
        # A push answered by a proxy error or an unreadable success may have prompted the phone.
        return ErrorKind.OUTCOME_UNKNOWN if operation == "push" else ErrorKind.RETRYABLE
    return ErrorKind.PERMANENT


def gateway_fault(obj: dict[str, Any]) -> str | None:
    """Apigee faults: SOAP-shaped {"Envelope":{"Body":{"Fault":{"faultstring"}}}} or {"fault":{...}}."""
    for path in (("Envelope", "Body", "Fault"), ("fault",), ("Fault",)):
        node: Any = obj
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            detail = node.get("detail")
            code = detail.get("errorcode") if isinstance(detail, dict) else None
            parts = [text(node.get("faultstring")), text(code)]
            return " ".join(p for p in parts if p) or "(no faultstring)"
    return None


def json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def code_text(value: Any) -> str | None:
    """Daraja codes arrive as 0, "0", 1032, "1032" or "SFC_IC0003"; all become stripped text."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _error_code(obj: dict[str, Any]) -> str | None:
    return code_text(obj.get("errorCode", obj.get("errorcode")))


def _error_message(obj: dict[str, Any]) -> str:
    return text(obj.get("errorMessage", obj.get("errormessage")))


def _is_permanent_1001(message: str) -> bool:
    lowered = message.lower()
    return any(m in lowered for m in _PERMANENT_1001_MESSAGES)


def _is_success(status: int) -> bool:
    return 200 <= status < 300


def _expires_in_s(value: Any) -> int:
    try:
        seconds = int(str(value).strip())  # "3599" or 3599 (docs/daraja.md §1)
    except ValueError:
        return DOCUMENTED_TOKEN_TTL_S
    return seconds if seconds > 0 else DOCUMENTED_TOKEN_TTL_S


def _describe_body(obj: dict[str, Any] | None, body: bytes) -> str:
    if not body.strip():
        return "empty body"
    if obj is None:
        return f"unreadable body: {_short(body.decode('utf-8', 'replace'))}"
    return f"unexpected JSON answer with keys {sorted(obj)[:6]}"


def _short(value: str) -> str:
    flat = " ".join(value.split())
    return flat if len(flat) <= REASON_CHARS_MAX else flat[:REASON_CHARS_MAX] + "…"
