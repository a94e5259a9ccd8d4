"""The unguessable token in each CallBackURL, bound to channel and payment (docs/design.md, "Security").

Daraja does not sign callbacks (docs/daraja.md §5), so the URL itself is the credential: an HMAC of the
channel and payment ids under a secret only we hold. Several secrets may be accepted at once so the
secret can be rotated while pushes made under the previous one still await their callbacks.
"""
from __future__ import annotations

import base64
import hashlib
import hmac


def callback_token(secret: bytes, channel_id: str, payment_id: str) -> str:
    mac = hmac.new(secret, f"{channel_id}\x1f{payment_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:24]).decode().rstrip("=")


def token_is_valid(secrets: list[bytes], channel_id: str, payment_id: str, token: str) -> bool:
    """Constant-time comparison against every accepted secret (current first, then previous)."""
    given = token.encode("utf-8", "surrogateescape")  # bytes: compare_digest refuses non-ASCII str
    results = [hmac.compare_digest(callback_token(s, channel_id, payment_id).encode(), given) for s in secrets]
    return any(results)


def callback_url(public_base: str, secret: bytes, channel_id: str, payment_id: str) -> str:
    # Path segments, not a query string: Daraja delivers the path intact (docs/daraja.md §5).
    token = callback_token(secret, channel_id, payment_id)
    return f"{public_base}/api/webhooks/mpesa/{channel_id}/{payment_id}/{token}"


def parse_secrets(raw: str) -> list[bytes]:
    """WEBHOOK_TOKEN_SECRETS: comma-separated, current first; each at least 32 characters."""
    secrets = [s.strip().encode() for s in raw.split(",") if s.strip()]
    if not secrets or any(len(s) < 32 for s in secrets):
        raise ValueError("must be one or more comma-separated secrets of at least 32 characters")
    return secrets
