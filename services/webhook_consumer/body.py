"""Whether a callback body is a bounded JSON object: the one look the gateway takes at a body.

The gateway judges no business content (which ResultCode, which amount); it only refuses what no
Daraja callback can be and what would cost a reader more than it should: bytes that are not UTF-8,
text that is not JSON, JSON whose top level is not an object, nesting deeper than
MAX_NESTING_DEPTH, and numbers that are not finite (NaN, Infinity, or 1e999, which Python's json
reads as infinity). Pure: bytes in, a verdict out, never an exception.

Depth is checked before parsing: json.loads recurses once per nesting level and raises
RecursionError on a deep enough body (or worse, on a thread with a small stack), so a body is parsed
only once its nesting is known to be small.
"""
from __future__ import annotations

import json
import math
import re
from functools import lru_cache

MAX_NESTING_DEPTH = 32  # a Daraja STK callback nests 6 deep (Body.stkCallback.CallbackMetadata.Item[{}])

# A JSON string, as a parser reads it. It ends at its closing quote or at the end of the body, and a
# backslash may be the last byte: every quote therefore starts a match that succeeds without
# backtracking, which keeps the scan linear even on a body of unterminated strings.
_STRING = re.compile(rb'"[^"\\]*(?:\\(?:.|\Z)[^"\\]*)*(?:"|\Z)', re.DOTALL)
_BRACES_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
_ALL_BUT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


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


def nesting_exceeds(body: bytes, limit: int = MAX_NESTING_DEPTH) -> bool:
    """True when a JSON parser reading `body` could be taken more than `limit` containers deep.

    Exact for valid JSON. For invalid JSON it may say True where a parser would have stopped
    earlier at the error; the body is refused either way.
    """
    if body.count(b"{") + body.count(b"[") <= limit:  # every callback Daraja sends: no scan needed
        return False
    # Strings removed, only brackets kept, braces folded into square brackets: "[[][]]"-like text.
    brackets = _STRING.sub(b"", body).translate(_BRACES_AS_BRACKETS, _ALL_BUT_BRACKETS)
    return _balanced_within(limit).fullmatch(brackets) is None


@lru_cache(maxsize=4)
def _balanced_within(depth: int) -> re.Pattern[bytes]:
    r"""Balanced brackets nested at most `depth` deep: (?:\[(?:\[ … \])*+\])*+, `depth` groups.

    Possessive quantifiers (*+) never give back what they matched; since the next byte alone
    decides whether a group opens or closes, nothing is lost by that, and the match is one pass
    over the bytes (measured: about 0.6 ms for 64 KiB of brackets) with no backtracking to exploit.
    """
    pattern = b""
    for _ in range(depth):
        pattern = rb"(?:\[" + pattern + rb"\])*+"
    return re.compile(pattern)
