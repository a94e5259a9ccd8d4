"""The status topic carries no payer's data (issue 17, "Minimised analytics"), checked over a run
through the real services with every outcome: Settled (by callback and by query), Cancelled, Failed,
Review by a contradicting query and by a late receipt. The payers' numbers are written into order
references, metadata and Daraja's own error text, with CheckoutRequestIDs of Daraja's current form
(which end in the MSISDN); every message of the run is then searched, raw and decoded, for each
payer's number and its 9- and 6-digit tails, and for every CheckoutRequestID the run produced."""
from __future__ import annotations

import random
import uuid

import httpx
import pytest

from services.channels.onboarding import Onboarding
from services.channels.vault import public_key_path
from services.common.pseudonyms import Pseudonyms
from services.common.topics import PAYMENT_STATUS
from tests.conftest import PSEUDONYM_KEY_FILE, eventually
from tests.e2e.stack import Stack, new_reference, running
from tests.e2e.test_pipeline import _in_state, sandbox_admin
from tests.platform.kafka_helpers import end_offsets, read_all

SHARED_KEY = "cart"  # the one metadata key the channels allow-list


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    yield from running(infra, tmp_path_factory.mktemp("e2e-minimised"))


async def _channel(stack: Stack, pool, channel_id: str, **settings) -> tuple[str, str]:
    api_key = await stack.onboard(pool, channel_id)
    onboarding = Onboarding(pool, public_key_file=public_key_path(stack.key_file))
    await onboarding.update_channel(channel_id, {"analyticsMetadataKeys": [SHARED_KEY], **settings}, "tests")
    return channel_id, api_key


def _payer() -> str:
    """A number no sandbox selector reads (not 25470000…): the outcome is chosen by the amount."""
    return f"2547{random.randrange(10_000_000, 100_000_000)}"


def _checkout_request_id_of(phone: str) -> str:
    return f"ws_CO_30112026101500123{phone[3:]}"  # Daraja's current form: time, millis, MSISDN without 254


async def _pay(stack: Stack, channel, phone: str, amount: int) -> str:
    """A payment whose free texts hold the payer's number in several forms, and an id ending in it."""
    channel_id, api_key = channel
    local = "0" + phone[3:]
    body = {"channelId": channel_id, "amount": amount, "phone": phone, "accountReference": new_reference(),
            "orderReference": f"call {local} re {_checkout_request_id_of(phone)}",
            "metadata": {SHARED_KEY: f"+254 {phone[3:6]} {phone[6:9]} {phone[9:]}",
                         "note": f"payer {phone}", "checkout": _checkout_request_id_of(phone)}}
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{stack.ingress_url}/api/payments", json=body, headers={
            "Authorization": f"Bearer {api_key}", "Idempotency-Key": str(uuid.uuid4())})
    assert response.status_code == 202, response.text
    return response.json()["paymentId"]


def _traces(phone: str) -> list[str]:
    """What may not be seen of a payer: the number, and its tails of 9 and 6 digits."""
    return [phone, phone[3:], phone[-6:]]


async def test_no_status_message_of_a_run_with_every_outcome_holds_a_payers_number_or_a_checkout_id(
        stack, pool, kafka_bootstrap, codec):
    plain = await _channel(stack, pool, f"min-{stack.unique}")
    confirming = await _channel(stack, pool, f"minq-{stack.unique}", confirmSuccessByQuery=True)
    mark = end_offsets(kafka_bootstrap, PAYMENT_STATUS.name)
    payers: dict[str, str] = {}  # payment_id -> phone
    expected: dict[str, tuple[tuple[str, str], str]] = {}  # payment_id -> (channel, final state)

    # Failed first, alone: the fault applies to the next push, whoever sends it; Daraja's error text
    # quotes the payer's number.
    failed_phone = _payer()
    sandbox_admin(stack, "POST", "faults", operation="push", status=400, remaining=1, body=(
        '{"requestId":"r-1","errorCode":"400.002.02","errorMessage":"Bad Request - Invalid PhoneNumber '
        f'{failed_phone}"}}'))
    failed = await _pay(stack, plain, failed_phone, 10)
    payers[failed], expected[failed] = failed_phone, (plain, "Failed")
    await eventually(lambda: _in_state(stack, plain, failed, "Failed"), timeout=60)  # before the next push
    # The rest by the sandbox's amount selectors (90000 + selector): success, cancelled, a lost callback
    # (Settled by query), a receipt after the query said cancelled (Review), a masked callback phone, and
    # on the confirming channel a success the query contradicts (Review) and one it confirms.
    for channel, amount, outcome in [(plain, 10, "Settled"), (plain, 91032, "Cancelled"), (plain, 95001, "Settled"),
                                     (plain, 95008, "Review"), (plain, 95009, "Settled"),
                                     (confirming, 95004, "Review"), (confirming, 10, "Settled")]:
        phone = _payer()
        payment_id = await _pay(stack, channel, phone, amount)
        payers[payment_id], expected[payment_id] = phone, (channel, outcome)

    checkout_ids, transitions = set(), 0
    for payment_id, (channel, outcome) in expected.items():
        shown = await eventually(lambda c=channel, p=payment_id, o=outcome: _in_state(stack, c, p, o), timeout=60)
        transitions += len(shown["history"])
        if shown["mpesa"].get("checkoutRequestId"):
            checkout_ids.add(shown["mpesa"]["checkoutRequestId"])
    # The sandbox gives ids of Daraja's current form: each ends in its payer's number.
    assert len(checkout_ids) == len(payers) - 1  # all but the refused push
    assert all(any(c.endswith(p[3:]) for p in payers.values()) for c in checkout_ids)

    keys = {plain[0].encode(), confirming[0].encode()}
    messages = read_all(kafka_bootstrap, PAYMENT_STATUS.name, lambda m: m.key() in keys, expected=transitions,
                        since=mark)
    assert len(messages) >= transitions
    pseudonyms = Pseudonyms.from_file(PSEUDONYM_KEY_FILE)
    for message in messages:
        raw = message.value()
        record = codec.decode(raw)[1]
        decoded = repr(record)
        for phone in payers.values():
            for trace in _traces(phone):
                assert trace.encode() not in raw and trace not in decoded, (trace, record)
        for checkout in checkout_ids | {_checkout_request_id_of(p) for p in payers.values()}:
            assert checkout.encode() not in raw and checkout not in decoded, (checkout, record)
        assert record["checkout_request_id"] is None
        assert set(record["metadata"]) <= {SHARED_KEY}, record["metadata"]
        assert record["phone_masked"] == "*********" + payers[record["payment_id"]][-3:]
        assert record["reason"] is None or len(record["reason"]) <= 200
    # Analytics can still join a payment's events on the pseudonym of its CheckoutRequestID.
    refs = {r["checkout_ref"] for r in (codec.decode(m.value())[1] for m in messages) if r["checkout_ref"]}
    assert refs and refs <= {pseudonyms.checkout(c) for c in checkout_ids}
