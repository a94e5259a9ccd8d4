"""Envelope encryption of a channel's Daraja credentials, and the keys that protect them.

Each credential version is sealed with a fresh 256-bit data key (AES-256-GCM); the data key is
wrapped by a key-encryption key (KEK) from a key provider. Both layers bind the channel id and the
version as associated data, so a row copied to another channel or version, or edited, fails to
open instead of yielding someone else's credentials.

The KEK is asymmetric: wrapping is HPKE (RFC 9180: X25519, HKDF-SHA256, AES-256-GCM) to a public
key, unwrapping needs the private key. The onboarding API and the command line seal new credentials
with the public key alone; only the STK worker's host holds the private key file. A KMS- or
Vault-style provider fits the same two Protocols (wrap with an encrypt-only grant, unwrap with a
decrypt grant).

Nothing here logs, and no exception message carries key material or plaintext.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from services.daraja.models import AppCredentials

ALGORITHM = "hpke-x25519-hkdf-sha256-aes256gcm"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_KEYRING_FORMAT = "mpesa-pipeline-vault-keyring/1"
_PUBLIC_FORMAT = "mpesa-pipeline-vault-public-key/1"
NONCE_BYTES = 12


class VaultError(Exception):
    """A credential that cannot be sealed or opened; the message says which and why, never a secret."""


class KeyFileError(VaultError):
    """The key file (or public key file) is missing, unreadable, too widely readable or malformed."""


class KeyNotHeld(VaultError):
    """The row was wrapped by a key-encryption key this provider does not have."""


class DecryptionFailed(VaultError):
    """Authentication failed: the row was altered, moved to another channel/version, or the key is wrong."""


@dataclass(frozen=True, repr=False)
class SealedCredentials:
    """What the database stores for one credential version."""

    key_id: str  # the KEK that wrapped the data key
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        return f"SealedCredentials(key_id={self.key_id}, ciphertext={len(self.ciphertext)} bytes)"


class KeyWrapper(Protocol):
    """Enough to seal: the onboarding side needs no secret key."""

    @property
    def key_id(self) -> str: ...

    def wrap(self, data_key: bytes, associated_data: bytes) -> bytes: ...


class KeyProvider(KeyWrapper, Protocol):
    """Enough to open as well: held only where credentials are used (the STK worker)."""

    def unwrap(self, key_id: str, wrapped_key: bytes, associated_data: bytes) -> bytes: ...


def associated_data(channel_id: str, version: int) -> bytes:
    # Channel ids never contain NUL (model.CHANNEL_ID), so the encoding is unambiguous.
    return f"mpesa-pipeline/channel-credentials/v1\x00{channel_id}\x00{version}".encode()


def seal(app: AppCredentials, channel_id: str, version: int, wrapper: KeyWrapper) -> SealedCredentials:
    return seal_bytes(_plaintext(app), associated_data(channel_id, version), wrapper)


def unseal(sealed: SealedCredentials, channel_id: str, version: int, provider: KeyProvider) -> AppCredentials:
    where = f"credentials of channel {channel_id!r} version {version}"
    return _credentials_from(open_bytes(sealed, associated_data(channel_id, version), provider, where), where)


def seal_bytes(plaintext: bytes, aad: bytes, wrapper: KeyWrapper) -> SealedCredentials:
    """Envelope encryption of any secret bound to `aad` (which names what it is and whose): the
    credentials above, and webhook signing secrets (services/notifier/secrets.py)."""
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_BYTES)  # the data key is used once, so a random nonce cannot repeat under it
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, aad)
    return SealedCredentials(wrapper.key_id, wrapper.wrap(data_key, aad), nonce, ciphertext)


def open_bytes(sealed: SealedCredentials, aad: bytes, provider: KeyProvider, where: str) -> bytes:
    """The plaintext of seal_bytes; `where` names the secret in errors (never its value)."""
    data_key = _unwrap(provider, sealed, aad, where)
    try:
        return AESGCM(data_key).decrypt(sealed.nonce, sealed.ciphertext, aad)
    except (InvalidTag, ValueError):
        raise DecryptionFailed(f"{where} fail authentication: the row was altered or belongs to another "
                               "channel, endpoint or version") from None


def rewrap(sealed: SealedCredentials, channel_id: str, version: int, provider: KeyProvider) -> SealedCredentials:
    return rewrap_bytes(sealed, associated_data(channel_id, version), provider,
                        f"credentials of channel {channel_id!r} version {version}")


def rewrap_bytes(sealed: SealedCredentials, aad: bytes, provider: KeyProvider, where: str) -> SealedCredentials:
    """The same ciphertext with its data key wrapped by the provider's current KEK: only the data key
    is unwrapped, the secret itself is never decrypted."""
    data_key = _unwrap(provider, sealed, aad, where)
    return replace(sealed, key_id=provider.key_id, wrapped_key=provider.wrap(data_key, aad))


def fingerprint(app: AppCredentials) -> str:
    """Identifies a credential set in listings without revealing it. The three values are long and
    random (Daraja issues them), so a truncated SHA-256 gives no useful guessing oracle."""
    joined = "\x00".join((app.consumer_key, app.consumer_secret, app.passkey))
    return hashlib.sha256(b"mpesa-pipeline/credentials-fingerprint/v1\x00" + joined.encode()).hexdigest()[:16]


def _unwrap(provider: KeyProvider, sealed: SealedCredentials, aad: bytes, where: str) -> bytes:
    try:
        return provider.unwrap(sealed.key_id, sealed.wrapped_key, aad)
    except KeyNotHeld as exc:
        raise KeyNotHeld(f"{where}: {exc}") from None
    except DecryptionFailed:
        raise DecryptionFailed(f"{where}: the data key does not unwrap: the row was altered or belongs to "
                               "another channel, endpoint or version") from None


def _plaintext(app: AppCredentials) -> bytes:
    return json.dumps({"consumerKey": app.consumer_key, "consumerSecret": app.consumer_secret,
                       "passkey": app.passkey}, separators=(",", ":")).encode()


def _credentials_from(plaintext: bytes, where: str) -> AppCredentials:
    try:
        values = json.loads(plaintext)
        return AppCredentials(values["consumerKey"], values["consumerSecret"], values["passkey"])
    except (ValueError, KeyError, TypeError):
        raise DecryptionFailed(f"{where} decrypt to something that is not a credential set") from None


# Keys ------------------------------------------------------------------------------------------

def key_id_of(public_key: X25519PublicKey) -> str:
    """Derived from the public key, so a different key file can never claim a key's id."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "x25519-" + hashlib.sha256(raw).hexdigest()[:16]


def public_key_path(key_file: Path) -> Path:
    """Where the public half of a key file is written: kek.json -> kek.pub.json."""
    return key_file.with_name(key_file.stem + ".pub.json")


@dataclass(frozen=True)
class PublicKeyWrapper:
    """Seals with the public half of the active KEK; what the onboarding API and CLI use."""

    key_id: str
    public_key: X25519PublicKey

    @classmethod
    def from_file(cls, path: Path) -> PublicKeyWrapper:
        try:
            document = json.loads(Path(path).read_text())
            raw = base64.b64decode(document["publicKey"], validate=True)
            public_key = X25519PublicKey.from_public_bytes(raw)
            claimed = document["keyId"]
        except FileNotFoundError:
            raise KeyFileError(f"no vault public key at {path}: run `mpesa-pipeline vault init` where the STK "
                               "worker runs and copy its .pub.json file here") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise KeyFileError(f"{path} is not a vault public key file") from None
        if document.get("format") != _PUBLIC_FORMAT or claimed != key_id_of(public_key):
            raise KeyFileError(f"{path} is not a vault public key file (wrong format or key id)")
        return cls(claimed, public_key)

    def wrap(self, data_key: bytes, associated_data: bytes) -> bytes:
        return _SUITE.encrypt(data_key, self.public_key, info=associated_data)

    def document(self) -> dict:
        raw = self.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"format": _PUBLIC_FORMAT, "algorithm": ALGORITHM, "keyId": self.key_id,
                "publicKey": base64.b64encode(raw).decode()}


class LocalKeyFileProvider:
    """The embedded key provider: a keyring file (JSON, mode 0600) holding X25519 private keys.

    The newest key is active (new data keys are wrapped to it); older keys stay until nothing is
    wrapped by them any more, so a KEK rotation never strands a row. When asked for a key it does
    not hold, it re-reads the file once: another process (`vault rotate-kek`) may have added it.
    """

    def __init__(self, path: Path, keys: dict[str, X25519PrivateKey], active_key_id: str, created: dict[str, str]):
        self.path = Path(path)
        self._keys = keys
        self._active = active_key_id
        self._created = created

    def __repr__(self) -> str:
        return f"LocalKeyFileProvider(path={str(self.path)!r}, active={self._active}, keys={len(self._keys)})"

    @classmethod
    def open(cls, path: Path | str, *, create: bool = False) -> LocalKeyFileProvider:
        """Loads the key file; with create=True a missing one is made first (mode 0600)."""
        path = Path(path)
        if create and not path.exists():
            _create_key_file(path)
        return cls(path, *_read_keyring(path))

    @property
    def key_id(self) -> str:
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def public_wrapper(self) -> PublicKeyWrapper:
        return PublicKeyWrapper(self._active, self._keys[self._active].public_key())

    def wrap(self, data_key: bytes, associated_data: bytes) -> bytes:
        return self.public_wrapper().wrap(data_key, associated_data)

    def unwrap(self, key_id: str, wrapped_key: bytes, associated_data: bytes) -> bytes:
        key = self._keys.get(key_id)
        if key is None:
            self._reload()
            key = self._keys.get(key_id)
        if key is None:
            raise KeyNotHeld(f"wrapped by key {key_id}, which the key file {self.path} does not hold "
                             f"(it holds {', '.join(self._keys)}): wrong or outdated key file")
        try:
            return _SUITE.decrypt(wrapped_key, key, info=associated_data)
        except (InvalidTag, ValueError):
            raise DecryptionFailed("the data key does not unwrap") from None

    def add_key(self) -> str:
        """Makes a new key the active one (older keys are kept) and rewrites both files."""
        self._reload()
        key = X25519PrivateKey.generate()
        new_id = key_id_of(key.public_key())
        self._keys = {new_id: key, **self._keys}
        self._created = {new_id: _now(), **self._created}
        self._active = new_id
        self._save()
        return new_id

    def retire(self, key_ids: list[str]) -> None:
        """Forgets old keys. The caller checks first that no row is wrapped by them."""
        if self._active in key_ids:
            raise VaultError(f"the active key {self._active} cannot be retired")
        self._reload()
        self._keys = {k: v for k, v in self._keys.items() if k not in key_ids}
        self._save()

    def _reload(self) -> None:
        self._keys, self._active, self._created = _read_keyring(self.path)

    def _save(self) -> None:
        _write_private(self.path, _keyring_document(self._keys, self._active, self._created), replace_existing=True)
        _write_public(self.path, self.public_wrapper())


def _create_key_file(path: Path) -> None:
    key = X25519PrivateKey.generate()
    key_id = key_id_of(key.public_key())
    created = _write_private(path, _keyring_document({key_id: key}, key_id, {key_id: _now()}),
                             replace_existing=False)
    if created:  # another process may have won the race; its key is the one to keep
        _write_public(path, PublicKeyWrapper(key_id, key.public_key()))


def _keyring_document(keys: dict[str, X25519PrivateKey], active: str, created: dict[str, str]) -> dict:
    return {"format": _KEYRING_FORMAT, "algorithm": ALGORITHM, "active": active, "keys": [
        {"id": key_id, "createdAt": created.get(key_id, ""),
         "privateKey": base64.b64encode(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())).decode()}
        for key_id, key in keys.items()]}


def _read_keyring(path: Path) -> tuple[dict[str, X25519PrivateKey], str, dict[str, str]]:
    try:
        mode = path.stat().st_mode
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path} (run `mpesa-pipeline vault init` to create one)") from None
    except (OSError, ValueError):
        raise KeyFileError(f"key file {path} is unreadable or not JSON") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {path} is accessible to other users (mode {stat.S_IMODE(mode):o}); "
                           f"run chmod 600 {path}")
    try:
        keys, created = _keys_from(document)
        active = document["active"]
    except (KeyError, TypeError, ValueError):
        raise KeyFileError(f"key file {path} is not a vault keyring") from None
    if document.get("format") != _KEYRING_FORMAT or active not in keys:
        raise KeyFileError(f"key file {path} is not a vault keyring (wrong format or no active key)")
    return keys, active, created


def _keys_from(document: dict) -> tuple[dict[str, X25519PrivateKey], dict[str, str]]:
    keys, created = {}, {}
    for entry in document["keys"]:
        key = X25519PrivateKey.from_private_bytes(base64.b64decode(entry["privateKey"], validate=True))
        if key_id_of(key.public_key()) != entry["id"]:
            raise ValueError("a key does not match its id")
        keys[entry["id"]] = key
        created[entry["id"]] = entry.get("createdAt", "")
    return keys, created


def _write_private(path: Path, document: dict, *, replace_existing: bool) -> bool:
    """Writes atomically with mode 0600 from the first byte; False when not replacing and it exists."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".kek-", suffix=".tmp")  # mkstemp uses 0600
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        if replace_existing:
            os.replace(temporary, path)
            return True
        try:
            os.link(temporary, path)  # fails if the file appeared meanwhile: never overwrite a keyring
            return True
        except FileExistsError:
            return False
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _write_public(key_file: Path, wrapper: PublicKeyWrapper) -> None:
    target = public_key_path(key_file)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".pub-", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(wrapper.document(), handle, indent=1)
    os.chmod(temporary, 0o644)  # public: the onboarding side reads it
    os.replace(temporary, target)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
