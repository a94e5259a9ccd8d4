"""End to end on the real broker, database and Daraja simulator: from a POST to Settled/Cancelled."""
from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from tests.conftest import eventually
from tests.e2e.stack import Stack, new_reference, running


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    yield from running(infra, tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="module")
async def channel(stack, pool):
    channel_id = f"e2e-{stack.unique}"
    return channel_id, await stack.onboard(pool, channel_id)


async def pay(stack: Stack, channel, phone: str, amount: int = 10, reference: str | None = None) -> tuple[str, str]:
    channel_id, api_key = channel
    reference = reference or new_reference()
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{stack.ingress_url}/api/payments", headers={
            "Authorization": f"Bearer {api_key}", "Idempotency-Key": str(uuid.uuid4())}, json={
            "channelId": channel_id, "amount": amount, "phone": phone, "accountReference": reference})
    assert response.status_code == 202, response.text
    return response.json()["paymentId"], reference


async def state(stack: Stack, channel, payment_id: str) -> dict:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{stack.ingress_url}/api/payments/{payment_id}",
                                  headers={"Authorization": f"Bearer {channel[1]}"})
    return response.json() if response.status_code == 200 else {}


async def final_state(stack, channel, payment_id, timeout=30) -> dict:
    async def final():
        s = await state(stack, channel, payment_id)
        return s if s.get("state") in ("Settled", "Cancelled", "Failed", "Review") else None
    return await eventually(final, timeout=timeout, interval=0.2)


def pushes(stack: Stack, reference: str) -> int:
    return httpx.get(f"{stack.sandbox_url}/sandbox/pushes", params={"AccountReference": reference},
                     headers=stack.sandbox_admin_headers).json()["count"]


async def test_a_paid_request_settles_with_its_receipt(stack, channel):
    payment_id, reference = await pay(stack, channel, "254700000000")
    shown = await final_state(stack, channel, payment_id)
    assert shown["state"] == "Settled", shown
    assert shown["mpesa"]["receiptNumber"] and shown["mpesa"]["checkoutRequestId"]
    # The callback may overtake the push result (another topic); Pending is then skipped.
    assert [h["state"] for h in shown["history"]] in (["Requested", "Pending", "Settled"], ["Requested", "Settled"])
    assert pushes(stack, reference) == 1


@pytest.mark.parametrize("selector, code", [("1032", "1032"), ("0001", "1"), ("1037", "1037"), ("5006", "SFC_IC0003")])
async def test_failed_callbacks_cancel_with_their_code(stack, channel, selector, code):
    payment_id, _ = await pay(stack, channel, f"25470000{selector}")
    shown = await final_state(stack, channel, payment_id)
    assert (shown["state"], shown["mpesa"]["resultCode"]) == ("Cancelled", code), shown


async def test_a_duplicated_callback_changes_nothing(stack, channel, pool):
    payment_id, reference = await pay(stack, channel, "254700005002")  # the sandbox sends the callback twice
    shown = await final_state(stack, channel, payment_id)
    # "Nothing changed" means something only once the second callback has been delivered and judged.
    assert await eventually(lambda: _callbacks_delivered(stack, reference)) == [200, 200]
    await eventually(lambda: _judged_duplicate(pool, payment_id))
    again = await state(stack, channel, payment_id)
    assert shown["state"] == again["state"] == "Settled"
    assert again["history"] == shown["history"] and [h["state"] for h in again["history"]].count("Settled") == 1


async def test_many_payments_each_pushed_exactly_once(stack, channel):
    paid = await asyncio.gather(*(pay(stack, channel, f"254711{i:06d}") for i in range(20)))
    finals = await asyncio.gather(*(final_state(stack, channel, pid, timeout=60) for pid, _ in paid))
    assert {f["state"] for f in finals} == {"Settled"}
    assert [pushes(stack, ref) for _, ref in paid] == [1] * 20


async def _callbacks_delivered(stack: Stack, reference: str) -> list | None:
    """The sandbox's delivery results for the push of `reference`, once both callbacks are over."""
    [push] = httpx.get(f"{stack.sandbox_url}/sandbox/pushes", params={"AccountReference": reference},
                       headers=stack.sandbox_admin_headers).json()["pushes"]
    return push["callbacks"] if len(push["callbacks"]) >= 2 else None


async def _judged_duplicate(pool, payment_id: str) -> bool:
    """Whether the ledger has recorded a duplicate fact for the payment in its audit trail."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM audit_log WHERE payment_id = %s AND verdict = 'duplicate'",
                                 (payment_id,))
        return (await cur.fetchone())[0] > 0


def sandbox_admin(stack: Stack, method: str, path: str, **body):
    response = httpx.request(method, f"{stack.sandbox_url}/sandbox/{path}", json=body or None,
                             headers=stack.sandbox_admin_headers)
    assert response.status_code < 300, response.text
    return response.json()


def accepted_pushes(stack: Stack, reference: str) -> int:
    return httpx.get(f"{stack.sandbox_url}/sandbox/pushes", headers=stack.sandbox_admin_headers,
                     params={"AccountReference": reference, "status": "accepted"}).json()["count"]


async def test_a_synchronous_refusal_fails_the_payment_with_its_reason(stack, channel):
    sandbox_admin(stack, "POST", "faults", operation="push", status=400, remaining=1, body=(
        '{"requestId":"r-1","errorCode":"400.002.02","errorMessage":"Bad Request - Invalid PhoneNumber"}'))
    payment_id, reference = await pay(stack, channel, "254711000100")
    shown = await final_state(stack, channel, payment_id)
    assert (shown["state"], shown["mpesa"]["resultCode"]) == ("Failed", "400.002.02"), shown
    assert "Invalid PhoneNumber" in shown["history"][-1]["reason"]
    assert accepted_pushes(stack, reference) == 0


async def test_retryable_errors_recover_with_one_accepted_push(stack, channel):
    sandbox_admin(stack, "POST", "faults", operation="push", status=500, remaining=2, body=(
        '{"requestId":"r-2","errorCode":"500.003.02","errorMessage":"Error Occurred: Spike Arrest Violation"}'))
    payment_id, reference = await pay(stack, channel, "254711000101")
    shown = await final_state(stack, channel, payment_id)
    assert shown["state"] == "Settled", shown
    assert accepted_pushes(stack, reference) == 1


async def test_a_lost_callback_is_recovered_by_query(stack, channel):
    payment_id, reference = await pay(stack, channel, "254700005001")  # the sandbox never calls back
    shown = await final_state(stack, channel, payment_id)
    assert shown["state"] == "Settled" and "STK query" in shown["history"][-1]["reason"], shown
    assert accepted_pushes(stack, reference) == 1


async def test_a_success_after_the_query_said_cancelled_goes_to_review(stack, channel):
    payment_id, _ = await pay(stack, channel, "254700005008")
    reviewed = await eventually(lambda: _in_state(stack, channel, payment_id, "Review"), timeout=30)
    # The query answered first (1032), then the callback proved the money moved.
    assert [h["state"] for h in reviewed["history"]][-2:] == ["Cancelled", "Review"]
    assert "money moved" in reviewed["history"][-1]["reason"]


async def test_a_forged_callback_changes_nothing(stack, channel):
    phone = "254711000103"
    sandbox_admin(stack, "POST", "scenarios", phone=phone, scenario="success", callback_delay_ms=3000)
    payment_id, _ = await pay(stack, channel, phone)
    pending = await eventually(lambda: _in_state(stack, channel, payment_id, "Pending"))
    forged = {"Body": {"stkCallback": {"MerchantRequestID": "x", "CheckoutRequestID":
                                       pending["mpesa"]["checkoutRequestId"], "ResultCode": 1032,
                                       "ResultDesc": "Request cancelled by user"}}}
    async with httpx.AsyncClient() as http:
        for path in (f"/api/webhooks/mpesa/{channel[0]}", f"/api/webhooks/mpesa/{channel[0]}/{payment_id}/forged"):
            answer = await http.post(stack.gateway_url + path, json=forged)
            assert answer.status_code in (401, 403)
    assert (await final_state(stack, channel, payment_id))["state"] == "Settled"


async def test_a_suspended_channel_gets_no_push(stack, channel, pool):
    from services.channels.onboarding import Onboarding
    from services.channels.vault import public_key_path
    channel_id = f"susp-{stack.unique}"
    api_key = await stack.onboard(pool, channel_id)
    await Onboarding(pool, public_key_file=public_key_path(stack.key_file)).suspend(channel_id, "tests")
    reference = new_reference()
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{stack.ingress_url}/api/payments", headers={
            "Authorization": f"Bearer {api_key}", "Idempotency-Key": str(uuid.uuid4())}, json={
            "channelId": channel_id, "amount": 10, "phone": "254711000104", "accountReference": reference})
    assert response.status_code in (403, 409, 422), response.text
    assert pushes(stack, reference) == 0


async def _in_state(stack, channel, payment_id, wanted):
    s = await state(stack, channel, payment_id)
    return s if s.get("state") == wanted else None
