"""Validation of onboarding input, pure: each bad input is refused naming its API field, and the
messages never repeat a submitted secret."""
from __future__ import annotations

from datetime import date

import pytest

from services.channels.model import (
    ACTIVE,
    Channel,
    activation_errors,
    channel_view,
    parse_api_key_request,
    parse_channel_changes,
    parse_credentials,
    parse_new_channel,
)
from tests.channels.conftest import paybill_body

TODAY = date(2025, 1, 15)


def test_a_paybill_with_consent_becomes_an_onboarding_channel():
    channel, errors = parse_new_channel(paybill_body("shop-1", maxAmount=5000, pushesPerSecond=2), TODAY)
    assert errors == {} and channel is not None
    assert channel == Channel("shop-1", "Duka La Mama", "paybill", "174379", "sandbox", None, "onboarding",
                              "AGR-2024-001", date(2024, 5, 1), 5000, 2.0)
    assert channel.shortcode.party_b == "174379"


def test_a_till_pays_into_its_till_number():
    channel, errors = parse_new_channel(paybill_body("till-1", shortcodeType="till", tillNumber="5123456"), TODAY)
    assert errors == {} and channel is not None
    assert channel.shortcode.party_b == "5123456" and channel.shortcode.business_shortcode == "174379"


def test_consent_may_come_later():
    body = {k: v for k, v in paybill_body("shop-1").items() if not k.startswith("consent")}
    channel, errors = parse_new_channel(body, TODAY)
    assert errors == {} and channel is not None and channel.consent_reference is None


@pytest.mark.parametrize("change, field", [
    ({"shortcodeType": "agent"}, "shortcodeType"),
    ({"shortcodeType": "till"}, "tillNumber"),
    ({"tillNumber": "5123456"}, "tillNumber"),  # a paybill has none
    ({"businessShortcode": "17437A"}, "businessShortcode"),
    ({"businessShortcode": "1234"}, "businessShortcode"),
    ({"businessShortcode": 174379}, "businessShortcode"),
    ({"shortcodeType": "till", "tillNumber": "12-34"}, "tillNumber"),
    ({"environment": "staging"}, "environment"),
    ({"consentDate": None}, "consentDate"),
    ({"consentReference": None}, "consentReference"),
    ({"consentDate": "2025-02-30"}, "consentDate"),
    ({"consentDate": "2025-01-16"}, "consentDate"),  # in the future
    ({"channelId": "Shop 1"}, "channelId"),
    ({"displayName": ""}, "displayName"),
    ({"maxAmount": 250_001}, "maxAmount"),
    ({"maxAmount": 10.5}, "maxAmount"),
    ({"pushesPerSecond": 0}, "pushesPerSecond"),
    ({"confirmSuccessByQuery": "yes"}, "confirmSuccessByQuery"),
    ({"confirmSuccessByQuery": 1}, "confirmSuccessByQuery"),
    ({"analyticsMetadataKeys": "cart"}, "analyticsMetadataKeys"),
    ({"analyticsMetadataKeys": [f"k{i}" for i in range(21)]}, "analyticsMetadataKeys"),
    ({"analyticsMetadataKeys": ["cart", "cart"]}, "analyticsMetadataKeys"),
    ({"analyticsMetadataKeys": [""]}, "analyticsMetadataKeys"),
    ({"analyticsMetadataKeys": ["x" * 65]}, "analyticsMetadataKeys"),
    ({"analyticsMetadataKeys": ["a\nb"]}, "analyticsMetadataKeys"),
    ({"analyticsMetadataKeys": [7]}, "analyticsMetadataKeys"),
    ({"status": "active"}, "status"),
    ({"colour": "green"}, "colour"),
])
def test_bad_input_is_refused_naming_the_field(change, field):
    channel, errors = parse_new_channel(paybill_body("shop-1", **change), TODAY)
    assert channel is None
    assert field in errors, errors


def test_every_required_field_is_named_when_missing():
    _, errors = parse_new_channel({}, TODAY)
    assert set(errors) == {"channelId", "displayName", "shortcodeType", "businessShortcode", "environment"}
    assert parse_new_channel([], TODAY) == (None, {"body": "must be a JSON object"})


def _channel(**overrides) -> Channel:
    channel, errors = parse_new_channel(paybill_body("shop-1"), TODAY)
    assert not errors
    return Channel(**{**channel.__dict__, **overrides})


def test_a_partial_update_keeps_the_other_fields_and_null_removes_optional_ones():
    changed, errors = parse_channel_changes(_channel(max_amount=900), {"displayName": "Duka", "maxAmount": None},
                                            TODAY)
    assert errors == {} and changed is not None
    assert changed.display_name == "Duka" and changed.max_amount is None and changed.business_shortcode == "174379"


def test_switching_a_till_to_a_paybill_needs_the_till_number_removed():
    till = _channel(shortcode_type="till", till_number="5123456")
    assert "tillNumber" in parse_channel_changes(till, {"shortcodeType": "paybill"}, TODAY)[1]
    changed, errors = parse_channel_changes(till, {"shortcodeType": "paybill", "tillNumber": None}, TODAY)
    assert errors == {} and changed is not None and changed.till_number is None


@pytest.mark.parametrize("body, field", [
    ({"consentReference": None, "consentDate": None}, "consentReference"),  # an active channel keeps its consent
    ({"channelId": "other"}, "channelId"),
    ({"status": "suspended"}, "status"),
    ({"businessShortcode": None}, "businessShortcode"),
    ({"tillNumber": "5123456"}, "tillNumber"),
])
def test_bad_updates_are_refused_naming_the_field(body, field):
    changed, errors = parse_channel_changes(_channel(status=ACTIVE), body, TODAY)
    assert changed is None and field in errors, errors


def test_activation_needs_consent_and_credentials():
    assert activation_errors(_channel(), has_credentials=True) == {}
    assert set(activation_errors(_channel(consent_reference=None, consent_date=None), has_credentials=False)) == {
        "consentReference", "credentials"}


def test_credentials_are_parsed_and_errors_never_repeat_them():
    secret = "s3cr3t-never-echoed"
    given, errors = parse_credentials({"consumerKey": "key", "consumerSecret": secret, "passkey": "pk",
                                       "validate": True})
    assert errors == {} and given is not None and given.validate is True and given.app.consumer_secret == secret
    assert secret not in repr(given)

    _, errors = parse_credentials({"consumerKey": f"a:{secret}", "consumerSecret": f"{secret} x",
                                   "validate": "yes"})
    assert set(errors) == {"consumerKey", "consumerSecret", "passkey", "validate"}
    assert secret not in str(errors)


def test_api_key_requests_name_their_bad_fields():
    request, errors = parse_api_key_request({"label": "shop frontend", "channelIds": ["a", "b", "a"]})
    assert errors == {} and request is not None and request.channel_ids == ("a", "b")
    _, errors = parse_api_key_request({"label": "", "channelIds": ["Bad Id"]})
    assert set(errors) == {"label", "channelIds"}
    _, errors = parse_api_key_request({"label": "x", "channelIds": []})
    assert set(errors) == {"channelIds"}


def test_query_confirmation_is_off_unless_asked_and_cannot_be_removed():
    assert _channel().confirm_success_by_query is False
    on, errors = parse_channel_changes(_channel(), {"confirmSuccessByQuery": True}, TODAY)
    assert errors == {} and on is not None
    assert on.confirm_success_by_query is True and channel_view(on)["confirmSuccessByQuery"] is True
    _, errors = parse_channel_changes(on, {"confirmSuccessByQuery": None}, TODAY)
    assert "confirmSuccessByQuery" in errors


def test_no_metadata_key_reaches_analytics_unless_the_channel_lists_it():
    assert _channel().analytics_metadata_keys == () and channel_view(_channel())["analyticsMetadataKeys"] == []
    listed, errors = parse_channel_changes(_channel(), {"analyticsMetadataKeys": ["cart", "campaign"]}, TODAY)
    assert errors == {} and listed is not None
    assert channel_view(listed)["analyticsMetadataKeys"] == ["cart", "campaign"]
    cleared, errors = parse_channel_changes(listed, {"analyticsMetadataKeys": []}, TODAY)
    assert errors == {} and cleared is not None and cleared.analytics_metadata_keys == ()
