"""Comparing the PhoneNumber of a success callback with the payment's number (pure).

Daraja has sent this item as a JSON integer (2547XXXXXXXX), as a string, masked the way its C2B
confirmations are (`25470****149`, `2547******49`), and 11 digits long (docs/callback-proof.md).
A genuine success must not be refused for its format, so the digits that are visible are
compared position by position with the payment's number; what cannot be compared at all is
neither a match nor a contradiction, and the caller confirms the payment another way.
"""
from __future__ import annotations

import re
from enum import Enum

MASK = "*"
_SHAPE = re.compile(r"[0-9*]+")
# Fewer visible subscriber digits than this prove little: a forger who does not know the payer's
# number matches one visible digit in ten tries, three in a thousand. Masks seen on M-Pesa show three
# or more (`25470****149`, `2547******49`: docs/callback-proof.md).
MATCH_NEEDS_VISIBLE_DIGITS = 3


class PhoneCheck(str, Enum):
    MATCH = "match"                # every visible digit is the payment's, and enough of them are visible
    MISMATCH = "mismatch"          # a visible digit differs: a contradiction
    UNVERIFIABLE = "unverifiable"  # absent, malformed, or masked down to too few digits to compare


def check_phone(payment_phone: str, seen: object) -> PhoneCheck:
    """payment_phone: the payment's normalised number, 2547XXXXXXXX or 2541XXXXXXXX (12 digits), or
    the pseudonym that replaced it.
    seen: the callback's PhoneNumber as parsed (a str, or None when the item is absent)."""
    if seen is None or isinstance(seen, bool) or not payment_phone.isdigit():
        # A pseudonym stands where the payer's number was (services/privacy): nothing to compare with.
        return PhoneCheck.UNVERIFIABLE
    text = str(seen).strip().removeprefix("+")
    if not _SHAPE.fullmatch(text):
        return PhoneCheck.UNVERIFIABLE  # letters, spaces, decimals: not a number Daraja sends
    expected = _aligned(payment_phone, text)
    if expected is None:
        return PhoneCheck.UNVERIFIABLE  # 11 digits, 13 digits...: no position can be trusted
    subscriber = [(c, e) for c, e in zip(text[-9:], expected[-9:], strict=True) if c != MASK]
    if not subscriber:
        return PhoneCheck.UNVERIFIABLE  # only the country code (or nothing) is visible
    visible = [(c, e) for c, e in zip(text, expected, strict=True) if c != MASK]
    if not all(c == e for c, e in visible):
        return PhoneCheck.MISMATCH
    return PhoneCheck.MATCH if len(subscriber) >= MATCH_NEEDS_VISIBLE_DIGITS else PhoneCheck.UNVERIFIABLE


def _aligned(payment_phone: str, text: str) -> str | None:
    """The payment's number written the way `text` is: international (12), local with a leading
    0 (10) or bare subscriber number (9 characters); None for any other length."""
    subscriber = payment_phone[3:]
    if len(text) == 12:
        return payment_phone  # another country code is a visible difference: a mismatch
    if len(text) == 10 and text[0] in ("0", MASK):
        return "0" + subscriber
    if len(text) == 9 and text[0] != "0":
        return subscriber
    return None
