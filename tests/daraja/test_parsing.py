"""Pure parsing of Daraja answers: every body shape docs/daraja.md reports, and the classification of
each failure as retryable, permanent or outcome-unknown."""
from __future__ import annotations

import json

import pytest

from services.daraja.errors import DarajaError, ErrorKind
from services.daraja.models import QueryStatus
from services.daraja.parsing import (
    classify_failure,
    parse_push_response,
    parse_query_response,
    parse_token_response,
)
from services.daraja.result_codes import FINAL_FAILURE_CODES
from services.daraja_sandbox.scenarios import FAILURE_CODES

RETRYABLE, PERMANENT, UNKNOWN = ErrorKind.RETRYABLE, ErrorKind.PERMANENT, ErrorKind.OUTCOME_UNKNOWN


def body(value) -> bytes:
    return json.dumps(value).encode()


def error_body(code: str, message: str) -> bytes:
    return body({"requestId": "b4f2-4bdd-9a99-80eb681f6c623612441", "errorCode": code, "errorMessage": message})


@pytest.mark.parametrize("expires_in, seconds", [("3599", 3599), (3599, 3599), (None, 3599), ("soon", 3599), (0, 3599)])
def test_token_expiry_as_string_number_or_nonsense(expires_in, seconds):
    token = parse_token_response(200, body({"access_token": "A" * 28, "expires_in": expires_in}))
    assert (token.value, token.expires_in_s) == ("A" * 28, seconds)


@pytest.mark.parametrize("status, payload, kind", [
    (400, error_body("400.008.01", "Invalid Authentication passed"), PERMANENT),
    (400, error_body("400.008.02", "Invalid grant type passed"), PERMANENT),
    (400, b"", PERMANENT),  # bad credentials sometimes come back with no body at all
    (403, b"<html>Incapsula incident</html>", RETRYABLE),  # WAF burst block (docs/daraja.md §6)
    (200, body({"token_type": "bearer"}), RETRYABLE),
    (503, b"Service Unavailable", RETRYABLE),
])
def test_token_failures(status, payload, kind):
    with pytest.raises(DarajaError) as caught:
        parse_token_response(status, payload)
    assert (caught.value.kind, caught.value.operation) == (kind, "oauth")


@pytest.mark.parametrize("response_code", ["0", 0])
def test_push_acknowledgement_with_string_or_integer_code(response_code):
    accepted = parse_push_response(200, body({
        "MerchantRequestID": "2654-4b64-97ff-b827b542881d3130", "CheckoutRequestID": "ws_CO_1007202409152617172396192",
        "ResponseCode": response_code, "ResponseDescription": "Success. Request accepted for processing",
        "CustomerMessage": "Success. Request accepted for processing"}))
    assert accepted.checkout_request_id == "ws_CO_1007202409152617172396192"
    assert accepted.response_code == "0"
    assert accepted.customer_message == "Success. Request accepted for processing"


@pytest.mark.parametrize("status, payload", [
    (200, b"not json"), (200, b""), (200, body([1, 2])), (200, body({"ResponseCode": "0"})),
    (502, b"<html>Bad Gateway</html>"), (504, b""),
    (500, body({"Envelope": {"Body": {"Fault": {"faultstring": "Execution of ServiceCallout failed"}}}})),
])
def test_push_answers_that_may_hide_an_accepted_push_are_outcome_unknown(status, payload):
    with pytest.raises(DarajaError) as caught:
        parse_push_response(status, payload)
    assert caught.value.kind is UNKNOWN


@pytest.mark.parametrize("code, message, status, kind", [
    ("400.002.02", "Bad Request - Invalid Timestamp", 400, PERMANENT),
    ("400.002.02", "Bad Request - Invalid Amount", 400, PERMANENT),
    ("400.002.05", "Invalid Request Payload", 400, PERMANENT),
    ("401.003.01", "Error Occurred - Invalid Access Token - Invalid API call as no apiproduct match found", 401,
     PERMANENT),
    ("404.001.01", "Resource not found", 404, PERMANENT),
    ("404.001.03", "Invalid Access Token", 404, PERMANENT),
    ("404.001.04", "Invalid Authentication Header", 404, PERMANENT),
    ("405.001", "Method Not Allowed", 405, PERMANENT),
    ("500.001.1001", "Wrong credentials", 500, PERMANENT),
    ("500.001.1001", "[MerchantValidate] - Wrong credentials", 500, PERMANENT),
    ("500.001.1001", "Merchant does not exist", 500, PERMANENT),
    ("500.001.1001", "Unable to lock subscriber, a transaction is already in process for the current subscriber",
     500, RETRYABLE),
    ("500.001.1001", "", 500, RETRYABLE),
    ("500.003.01", "Internal Server Error", 500, RETRYABLE),
    ("500.003.02", "System is busy. Please try again in few minutes", 500, RETRYABLE),
    ("500.003.02", "Error Occurred: Spike Arrest Violation", 500, RETRYABLE),
    ("500.003.03", "Quota Violation", 500, RETRYABLE),
    ("500.009.99", "Something new", 500, RETRYABLE),
    ("400.009.99", "Something new", 400, PERMANENT),
    ("500.003.02", "Spike Arrest Violation", 200, RETRYABLE),  # the code decides, not the status
])
def test_push_error_codes_are_classified_by_code_and_message(code, message, status, kind):
    with pytest.raises(DarajaError) as caught:
        parse_push_response(status, error_body(code, message))
    error = caught.value
    assert (error.kind, error.error_code, error.http_status) == (kind, code, status)
    assert error.request_id == "b4f2-4bdd-9a99-80eb681f6c623612441"


def test_locked_subscriber_says_how_long_to_wait():
    with pytest.raises(DarajaError) as caught:
        parse_push_response(500, error_body("500.001.1001", "Unable to lock subscriber, a transaction is already"
                                                            " in process for the current subscriber"))
    assert caught.value.retry_after_s == 60


def test_apigee_spike_arrest_fault_is_retryable_even_for_a_push():
    fault = {"fault": {"faultstring": "Spike arrest violation. Allowed rate : 10ps",
                       "detail": {"errorcode": "policies.ratelimit.SpikeArrestViolation"}}}
    with pytest.raises(DarajaError) as caught:
        parse_push_response(500, body(fault))
    assert caught.value.kind is RETRYABLE
    assert "Spike arrest" in str(caught.value)


def test_wrong_base_url_is_permanent():
    with pytest.raises(DarajaError) as caught:
        parse_push_response(404, b"<html>Unable to identify proxy for host</html>")
    assert caught.value.kind is PERMANENT
    assert "Unable to identify proxy" in caught.value.reason


def test_empty_error_message_is_named_not_blank():
    error = classify_failure("push", 500, error_body("500.003.01", ""))
    assert "empty errorMessage" in str(error)


def test_long_bodies_are_bounded_and_shortened_once_secrets_are_masked():
    error = classify_failure("push", 404, b"x" * 10_000 + b"SECRET-TOKEN")
    assert len(str(error)) < 2100
    echoed = b"x" * 100 + b"SECRET-TOKEN-VALUE" + b"y" * 100
    shown = classify_failure("push", 404, echoed).redacted(("SECRET-TOKEN-VALUE",))
    assert len(str(shown)) < 300 and "SECRET" not in str(shown) and "****" in str(shown)


@pytest.mark.parametrize("result_code, status", [
    ("0", QueryStatus.FINAL_SUCCESS), (0, QueryStatus.FINAL_SUCCESS),
    ("1032", QueryStatus.FINAL_FAILURE), (1032, QueryStatus.FINAL_FAILURE), ("1037", QueryStatus.FINAL_FAILURE),
    ("SFC_IC0003", QueryStatus.FINAL_FAILURE), ("4999", QueryStatus.STILL_PROCESSING),
    ("7777", QueryStatus.STILL_PROCESSING),  # unknown code: not a verdict (docs/daraja.md §4)
])
def test_query_result_codes(result_code, status):
    result = parse_query_response(200, body({
        "ResponseCode": "0", "ResponseDescription": "The service request has been accepted successfully",
        "MerchantRequestID": "22205-34066-1", "CheckoutRequestID": "ws_CO_13012021093521236557",
        "ResultCode": result_code, "ResultDesc": "some text"}))
    assert (result.status, result.result_code, result.result_desc) == (status, str(result_code), "some text")
    assert result.checkout_request_id == "ws_CO_13012021093521236557"


@pytest.mark.parametrize("status", [500, 200])
@pytest.mark.parametrize("message", ["The transaction is being processed", "", "The transaction does not Exist"])
def test_query_500_001_1001_means_no_answer_yet(status, message):
    result = parse_query_response(status, error_body("500.001.1001", message))
    assert (result.status, result.result_code, result.result_desc) == (QueryStatus.STILL_PROCESSING, None, message)


@pytest.mark.parametrize("code, message, kind", [
    ("500.001.1001", "Wrong credentials", PERMANENT), ("500.003.02", "Spike Arrest Violation", RETRYABLE),
    ("404.001.03", "Invalid Access Token", PERMANENT), ("400.002.02", "Bad Request - Invalid CheckoutRequestID",
                                                        PERMANENT),
])
def test_query_errors_that_are_not_pending(code, message, kind):
    with pytest.raises(DarajaError) as caught:
        parse_query_response(500 if code.startswith("5") else 400, error_body(code, message))
    assert caught.value.kind is kind


@pytest.mark.parametrize("status, payload", [(200, b"<html>"), (502, b""), (200, body({"ResponseCode": "0"}))])
def test_unreadable_query_answers_are_retryable_since_queries_are_idempotent(status, payload):
    with pytest.raises(DarajaError) as caught:
        parse_query_response(status, payload)
    assert caught.value.kind is RETRYABLE


def test_every_failure_code_of_the_sandbox_catalogue_is_final_for_the_client():
    assert {str(code) for code in FAILURE_CODES} == set(FINAL_FAILURE_CODES)


def test_redaction_masks_secrets_in_the_reason():
    error = classify_failure("push", 401, error_body("401.003.01", "Error Occurred - Invalid Access Token - "
                                                                    "BJGFGOXv5aZnw90KkA4TDtu4Xdyf"))
    clean = error.redacted(("BJGFGOXv5aZnw90KkA4TDtu4Xdyf",))
    assert "BJGFGOXv5aZnw90KkA4TDtu4Xdyf" not in str(clean) and "****" in str(clean)
    assert (clean.kind, clean.error_code) == (error.kind, error.error_code)
