"""On the real stack: hostile bodies posted to a valid callback URL of a real payment are dead-lettered,
change nothing, and payments of every channel keep settling (issue #11: one such body used to stop
the ledger, and with it every merchant's settlement)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from services.common.avro import Codec
from services.common.callback_token import callback_url
from services.common.kafka import new_event_fields
from services.common.topics import CALLBACK_RAW, DEAD_LETTER
from tests.conftest import eventually
from tests.e2e.stack import Stack, running
from tests.e2e.test_pipeline import _in_state, final_state, pay, sandbox_admin, state
from tests.platform.kafka_helpers import end_offsets, read_all

DEEP = b"[" * 30_000 + b"]" * 30_000  # 60,000 bytes: under the gateway's 64 KiB; json.loads recursed on it


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    yield from running(infra, tmp_path_factory.mktemp("e2e-hostile"))


def success_with_amount(checkout_id: str, amount: bytes) -> bytes:
    stk = {"MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": checkout_id, "ResultCode": 0,
           "ResultDesc": "The service request is processed successfully.",
           "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": "AMOUNT"},
                                         {"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"},
                                         {"Name": "TransactionDate", "Value": 20261127102115},
                                         {"Name": "PhoneNumber", "Value": 254711000201}]}}
    return json.dumps({"Body": {"stkCallback": stk}}).encode().replace(b'"AMOUNT"', amount)


def dead_letters_of(stack: Stack, codec: Codec, since: dict[int, int], bodies: list[bytes]) -> list[dict]:
    """The ledger's dead letters since `since` whose callback body is one of `bodies`."""
    def ours(message) -> bool:
        letter = codec.decode(message.value())[1]
        return (letter["consumer_group"] == f"ledger-{stack.unique}" and letter["source_topic"] == CALLBACK_RAW.name
                and codec.decode(letter["original_value"])[1]["body"] in bodies)

    found = read_all(stack.infra["KAFKA_BOOTSTRAP_SERVERS"], DEAD_LETTER.name, ours, expected=len(bodies), since=since)
    return [codec.decode(m.value())[1] for m in found]


async def test_hostile_bodies_on_a_valid_callback_url_are_dead_lettered_and_every_channel_keeps_settling(
        stack, pool, producer, codec):
    a = f"e2e-a-{stack.unique}"
    b = f"e2e-b-{stack.unique}"
    channel_a, channel_b = (a, await stack.onboard(pool, a)), (b, await stack.onboard(pool, b))
    phone_a = "254711000201"
    sandbox_admin(stack, "POST", "scenarios", phone=phone_a, scenario="success", callback_delay_ms=8000)
    payment_a, _ = await pay(stack, channel_a, phone_a)
    pending = await eventually(lambda: _in_state(stack, channel_a, payment_a, "Pending"), timeout=30)
    checkout = pending["mpesa"]["checkoutRequestId"]
    secret = stack.env["WEBHOOK_TOKEN_SECRETS"].split(",")[0].encode()
    url = callback_url(stack.gateway_url, secret, a, payment_a)  # what Daraja got with the push
    hostile = [DEEP, success_with_amount(checkout, b"NaN"), success_with_amount(checkout, b'"sNaN"'),
               success_with_amount(checkout, b"1e999")]
    mark = end_offsets(stack.infra["KAFKA_BOOTSTRAP_SERVERS"], DEAD_LETTER.name)

    async with httpx.AsyncClient(timeout=10) as http:
        answers = [await http.post(url, content=body, headers={"Content-Type": "application/json"})
                   for body in hostile]
    # A gateway that reads the body may refuse it at the door (kept on the rejected topic); what it lets
    # through must be dead-lettered by the ledger. Today it lets every one through.
    assert all(answer.status_code in (200, 400, 413, 422) for answer in answers), [a.status_code for a in answers]
    through = [body for body, answer in zip(hostile, answers, strict=True) if answer.status_code == 200]
    # A producer to the callback topic skips the gateway: the ledger must stand on its own.
    direct = b'{"Body": {"stkCallback": ' + DEEP + b"}}"
    await producer.publish(CALLBACK_RAW, {
        **new_event_fields(a, payment_a), "received_at": new_event_fields(a)["occurred_at"],
        "source_address": "127.0.0.1", "path": "/direct", "path_params": {}, "content_type": "application/json",
        "body": direct, "rejection_reason": None})

    payment_b, _ = await pay(stack, channel_b, "254711000202")
    settled_b = await final_state(stack, channel_b, payment_b, timeout=30)
    assert settled_b["state"] == "Settled", settled_b

    letters = await asyncio.to_thread(dead_letters_of, stack, codec, mark, through + [direct])
    assert sorted(letter["error_type"] for letter in letters) == ["CallbackParseError"] * len(through + [direct])
    assert all(letter["channel_id"] == a for letter in letters)
    # Payment A was not moved by any of them: its genuine callback, 8 s later, settles it.
    shown = await final_state(stack, channel_a, payment_a, timeout=30)
    assert shown["state"] == "Settled" and [h["state"] for h in shown["history"]] == ["Requested", "Pending", "Settled"]
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(f"http://127.0.0.1:{stack.ports['ledger']}/healthz")).status_code == 200
    assert (await state(stack, channel_a, payment_a))["state"] == "Settled"
