"""The Daraja client's metrics: how long each call took and how it ended, and the codes Daraja
answered. Label values come only from fixed lists here, never from an answer's text: a hostile or
broken answer cannot make new time series."""
from __future__ import annotations

import httpx
from prometheus_client import Counter, Histogram

from services.daraja.errors import DarajaError, ErrorKind
from services.daraja.parsing import KNOWN_ERROR_CODES
from services.daraja.result_codes import FAILURE_MEANINGS, STILL_PROCESSING_CODE, SUCCESS

ENDPOINTS = {"oauth": "oauth", "push": "stkpush", "query": "stkquery"}  # the client's operation -> label
OTHER_CODE = "other"
# Keyed by upper case: Daraja has sent "SFC_IC0003" in more than one case; the label is the catalogue's.
_KNOWN_CODES = {code.upper(): code for code in (SUCCESS, STILL_PROCESSING_CODE, *FAILURE_MEANINGS,
                                                *KNOWN_ERROR_CODES)}

REQUEST_SECONDS = Histogram(
    "daraja_request_seconds",
    "Time of one Daraja call, from sending the request to its answer or failure, by endpoint (oauth, stkpush, "
    "stkquery) and outcome: ok = Daraja answered with a usable result (a token, an accepted push, a query's "
    "answer, 'still processing' included); refused = Daraja or its gateway answered with an error (an errorCode, "
    "a fault, an HTTP status of 300 or more, a push's ResponseCode other than 0); timeout = no answer in time "
    "(connecting, waiting for a connection, or reading: a push that timed out may still have prompted the phone); "
    "error = anything else (connection refused or reset, an answer that cannot be read)",
    ["endpoint", "outcome"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60))
RESULT_CODES = Counter(
    "daraja_result_codes_total",
    "Codes Daraja answered, by endpoint: a query's ResultCode, a push's ResponseCode, an errorCode; codes outside "
    "the project's catalogue (services/daraja/result_codes.py and the client's error codes) count as 'other'",
    ["endpoint", "result_code"])


def code_label(code: str | None) -> str | None:
    """The label of a code Daraja answered: itself if catalogued, else "other"; None for no code."""
    if code is None:
        return None
    return _KNOWN_CODES.get(code.strip().upper(), OTHER_CODE)


def transport_outcome(exc: Exception) -> str:
    """No answer came: a timeout, or a connection that failed otherwise."""
    return "timeout" if isinstance(exc, httpx.TimeoutException) else "error"


def answer_outcome(error: DarajaError) -> str:
    """An answer came but was no usable result: refused when it says so (an error code, an error
    status, a push's ResponseCode refusal: PERMANENT on a 2xx), error when it cannot be read."""
    status = error.http_status
    if error.error_code is not None or (status is not None and status >= 300) or error.kind is ErrorKind.PERMANENT:
        return "refused"
    return "error"


def record(operation: str, outcome: str, seconds: float, code: str | None = None) -> None:
    endpoint = ENDPOINTS[operation]
    REQUEST_SECONDS.labels(endpoint, outcome).observe(seconds)
    label = code_label(code)
    if label is not None:
        RESULT_CODES.labels(endpoint, label).inc()
