"""Validation of onboarding input, pure: each bad input is refused naming its API field, and the
messages never repeat a submitted secret."""
from __future__ import annotations

from datetime import date

import pytest

from services.channels.model import (
    ACTIVE,
    AGREEMENT_FIELDS,
    LAWFUL_BASES,
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
                              "AGR-2024-001", date(2024, 5, 1), 5000, 2.0, False, None, "DPA-2024-017", "2.1",
                              date(2024, 5, 1), "contract")
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
    ({"payerDataRetentionDays": 0}, "payerDataRetentionDays"),
    ({"payerDataRetentionDays": 3651}, "payerDataRetentionDays"),
    ({"payerDataRetentionDays": 30.5}, "payerDataRetentionDays"),
    ({"payerDataRetentionDays": True}, "payerDataRetentionDays"),
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


def test_activation_needs_every_field_of_the_agreement_and_names_each_missing_one():
    assert set(activation_errors(_channel(agreement_reference=None, agreement_version=None, agreement_signed_on=None,
                                          lawful_basis=None), has_credentials=True)) == set(AGREEMENT_FIELDS)
    assert set(activation_errors(_channel(lawful_basis=None), has_credentials=True)) == {"lawfulBasis"}
    assert set(activation_errors(_channel(agreement_version=None), has_credentials=True)) == {"agreementVersion"}


def test_the_agreement_may_come_later_and_in_parts_while_onboarding():
    body = {k: v for k, v in paybill_body("shop-1").items() if k not in AGREEMENT_FIELDS}
    channel, errors = parse_new_channel({**body, "agreementReference": "DPA-1"}, TODAY)
    assert errors == {} and channel is not None and channel.missing_agreement_fields == (
        "agreementVersion", "agreementSignedOn", "lawfulBasis")
    changed, errors = parse_channel_changes(channel, {"agreementVersion": " 3 ", "agreementSignedOn": "2025-01-15",
                                                      "lawfulBasis": "legitimate_interests"}, TODAY)
    assert errors == {} and changed is not None and changed.missing_agreement_fields == ()
    assert (changed.agreement_version, changed.agreement_signed_on) == ("3", TODAY)
    view = channel_view(changed)
    assert (view["agreementReference"], view["agreementVersion"], view["agreementSignedOn"], view["lawfulBasis"]) == (
        "DPA-1", "3", "2025-01-15", "legitimate_interests")


@pytest.mark.parametrize("change, field", [
    ({"agreementReference": ""}, "agreementReference"), ({"agreementReference": "   "}, "agreementReference"),
    ({"agreementReference": "x" * 129}, "agreementReference"), ({"agreementReference": "DPA\n1"}, "agreementReference"),
    ({"agreementReference": "DPA\u2028"}, "agreementReference"),
    ({"agreementReference": "DPA-\u202e1"}, "agreementReference"),
    ({"agreementReference": 17}, "agreementReference"), ({"agreementReference": ["DPA"]}, "agreementReference"),
    ({"agreementReference": "DPA\ud83d"}, "agreementReference"),
    ({"agreementVersion": "v" * 33}, "agreementVersion"), ({"agreementVersion": 2}, "agreementVersion"),
    ({"agreementVersion": "\x00"}, "agreementVersion"),
    ({"agreementSignedOn": "2025-01-16"}, "agreementSignedOn"),  # in the future
    ({"agreementSignedOn": "2024-02-30"}, "agreementSignedOn"),
    ({"agreementSignedOn": "15/01/2025"}, "agreementSignedOn"),
    ({"agreementSignedOn": 20240101}, "agreementSignedOn"),
    ({"lawfulBasis": "Contract"}, "lawfulBasis"), ({"lawfulBasis": "research"}, "lawfulBasis"),
    ({"lawfulBasis": ["contract"]}, "lawfulBasis"), ({"lawfulBasis": ""}, "lawfulBasis"),
])
def test_a_bad_agreement_field_is_refused_naming_it(change, field):
    channel, errors = parse_new_channel(paybill_body("shop-1", **change), TODAY)
    assert channel is None and set(errors) == {field}, errors
    changed, errors = parse_channel_changes(_channel(), change, TODAY)
    assert changed is None and set(errors) == {field}, errors


def test_every_lawful_basis_of_the_act_is_accepted():
    for basis in LAWFUL_BASES:
        channel, errors = parse_new_channel(paybill_body("shop-1", lawfulBasis=basis), TODAY)
        assert errors == {} and channel is not None and channel.lawful_basis == basis


def test_an_active_channel_cannot_lose_or_half_change_its_agreement():
    active = _channel(status=ACTIVE)
    changed, errors = parse_channel_changes(active, {"lawfulBasis": None}, TODAY)
    assert changed is None and set(errors) == {"lawfulBasis"}
    changed, errors = parse_channel_changes(active, {field: None for field in AGREEMENT_FIELDS}, TODAY)
    assert changed is None and set(errors) == set(AGREEMENT_FIELDS)
    changed, errors = parse_channel_changes(active, {"agreementVersion": "3"}, TODAY)  # a new version: fine
    assert errors == {} and changed is not None and changed.agreement_version == "3"


def test_an_active_channel_from_before_agreements_may_still_be_changed_but_not_given_half_an_agreement():
    legacy = _channel(status=ACTIVE, agreement_reference=None, agreement_version=None, agreement_signed_on=None,
                      lawful_basis=None)
    changed, errors = parse_channel_changes(legacy, {"displayName": "Duka Mpya"}, TODAY)
    assert errors == {} and changed is not None and changed.display_name == "Duka Mpya"
    changed, errors = parse_channel_changes(legacy, {"agreementReference": "DPA-9"}, TODAY)
    assert changed is None and set(errors) == {"agreementVersion", "agreementSignedOn", "lawfulBasis"}


def test_the_compliance_route_cannot_be_a_channel_id():
    channel, errors = parse_new_channel(paybill_body("compliance"), TODAY)
    assert channel is None and set(errors) == {"channelId"}


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


def test_a_channel_keeps_payers_data_for_its_own_days_or_the_default_when_cleared():
    assert _channel().payer_data_retention_days is None  # PAYER_DATA_RETENTION_DAYS
    own, errors = parse_channel_changes(_channel(), {"payerDataRetentionDays": 30}, TODAY)
    assert errors == {} and own is not None and channel_view(own)["payerDataRetentionDays"] == 30
    cleared, errors = parse_channel_changes(own, {"payerDataRetentionDays": None}, TODAY)
    assert errors == {} and cleared is not None and cleared.payer_data_retention_days is None


def test_no_metadata_key_reaches_analytics_unless_the_channel_lists_it():
    assert _channel().analytics_metadata_keys == () and channel_view(_channel())["analyticsMetadataKeys"] == []
    listed, errors = parse_channel_changes(_channel(), {"analyticsMetadataKeys": ["cart", "campaign"]}, TODAY)
    assert errors == {} and listed is not None
    assert channel_view(listed)["analyticsMetadataKeys"] == ["cart", "campaign"]
    cleared, errors = parse_channel_changes(listed, {"analyticsMetadataKeys": []}, TODAY)
    assert errors == {} and cleared is not None and cleared.analytics_metadata_keys == ()
