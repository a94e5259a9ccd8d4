"""Webhook signing secrets: made by us, shown once, sealed by the vault to the notifier's key.

A secret is `whsec_` followed by 32 random bytes in base64, the form the Standard Webhooks
libraries accept. It is sealed with the notifier's own key-encryption key (a keyring apart from the
STK worker's): the onboarding side seals with the public half and can never read a secret back;
the notifier cannot open Daraja credentials, nor the STK worker webhook secrets. The associated
data binds (endpoint, version), so a row moved to another endpoint or version fails to open.
"""
from __future__ import annotations

import base64
import hashlib
import secrets as random

from services.channels.vault import KeyProvider, KeyWrapper, SealedCredentials, open_bytes, seal_bytes

PREFIX = "whsec_"
SECRET_BYTES = 32  # the specification asks for 24 to 64


def new_secret() -> str:
    return PREFIX + base64.b64encode(random.token_bytes(SECRET_BYTES)).decode()


def associated_data(endpoint_id: str, version: int) -> bytes:
    # Endpoint ids are `ep_` and hex (migrations/0014_webhooks.sql), so NUL cannot appear in one.
    return f"mpesa-pipeline/webhook-secret/v1\x00{endpoint_id}\x00{version}".encode()


def seal_secret(secret: str, endpoint_id: str, version: int, wrapper: KeyWrapper) -> SealedCredentials:
    return seal_bytes(secret.encode(), associated_data(endpoint_id, version), wrapper)


def open_secret(sealed: SealedCredentials, endpoint_id: str, version: int, provider: KeyProvider) -> str:
    where = f"signing secret of webhook endpoint {endpoint_id!r} version {version}"
    return open_bytes(sealed, associated_data(endpoint_id, version), provider, where).decode()


def fingerprint(secret: str) -> str:
    """Names a secret in listings and audit entries without revealing it (256 random bits: no
    guessing oracle)."""
    return hashlib.sha256(b"mpesa-pipeline/webhook-secret-fingerprint/v1\x00" + secret.encode()).hexdigest()[:16]
