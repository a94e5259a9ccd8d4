"""End to end: a success callback must prove itself before anything settles (issue #11).

A forged success posted to a valid callback URL does not settle and is visible to operators; a
genuine success with a masked phone settles; with query confirmation on, a success the query
contradicts goes to Review."""
from __future__ import annotations

import re

import httpx
import pytest

from services.channels.onboarding import Onboarding
from services.channels.vault import public_key_path
from services.common.callback_token import callback_url, parse_secrets
from tests.conftest import eventually
from tests.e2e.stack import Stack, running
from tests.e2e.test_pipeline import _in_state, final_state, pay, sandbox_admin, state


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    yield from running(infra, tmp_path_factory.mktemp("e2e-proof"))


@pytest.fixture(scope="module")
async def channel(stack, pool):
    channel_id = f"proof-{stack.unique}"
    return channel_id, await stack.onboard(pool, channel_id)


@pytest.fixture(scope="module")
async def confirming_channel(stack, pool):
    """A channel whose every success is confirmed by an STK query before Settled."""
    channel_id = f"confirm-{stack.unique}"
    api_key = await stack.onboard(pool, channel_id)
    onboarding = Onboarding(pool, public_key_file=public_key_path(stack.key_file))
    await onboarding.update_channel(channel_id, {"confirmSuccessByQuery": True}, "tests")
    return channel_id, api_key


def contradictions(stack: Stack, kind: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.ports['ledger']}/metrics").text
    found = re.search(rf'^ledger_contradictions_total{{kind="{kind}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_a_forged_success_posted_to_a_valid_callback_url_does_not_settle_and_is_visible(stack, channel):
    phone = "254711000201"
    sandbox_admin(stack, "POST", "scenarios", phone=phone, scenario="success", callback_delay_ms=6000)
    payment_id, _ = await pay(stack, channel, phone)
    pending = await eventually(lambda: _in_state(stack, channel, payment_id, "Pending"))
    before = contradictions(stack, "amount_mismatch")
    # What an attacker who learned the URL (it travels with every push) would send: the real
    # CheckoutRequestID, a receipt of the right form, no amount, no phone.
    checkout_request_id = pending["mpesa"]["checkoutRequestId"]
    forged = {"Body": {"stkCallback": {"MerchantRequestID": "x", "CheckoutRequestID": checkout_request_id,
                                       "ResultCode": 0, "ResultDesc": "The service request is processed successfully.",
                                       "CallbackMetadata": {"Item": [{"Name": "MpesaReceiptNumber",
                                                                      "Value": "QKH94M1Z11"}]}}}}
    secret = parse_secrets(stack.env["WEBHOOK_TOKEN_SECRETS"])[0]
    async with httpx.AsyncClient() as http:
        answer = await http.post(callback_url(stack.gateway_url, secret, channel[0], payment_id), json=forged)
    assert answer.status_code == 200  # the gateway accepts it: only the ledger can judge its proof
    reviewed = await eventually(lambda: _in_state(stack, channel, payment_id, "Review"), timeout=30)
    assert reviewed["mpesa"]["receiptNumber"] is None
    assert "no amount" in reviewed["history"][-1]["reason"]

    async def counted():
        return contradictions(stack, "amount_mismatch") >= before + 1
    await eventually(counted, timeout=10)
    # The genuine callback comes later: a payment under review stays there for an operator.
    await eventually(lambda: _delivered(stack, pending["mpesa"]["checkoutRequestId"]), timeout=30)
    assert (await state(stack, channel, payment_id))["state"] == "Review"


async def test_a_genuine_success_with_a_masked_phone_settles(stack, channel):
    payment_id, _ = await pay(stack, channel, "254700005009")  # the sandbox masks PhoneNumber: "25470****009"
    shown = await final_state(stack, channel, payment_id)
    assert shown["state"] == "Settled" and shown["mpesa"]["receiptNumber"], shown
    assert "STK query" not in shown["history"][-1]["reason"]  # settled on the callback's own proof


async def test_with_query_confirmation_on_a_genuine_success_settles_once_the_query_confirms_it(
        stack, confirming_channel):
    payment_id, _ = await pay(stack, confirming_channel, "254711000202")
    shown = await final_state(stack, confirming_channel, payment_id)
    assert shown["state"] == "Settled" and shown["mpesa"]["receiptNumber"], shown
    assert "confirmed by STK query" in shown["history"][-1]["reason"]


async def test_with_query_confirmation_on_a_success_the_query_contradicts_goes_to_review(stack, confirming_channel):
    before = contradictions(stack, "query_contradicts")
    payment_id, _ = await pay(stack, confirming_channel, "254700005004")  # callback 0 with receipt, query 1032
    shown = await final_state(stack, confirming_channel, payment_id)
    assert shown["state"] == "Review" and shown["mpesa"]["receiptNumber"] is None, shown
    assert "contradicting the success callback" in shown["history"][-1]["reason"]
    assert contradictions(stack, "query_contradicts") >= before + 1


async def _delivered(stack: Stack, checkout_request_id: str):
    pushes = httpx.get(f"{stack.sandbox_url}/sandbox/pushes", params={"CheckoutRequestID": checkout_request_id},
                       headers=stack.sandbox_admin_headers).json()
    return pushes["count"] == 1 and pushes["pushes"][0]["callbacks"]
