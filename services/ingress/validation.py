"""The ingress's own HTTP rules; what a valid payment request is lives in the shared contract
(services/common/payment.py)."""
from __future__ import annotations

import re

# Idempotency-Key: 1-255 visible ASCII characters. The IETF draft makes the value a structured-field
# string ("..."), most APIs send it bare; both are accepted and mean the same key.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def parse_idempotency_key(raw: str | None) -> tuple[str | None, str | None]:
    """Returns (key, None) or (None, why it is not acceptable)."""
    if raw is None or raw == "":
        return None, ("is required: send a unique key per payment (e.g. a UUID) and reuse it on every retry "
                      "of that payment")
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    if not _IDEMPOTENCY_KEY.fullmatch(raw):
        return None, "must be 1-255 visible ASCII characters"
    return raw, None
