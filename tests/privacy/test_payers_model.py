"""The pure parts of a payer's requests: a number masked in whatever text carries it, and the Kafka
window each answer states."""
from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given, settings, strategies as st

from services.common.payment import mask_phone
from services.common.topic_config import DAY_MS
from services.common.topics import CALLBACK_RAW, PAYMENT_REQUESTED
from services.privacy.payers import kafka_windows, mask_number, number_forms, parse_request

phones = st.from_regex(r"254[17][0-9]{8}", fullmatch=True)
around = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(phone=phones, before=around, after=around, form=st.integers(0, 2))
def test_no_form_of_the_number_survives_masking_whatever_surrounds_it(phone, before, after, form):
    forms = number_forms(phone)
    masked = mask_number(before + forms[form] + after, forms)
    assert not [f for f in forms if f in masked]


def test_a_webhook_body_keeps_its_shape_with_the_number_masked():
    body = '{"checkoutRequestId":"ws_CO_191220191020363925_254712345678","phone":"254******678"}'
    assert mask_number(body, number_forms("254712345678")) == body.replace("254712345678", mask_phone("254712345678"))


def test_each_raw_pii_topic_is_held_until_the_latest_payment_plus_its_retention_as_configured():
    latest = datetime(2026, 11, 1, tzinfo=timezone.utc)
    windows = {w["topic"]: w for w in kafka_windows(latest, {PAYMENT_REQUESTED.name: {"retention.ms": str(DAY_MS)},
                                                             CALLBACK_RAW.name: {"retention.ms": "-1"}})}
    assert windows[PAYMENT_REQUESTED.name]["mayHoldUntil"] == "2026-11-02T00:00:00+00:00"
    assert "never deleted" in windows[CALLBACK_RAW.name]["mayHoldUntil"]
    assert windows["mpesa.dead-letter.v1"]["mayHoldUntil"] == "2026-11-08T00:00:00+00:00"  # 7 days by default
    assert all(w["mayHoldUntil"] is None for w in kafka_windows(None, {}))


def test_a_request_names_its_payer_in_any_accepted_form_and_refuses_the_rest_without_quoting_them():
    for form in ("0712345678", "+254 712 345 678", "254712345678", "712345678"):
        request, errors = parse_request("erase", {"phone": form, "operator": "o", "reason": "r"})
        assert request is not None and request.phone == "254712345678", errors
    request, errors = parse_request("export", {"phone": "0712345678", "operator": "o"})
    assert request is not None and request.reason is None  # an export may go without a reason
    request, errors = parse_request("erase", {"phone": "07123456", "operator": "o", "reason": "r"})
    assert request is None and "07123456" not in str(errors)
