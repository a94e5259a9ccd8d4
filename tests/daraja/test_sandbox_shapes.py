"""The sandbox speaks Daraja's bytes: callbacks, error envelopes, acknowledgements, query answers
and tokens compared byte for byte with the documented and captured samples (docs/daraja.md §1-§4), then
the same shapes checked on the wire."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from services.daraja_sandbox.callbacks import CALLBACK_CONTENT_TYPE, failure_callback, success_callback
from services.daraja_sandbox.responses import (
    INVALID_TOKEN,
    Failure,
    error_body,
    invalid_field,
    push_accepted_body,
    query_answer_body,
    token_body,
)
from tests.daraja.conftest import new_phone, push_request

NAIROBI = ZoneInfo("Africa/Nairobi")

# Real sandbox callbacks as captured by an integrator in 2022 (PatrickNthiwa/Daraja_mpesa_api_C2B,
# CallBackResponse.txt) and in 2026 (https://github.com/Deval123/nkap/blob/main/docs/providers/m-pesa.md):
# compact JSON, "1.00", Balance without Value.
CAPTURED_SUCCESS = (
    b'{"Body":{"stkCallback":{"MerchantRequestID":"11225-96181251-1","CheckoutRequestID":'
    b'"ws_CO_17112022155730304796440427","ResultCode":0,"ResultDesc":"The service request is processed '
    b'successfully.","CallbackMetadata":{"Item":[{"Name":"Amount","Value":1.00},{"Name":"MpesaReceiptNumber",'
    b'"Value":"QKH94M1Z11"},{"Name":"Balance"},{"Name":"TransactionDate","Value":20221117155745},'
    b'{"Name":"PhoneNumber","Value":254796440427}]}}}}')
CAPTURED_CANCEL = (
    b'{"Body":{"stkCallback":{"MerchantRequestID":"68441-128341933-1","CheckoutRequestID":'
    b'"ws_CO_17112022155511840796440427","ResultCode":1032,"ResultDesc":"Request cancelled by user"}}}')
CAPTURED_TIMEOUT_SHAPE = (
    b'{"Body":{"stkCallback":{"MerchantRequestID":"M","CheckoutRequestID":"C","ResultCode":1037,'
    b'"ResultDesc":"No response from user."}}}')


def test_success_callback_is_byte_for_byte_the_captured_one():
    built = success_callback("11225-96181251-1", "ws_CO_17112022155730304796440427", 1, "QKH94M1Z11",
                             "20221117155745", "254796440427", "The service request is processed successfully.")
    assert built == CAPTURED_SUCCESS


def test_a_masked_phone_is_sent_as_a_string_keeping_the_first_five_and_last_three_digits():
    built = success_callback("11225-96181251-1", "ws_CO_1", 1, "QKH94M1Z11", "20221117155748", "254708374149",
                             "The service request is processed successfully.", masked_phone=True)
    items = {i["Name"]: i.get("Value") for i in json.loads(built)["Body"]["stkCallback"]["CallbackMetadata"]["Item"]}
    assert items["PhoneNumber"] == "25470****149" and items["Amount"] == 1.0


def test_failure_callbacks_are_byte_for_byte_the_captured_ones():
    assert failure_callback("68441-128341933-1", "ws_CO_17112022155511840796440427", 1032,
                            "Request cancelled by user") == CAPTURED_CANCEL
    assert failure_callback("M", "C", 1037, "No response from user.") == CAPTURED_TIMEOUT_SHAPE


def test_sfc_ic0003_is_sent_as_a_string():
    assert b'"ResultCode":"SFC_IC0003"' in failure_callback("M", "C", "SFC_IC0003", "The operator does not exist.")


def test_error_envelope_matches_the_documented_layout():
    # docs/daraja.md §2: {"requestId": "...", "errorCode": "NNN.NNN.NN", "errorMessage": "..."}
    assert error_body("b4f2-4bdd-9a99-80eb681f6c623612441", INVALID_TOKEN) == \
        b'{"requestId": "b4f2-4bdd-9a99-80eb681f6c623612441", "errorCode": "404.001.03", ' \
        b'"errorMessage": "Invalid Access Token"}'
    assert error_body("r", invalid_field("Amount")) == \
        b'{"requestId": "r", "errorCode": "400.002.02", "errorMessage": "Bad Request - Invalid Amount"}'
    assert json.loads(error_body("r", Failure(500, "500.001.1001", ""))) == \
        {"requestId": "r", "errorCode": "500.001.1001", "errorMessage": ""}


def test_push_acknowledgement_matches_the_documented_sample():
    documented = (b'{"MerchantRequestID": "2654-4b64-97ff-b827b542881d3130", "CheckoutRequestID": '
                  b'"ws_CO_1007202409152617172396192", "ResponseCode": "0", "ResponseDescription": '
                  b'"Success. Request accepted for processing", "CustomerMessage": '
                  b'"Success. Request accepted for processing"}')
    assert push_accepted_body("2654-4b64-97ff-b827b542881d3130", "ws_CO_1007202409152617172396192") == documented


def test_query_answer_matches_the_documented_sample():
    documented = (b'{"ResponseCode":"0","ResponseDescription":"The service request has been accepted successfully",'
                  b'"MerchantRequestID":"22205-34066-1","CheckoutRequestID":"ws_CO_13012021093521236557",'
                  b'"ResultCode":"0","ResultDesc":"The service request is processed successfully."}')
    assert query_answer_body("22205-34066-1", "ws_CO_13012021093521236557", 0,
                             "The service request is processed successfully.") == documented


def test_token_answer_has_expires_in_as_a_string():
    assert token_body("A" * 28, 3599) == b'{"access_token": "' + b"A" * 28 + b'", "expires_in": "3599"}'


async def test_callback_on_the_wire(client, receiver, app_credentials, paybill):
    """Goal: what the receiver gets is Daraja's callback exactly. Method: push, capture the raw
    request, check path, headers, byte layout and every metadata item."""
    url = receiver.new_url() + "/extra-segment?token=abc"
    phone = new_phone()
    before = datetime.now(NAIROBI).replace(tzinfo=None, microsecond=0)
    accepted = await client.push(app_credentials, paybill, push_request(url, phone=phone, amount=42))
    [callback] = await receiver.wait_for(url)
    assert callback.path.endswith("/extra-segment?token=abc")  # path and query delivered intact (docs/daraja.md §5)
    assert callback.headers["Content-Type"] == CALLBACK_CONTENT_TYPE == "application/json;charset=UTF-8"
    assert callback.headers["BusinessShortCode"] == "174379"
    receipt_found = re.search(rb'"MpesaReceiptNumber","Value":"([A-Z0-9]{10})"', callback.body)
    date_found = re.search(rb'"TransactionDate","Value":(\d{14})', callback.body)
    assert receipt_found is not None and date_found is not None
    receipt, date = receipt_found.group(1).decode(), date_found.group(1).decode()
    assert callback.body == success_callback(accepted.merchant_request_id, accepted.checkout_request_id, 42, receipt,
                                             date, phone, "The service request is processed successfully.")
    assert b'{"Name":"Amount","Value":42.00}' in callback.body and b'{"Name":"Balance"}' in callback.body
    paid_at = datetime.strptime(date, "%Y%m%d%H%M%S")
    assert before - timedelta(seconds=1) <= paid_at <= before + timedelta(seconds=5)  # Nairobi time


async def test_identifiers_have_daraja_shapes(client, receiver, app_credentials, paybill):
    phone = new_phone()
    accepted = await client.push(app_credentials, paybill, push_request(receiver.new_url(), phone=phone))
    # ws_CO_ + DDMMYYYYHHMMSS (Nairobi) + milliseconds + MSISDN without 254 (docs/daraja.md §2, observed)
    match = re.fullmatch(r"ws_CO_(\d{14})\d{3}(\d{9})", accepted.checkout_request_id)
    assert match and match.group(2) == phone[3:]
    stamped = datetime.strptime(match.group(1), "%d%m%Y%H%M%S")
    assert abs(stamped - datetime.now(NAIROBI).replace(tzinfo=None)) < timedelta(seconds=5)
    assert re.fullmatch(r"\d{4,5}-\d{8,10}-1", accepted.merchant_request_id)
