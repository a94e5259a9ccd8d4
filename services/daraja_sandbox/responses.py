"""Pure builders of the sandbox's synchronous answers, in the byte layouts documented in docs/daraja.md.

Error envelope (§2): {"requestId": "...", "errorCode": "NNN.NNN.NN", "errorMessage": "..."}
Push acknowledgement (§2), token (§1): JSON with ", " / ": " separators as printed there.
Query answer (§4): compact, as in the documented sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """One Daraja error answer: HTTP status, errorCode, errorMessage."""

    status: int
    code: str
    message: str


def invalid_field(name: str) -> Failure:
    # docs/daraja.md §2: "Bad Request - Invalid <Field>" for each payload field.
    return Failure(400, "400.002.02", f"Bad Request - Invalid {name}")


INVALID_PAYLOAD = Failure(400, "400.002.05", "Invalid Request Payload")
OAUTH_INVALID_AUTH = Failure(400, "400.008.01", "Invalid Authentication passed")
OAUTH_INVALID_GRANT = Failure(400, "400.008.02", "Invalid grant type passed")
INVALID_TOKEN = Failure(404, "404.001.03", "Invalid Access Token")
INVALID_AUTH_HEADER = Failure(404, "404.001.04", "Invalid Authentication Header")
NO_API_PRODUCT = Failure(401, "401.003.01",
                         "Error Occurred - Invalid Access Token - Invalid API call as no apiproduct match found")
RESOURCE_NOT_FOUND = Failure(404, "404.001.01", "Resource not found")
METHOD_NOT_ALLOWED = Failure(405, "405.001", "Method Not Allowed")
WRONG_CREDENTIALS = Failure(500, "500.001.1001", "Wrong credentials")
MERCHANT_MISSING = Failure(500, "500.001.1001", "Merchant does not exist")
SUBSCRIBER_LOCKED = Failure(500, "500.001.1001",
                            "Unable to lock subscriber, a transaction is already in process for the current subscriber")
SPIKE_ARREST = Failure(500, "500.003.02", "Error Occurred: Spike Arrest Violation")
# The query's "no answer yet" forms (docs/daraja.md §4).
QUERY_BEING_PROCESSED = Failure(500, "500.001.1001", "The transaction is being processed")
QUERY_PENDING_EMPTY = Failure(500, "500.001.1001", "")
QUERY_UNKNOWN_CHECKOUT = Failure(500, "500.001.1001", "The transaction does not Exist")

ACCEPTED_DESCRIPTION = "Success. Request accepted for processing"
QUERY_ACCEPTED_DESCRIPTION = "The service request has been accepted successfully"
STILL_PROCESSING_DESC = "The transaction is still under processing"


def error_body(request_id: str, failure: Failure) -> bytes:
    return json.dumps({"requestId": request_id, "errorCode": failure.code,
                       "errorMessage": failure.message}).encode()


def token_body(access_token: str, expires_in_s: int) -> bytes:
    # expires_in as a JSON string, as in the v2 documentation and most SDK fixtures (docs/daraja.md §1).
    return json.dumps({"access_token": access_token, "expires_in": str(expires_in_s)}).encode()


def push_accepted_body(merchant_request_id: str, checkout_request_id: str) -> bytes:
    # ResponseCode is the string "0" (docs/daraja.md §2 "Synchronous success response").
    return json.dumps({
        "MerchantRequestID": merchant_request_id,
        "CheckoutRequestID": checkout_request_id,
        "ResponseCode": "0",
        "ResponseDescription": ACCEPTED_DESCRIPTION,
        "CustomerMessage": ACCEPTED_DESCRIPTION,
    }).encode()


def query_answer_body(merchant_request_id: str, checkout_request_id: str, result_code: int | str,
                      result_desc: str) -> bytes:
    # ResultCode is a string in query answers, unlike callbacks (docs/daraja.md §4).
    return json.dumps({
        "ResponseCode": "0",
        "ResponseDescription": QUERY_ACCEPTED_DESCRIPTION,
        "MerchantRequestID": merchant_request_id,
        "CheckoutRequestID": checkout_request_id,
        "ResultCode": str(result_code),
        "ResultDesc": result_desc,
    }, separators=(",", ":")).encode()
