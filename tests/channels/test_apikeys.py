"""Upstream API keys: what the ingress gets from the authenticator for good, wrong, malformed and
revoked keys, and how long its cache may keep an answer."""
from __future__ import annotations

from services.channels.apikeys import ApiKeyAuthenticator, key_id_of, key_sha256, new_api_key
from tests.channels.conftest import paybill_body


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_random_self_identifying_and_hashed():
    (first_id, first), (second_id, second) = new_api_key(), new_api_key()
    assert first != second and first_id != second_id
    assert key_id_of(first) == first_id and len(first) == len("mpk_") + 12 + 1 + 43
    assert key_sha256(first) != key_sha256(second) and len(key_sha256(first)) == 32
    assert key_id_of("mpk_short") is None and key_id_of(first + "x") is None


async def _issued(onboarding, unique) -> tuple[str, str, str]:
    channel_id = f"shop-{unique}"
    await onboarding.create_channel(paybill_body(channel_id), "tests")
    view, api_key = await onboarding.issue_api_key({"label": "web shop", "channelIds": [channel_id]}, "tests")
    return channel_id, view["keyId"], api_key


async def test_a_good_key_is_scoped_to_its_channels(onboarding, pool, ingress_pool, unique):
    channel_id, key_id, api_key = await _issued(onboarding, unique)
    found = await ApiKeyAuthenticator(ingress_pool).authenticate(api_key)
    assert found is not None and (found.key_id, found.label) == (key_id, "web shop")
    assert found.allows(channel_id) and not found.allows(f"other-{unique}")


async def test_wrong_malformed_and_missing_keys_are_refused(onboarding, pool, ingress_pool, unique):
    _, key_id, api_key = await _issued(onboarding, unique)
    authenticator = ApiKeyAuthenticator(ingress_pool)
    forged = f"mpk_{key_id}_" + ("A" if api_key[-1] != "A" else "B") * 43  # right id, wrong secret
    for presented in (forged, api_key[:-1], "", None, "Bearer " + api_key, api_key.upper()):
        assert await authenticator.authenticate(presented) is None


async def test_a_revoked_key_stops_working_within_the_cache_ttl(onboarding, pool, ingress_pool, unique):
    _, key_id, api_key = await _issued(onboarding, unique)
    clock = FakeClock()
    authenticator = ApiKeyAuthenticator(ingress_pool, ttl_s=30, clock=clock)
    assert await authenticator.authenticate(api_key) is not None
    await onboarding.revoke_api_key(key_id, "tests")
    assert await authenticator.authenticate(api_key) is not None  # cached answer, at most ttl_s old
    clock.now += 31
    assert await authenticator.authenticate(api_key) is None
    assert await ApiKeyAuthenticator(ingress_pool).authenticate(api_key) is None


async def test_the_cache_is_bounded(onboarding, pool, ingress_pool, unique):
    _, _, api_key = await _issued(onboarding, unique)
    authenticator = ApiKeyAuthenticator(ingress_pool, entries_max=3)
    for _ in range(5):
        _, other = new_api_key()
        await authenticator.authenticate(other)
    await authenticator.authenticate(api_key)
    assert len(authenticator._answers) == 3
