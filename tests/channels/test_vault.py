"""The vault without a database: sealing, the associated data that pins a row to its channel and
version, key files, and KEK re-wrapping. Each test builds its own key file in a temporary directory."""
from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from typing import Any

import pytest

from services.channels.vault import (
    DecryptionFailed,
    KeyFileError,
    KeyNotHeld,
    LocalKeyFileProvider,
    PublicKeyWrapper,
    fingerprint,
    public_key_path,
    rewrap,
    seal,
    unseal,
)
from tests.channels.conftest import Secrets, assert_no_secret, new_secrets


def test_sealed_credentials_open_to_the_same_values_and_hold_no_plaintext(provider, creds):
    sealed = seal(creds.app, "shop-1", 1, provider)
    assert unseal(sealed, "shop-1", 1, provider) == creds.app
    assert_no_secret(sealed.wrapped_key + sealed.nonce + sealed.ciphertext, *creds.values)
    assert_no_secret(repr(sealed), *creds.values)


def test_each_seal_uses_a_fresh_data_key_and_nonce(provider, creds):
    first, second = seal(creds.app, "shop-1", 1, provider), seal(creds.app, "shop-1", 1, provider)
    assert first.ciphertext != second.ciphertext and first.nonce != second.nonce
    assert first.wrapped_key != second.wrapped_key


@pytest.mark.parametrize("channel_id, version", [("shop-2", 1), ("shop-1", 2)])
def test_a_row_moved_to_another_channel_or_version_fails_to_open(provider, creds, channel_id, version):
    sealed = seal(creds.app, "shop-1", 1, provider)
    with pytest.raises(DecryptionFailed, match=f"channel '{channel_id}' version {version}.*altered or belongs to"):
        unseal(sealed, channel_id, version, provider)


@pytest.mark.parametrize("part", ["ciphertext", "nonce", "wrapped_key"])
def test_an_edited_row_fails_to_open(provider, creds, part):
    sealed = seal(creds.app, "shop-1", 1, provider)
    edited = bytearray(getattr(sealed, part))
    edited[len(edited) // 2] ^= 0x01
    with pytest.raises(DecryptionFailed, match="altered"):
        changed: dict[str, Any] = {part: bytes(edited)}
        unseal(replace(sealed, **changed), "shop-1", 1, provider)


def test_a_data_key_moved_from_another_row_fails_to_open(provider):
    mine, theirs = seal(new_secrets().app, "shop-1", 1, provider), seal(new_secrets().app, "shop-2", 1, provider)
    with pytest.raises(DecryptionFailed):
        unseal(replace(mine, wrapped_key=theirs.wrapped_key), "shop-1", 1, provider)


def test_a_wrong_key_file_fails_naming_the_missing_key_and_the_file(provider, creds, tmp_path):
    sealed = seal(creds.app, "shop-1", 1, provider)
    other = LocalKeyFileProvider.open(tmp_path / "other" / "kek.json", create=True)
    with pytest.raises(KeyNotHeld) as refused:
        unseal(sealed, "shop-1", 1, other)
    message = str(refused.value)
    assert provider.key_id in message and str(other.path) in message and "wrong or outdated key file" in message


def test_the_public_half_seals_but_cannot_open(provider, key_file, creds):
    wrapper = PublicKeyWrapper.from_file(public_key_path(key_file))
    assert wrapper.key_id == provider.key_id
    assert not hasattr(wrapper, "unwrap")
    sealed = seal(creds.app, "shop-1", 3, wrapper)
    assert unseal(sealed, "shop-1", 3, provider) == creds.app
    assert "privateKey" not in public_key_path(key_file).read_text()


def test_a_new_key_file_is_private_to_its_owner(provider, key_file):
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(public_key_path(key_file).stat().st_mode) == 0o644
    assert LocalKeyFileProvider.open(key_file, create=True).key_id == provider.key_id  # never replaced


def test_a_key_file_readable_by_others_is_refused(provider, key_file):
    os.chmod(key_file, 0o644)
    with pytest.raises(KeyFileError, match="accessible to other users.*chmod 600"):
        LocalKeyFileProvider.open(key_file)


def test_a_missing_or_corrupt_key_file_fails_clearly_without_quoting_it(tmp_path):
    with pytest.raises(KeyFileError, match="no key file at .*vault init"):
        LocalKeyFileProvider.open(tmp_path / "absent.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "mpesa-pipeline-vault-keyring/1", "active": "x", "keys": [{"id": "x", '
                       '"privateKey": "AAAAsecretAAAA"}]}')
    os.chmod(corrupt, 0o600)
    with pytest.raises(KeyFileError) as refused:
        LocalKeyFileProvider.open(corrupt)
    assert "not a vault keyring" in str(refused.value) and "AAAAsecret" not in str(refused.value)


def test_a_key_whose_id_was_edited_in_the_file_is_refused(provider, key_file):
    document = json.loads(key_file.read_text())
    document["keys"][0]["id"] = document["active"] = "x25519-0000000000000000"
    key_file.write_text(json.dumps(document))
    with pytest.raises(KeyFileError, match="not a vault keyring"):
        LocalKeyFileProvider.open(key_file)


def test_rewrapping_moves_the_data_key_to_the_new_kek_and_leaves_the_ciphertext(provider, key_file, creds):
    sealed = seal(creds.app, "shop-1", 1, provider)
    old_key = provider.key_id
    new_key = provider.add_key()
    moved = rewrap(sealed, "shop-1", 1, provider)
    assert (moved.key_id, moved.ciphertext, moved.nonce) == (new_key, sealed.ciphertext, sealed.nonce)
    provider.retire([old_key])
    assert provider.key_ids == (new_key,)
    assert unseal(moved, "shop-1", 1, provider) == creds.app
    with pytest.raises(KeyNotHeld):
        unseal(sealed, "shop-1", 1, provider)
    assert PublicKeyWrapper.from_file(public_key_path(key_file)).key_id == new_key


def test_a_running_provider_finds_a_key_added_by_another_process(provider, key_file, creds):
    rotator = LocalKeyFileProvider.open(key_file)
    rotator.add_key()
    sealed = seal(creds.app, "shop-1", 1, PublicKeyWrapper.from_file(public_key_path(key_file)))
    assert unseal(sealed, "shop-1", 1, provider) == creds.app  # re-read the file for the unknown key


def test_the_active_key_cannot_be_retired(provider):
    with pytest.raises(Exception, match="cannot be retired"):
        provider.retire([provider.key_id])


def test_fingerprints_identify_a_credential_set_without_revealing_it(creds):
    assert fingerprint(creds.app) == fingerprint(Secrets(*creds.values).app)
    assert fingerprint(creds.app) != fingerprint(new_secrets().app)
    assert len(fingerprint(creds.app)) == 16
    assert_no_secret(fingerprint(creds.app), *creds.values)


def test_reprs_show_no_key_material(provider, key_file):
    private = json.loads(key_file.read_text())["keys"][0]["privateKey"]
    assert private not in repr(provider) and provider.key_id in repr(provider)
