"""Settings shared by the notifier and the endpoint management (onboarding API and CLI).

The notifier's own delivery settings are declared beside them (NOTIFIER_SETTINGS, in this file).
"""
from __future__ import annotations

from pathlib import Path

from services.common import config
from services.notifier.destinations import parse_networks

# Default empty: only public addresses. `make run` and the tests allow loopback for their receivers.
WEBHOOK_ALLOWED_NETWORKS = config.Setting(
    "WEBHOOK_ALLOWED_NETWORKS", parse_networks, (),
    help="comma-separated CIDRs webhooks may reach besides public addresses (e.g. 127.0.0.0/8); default none")
NOTIFIER_VAULT_KEY_FILE = config.Setting(
    "NOTIFIER_VAULT_KEY_FILE", Path, Path(".local/vault/webhooks-kek.json"),
    help="the key-encryption key file of webhook signing secrets (private; only the notifier's host)")
WEBHOOK_VAULT_PUBLIC_KEY_FILE = config.Setting(
    "WEBHOOK_VAULT_PUBLIC_KEY_FILE", Path, Path(".local/vault/webhooks-kek.pub.json"),
    help="public half of the notifier's key-encryption key, to seal new webhook signing secrets")
