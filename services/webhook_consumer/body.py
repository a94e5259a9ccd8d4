"""Whether a callback body is a bounded JSON object: the one look the gateway takes at a body.

The gateway judges no business content (which ResultCode, which amount); it only refuses what no
Daraja callback can be and what would cost a reader more than it should: bytes that are not UTF-8,
text that is not JSON, JSON whose top level is not an object, nesting deeper than
MAX_NESTING_DEPTH, and numbers that are not finite (NaN, Infinity, or 1e999, which Python's json
reads as infinity). Pure: bytes in, a verdict out, never an exception.

Depth is checked before parsing (services/common/json_bounds.py says why).
"""
from __future__ import annotations

import json
import math

from services.common.json_bounds import nesting_exceeds

MAX_NESTING_DEPTH = 32  # a Daraja STK callback nests 6 deep (Body.stkCallback.CallbackMetadata.Item[{}])


class _NonFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def _refuse_constant(name: str) -> float:
    raise _NonFinite(name)  # NaN, Infinity, -Infinity: Python's json accepts them, JSON does not


def is_bounded_json_object(body: bytes) -> bool:
    """True when `body` is UTF-8 JSON whose top level is an object, nested at most MAX_NESTING_DEPTH
    deep, holding finite numbers only. A leading UTF-8 byte order mark is ignored (RFC 8259 §8.1)."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        return False
    if not text.lstrip().startswith("{") or nesting_exceeds(body, MAX_NESTING_DEPTH):
        return False
    try:
        json.loads(text, parse_float=_finite_float, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # RecursionError cannot happen after the depth check; kept as a fuse
        return False
    return True
