"""Keyed pseudonyms of payers' data (docs/data-protection.md): the same value always gives the same
pseudonym under one key, so analytics can join and count repeat payers and an operator can still
find a payment by a receipt, but nobody without the key can go back from the pseudonym to the value,
nor test a guessed phone number against it (a plain hash of a 12-digit number is reversed by trying
them all; an HMAC needs the key). The key is a secret file held by the processes that pseudonymise
(PSEUDONYM_KEY_FILE, 0600), never by analytics.

HMAC-SHA-256 (RFC 2104; FIPS 198-1) cut to 128 bits: enough that two values never meet by chance
in one merchant's lifetime, short enough to index.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Final

from services.common import config

KEY_BYTES: Final = 32
DIGEST_HEX: Final = 32  # 128 bits
PHONE: Final = "ph"      # a payer's MSISDN (254…)
CHECKOUT: Final = "ck"   # a CheckoutRequestID (Daraja's current ids end in the payer's MSISDN)

PSEUDONYM_KEY_FILE = config.Setting("PSEUDONYM_KEY_FILE", Path, Path(".local/secrets/pseudonym.key"),
                                    secret=False, help="file holding the key of payers' data pseudonyms "
                                    "(64 hex digits, mode 0600; `make run` makes one)")


class Pseudonyms:
    def __init__(self, key: bytes):
        if len(key) < KEY_BYTES:
            raise ValueError(f"a pseudonym key has at least {KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> Pseudonyms:
        try:
            return cls(bytes.fromhex(path.read_text().strip()))
        except ValueError:
            raise ValueError(f"{path} does not hold a pseudonym key ({KEY_BYTES * 2} or more hex digits)") from None

    def of(self, kind: str, value: str) -> str:
        """`<kind>_<32 hex digits>`; the kind is in the MAC too, so a phone and a CheckoutRequestID
        that happen to be equal get different pseudonyms."""
        digest = hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
        return f"{kind}_{digest[:DIGEST_HEX]}"

    def phone(self, msisdn: str) -> str:
        return self.of(PHONE, msisdn)

    def checkout(self, checkout_request_id: str) -> str:
        return self.of(CHECKOUT, checkout_request_id)


def create_key(path: Path) -> bool:
    """Makes a new key file (0600) unless one exists; True if it made one. Never overwrites: a new
    key breaks every join with pseudonyms made under the old one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(KEY_BYTES) + "\n")
    return True
