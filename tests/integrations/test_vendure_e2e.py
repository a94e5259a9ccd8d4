"""End to end with a Vendure shop: orders placed through Vendure's Shop API, paid by the mpesa-stk
handler of the plugin in integrations/vendure, reach the whole pipeline (ingress, STK worker, Daraja
sandbox, ledger, notifier) and come back as signed status webhooks that settle or decline the
Vendure payment. What the tests look at is what Vendure's own GraphQL APIs say."""
from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from services.channels.onboarding import Onboarding
from services.channels.vault import public_key_path
from services.channels.webhooks import WebhookManagement
from services.notifier.destinations import DestinationPolicy, parse_networks
from tests.conftest import eventually, free_port
from tests.e2e.stack import running
from tests.e2e.test_pipeline import pushes, state
from tests.integrations.vendure import (
    DEFAULT_CHANNEL,
    GraphQL,
    VendureServer,
    add_payment,
    admin_login,
    admin_order,
    build,
    checkout,
    drop_schema,
    empty_schema,
)

SECOND_CHANNEL = "duka-2"   # a second Vendure channel (token duka-2-token), on a pipeline channel of its own
# A third, on a pipeline channel that confirms every success by an STK query: with the sandbox's
# CONTRADICTED phone (callback 0 with a receipt, query 1032) the pipeline puts the payment in Review.
CONFIRMING_CHANNEL = "duka-3"
CONTRADICTED = "254700005004"
SETTLES = "254700000000"    # the sandbox settles this phone's pushes
# Settled too (the sandbox's default scenario). A second phone: with two pushes to one phone
# outstanding at once, the second went Pending a minute after the first (cause not yet looked into).
SETTLES_TOO = "254711000777"
CANCELS = "254700001032"    # and cancels this one's (ResultCode 1032, the customer cancelled)
SETTLES_LATER = "254700005005"  # and settles this one's 5 s after the push
SCHEMA = "vendure_e2e"      # the shop's tables, in the tests' database
POLLING_SCHEMA = "vendure_e2e_polling"  # the polling shop's


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    yield from running(infra, tmp_path_factory.mktemp("e2e-vendure"), with_notifier=True)


@pytest.fixture(scope="module")
async def vendure(stack, pool, onboarding_pool):
    """A pipeline channel with a webhook endpoint at a Vendure test server whose default channel
    pays through it (its API key and signing secret in the server's environment, as in production).
    The shop's tables are in PostgreSQL, as a real shop's are (its row locks are what the webhook
    controller relies on across server instances)."""
    build()
    database = await empty_schema(pool, SCHEMA)
    management = WebhookManagement(onboarding_pool, public_key_file=public_key_path(stack.webhooks_key_file),
                                   policy=DestinationPolicy(parse_networks("127.0.0.0/8")))
    port = free_port()
    channels = {}
    onboarding = Onboarding(pool, public_key_file=public_key_path(stack.key_file))
    for code in (DEFAULT_CHANNEL, SECOND_CHANNEL, CONFIRMING_CHANNEL):
        pipeline_channel = f"e2e-vendure-{code.strip('_')[:6]}-{stack.unique}"
        api_key = await stack.onboard(pool, pipeline_channel)
        if code == CONFIRMING_CHANNEL:
            await onboarding.update_channel(pipeline_channel, {"confirmSuccessByQuery": True}, "tests")
        _, secret = await management.add_endpoint(
            pipeline_channel, {"url": f"http://127.0.0.1:{port}/mpesa-pipeline/webhooks/{code}"}, "tests")
        channels[code] = (pipeline_channel, api_key, secret)
    server = VendureServer(port, ingress_url=stack.ingress_url, channels=channels, database=database, schema=SCHEMA)
    yield server
    print("----- vendure\n" + server.stop()[-4000:])
    await drop_schema(pool, SCHEMA)


@pytest.fixture(scope="module")
def vendure_too(stack, vendure):
    """A second server instance of the same shop: same tables, same configuration, its own process,
    and under load: each read of payments takes it 50 ms longer (see the test below)."""
    server = VendureServer(free_port(), ingress_url=stack.ingress_url, channels=vendure.channels,
                           database=vendure.database, schema=vendure.schema, shared=True,
                           slow_payment_reads_ms=50)
    yield server
    print("----- vendure (second instance)\n" + server.stop()[-4000:])


async def paid_order(admin: GraphQL, code: str, state: str) -> dict:
    async def reached():
        order = await admin_order(admin, code)
        return order if order["state"] == state else None
    return await eventually(reached, timeout=60, interval=0.3)


async def test_an_order_paid_with_a_phone_the_sandbox_settles_ends_paid(vendure):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    placed = await add_payment(shop, SETTLES)
    [payment] = placed["payments"]
    assert payment["state"] == "Pending" and payment["transactionId"], placed
    assert payment["metadata"] == {"public": {"mpesaStatus": "Pending"}}  # the Shop API shows only this part

    admin = await admin_login(vendure.url)
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    [settled] = paid["payments"]
    assert settled["state"] == "Settled" and settled["transactionId"] == payment["transactionId"]
    assert settled["metadata"]["settledByPipeline"] is True and settled["metadata"]["mpesaReceipt"]
    assert paid["active"] is False and paid["totalWithTax"] == 10000
    seen = (await shop("query($c: String!) { orderByCode(code: $c) { state payments { state metadata } } }",
                       c=order["code"]))["orderByCode"]
    assert seen["state"] == "PaymentSettled"
    assert seen["payments"][0]["metadata"]["public"]["mpesaStatus"] == "Settled"


async def test_a_cancelled_prompt_declines_the_payment_and_the_order_can_pay_again(vendure):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    first = (await add_payment(shop, CANCELS))["payments"][0]
    assert first["state"] == "Pending"

    admin = await admin_login(vendure.url)

    async def declined():
        o = await admin_order(admin, order["code"])
        return o if o["payments"][0]["state"] == "Declined" else None
    after = await eventually(declined, timeout=60, interval=0.3)
    assert after["state"] == "ArrangingPayment" and after["active"] is True
    assert after["payments"][0]["errorMessage"], after  # the pipeline's reason

    # A new attempt is a new pipeline payment (a new idempotency key), not the cancelled one again.
    again = await add_payment(shop, SETTLES)
    second = [p for p in again["payments"] if p["id"] != first["id"]][0]
    assert second["state"] == "Pending" and second["transactionId"] != first["transactionId"]
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    assert sorted(p["state"] for p in paid["payments"]) == ["Declined", "Settled"]


async def test_an_order_total_with_cents_is_declined_without_asking_the_pipeline(vendure):
    shop = GraphQL(f"{vendure.url}/shop-api")
    await checkout(shop, variant_id="T_2")  # 99.50
    refused = await add_payment(shop, SETTLES)
    assert refused["errorCode"] == "PAYMENT_DECLINED_ERROR", refused
    assert "whole shillings" in refused["paymentErrorMessage"] and "99.50" in refused["paymentErrorMessage"]


def signed(secret: str, event_type: str, payment_id: str, channel_id: str, **data) -> tuple[dict, bytes]:
    """A status webhook as the notifier would send it (docs/webhooks.md §1), signed with `secret`; the
    amount is the KES 100 of the test orders unless given."""
    webhook_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    body = json.dumps({"type": event_type, "timestamp": now.isoformat(), "data": {
        "eventId": webhook_id, "paymentId": payment_id, "channelId": channel_id, "state": data.pop("state"),
        "amount": 100, "currency": "KES", "mpesaReceipt": None, "reason": None, **data}}).encode()
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": Webhook(secret).sign(webhook_id, now, body.decode()),
               "content-type": "application/json"}
    return headers, body


async def payment_transitions(admin: GraphQL, code: str) -> list[str]:
    order = await admin_order(admin, code)
    data = await admin("query($id: ID!) { order(id: $id) { history(options: {take: 100}) { items { type data } } } }",
                       id=order["id"])
    return [i["data"]["to"] for i in data["order"]["history"]["items"] if i["type"] == "ORDER_PAYMENT_TRANSITION"]


async def test_a_webhook_with_a_bad_signature_is_refused_and_changes_nothing(vendure):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    payment = (await add_payment(shop, SETTLES))["payments"][0]
    forged = "whsec_" + "A" * 43 + "="  # well formed, not the endpoint's
    headers, body = signed(forged, "payment.cancelled", payment["transactionId"], vendure.pipeline_channel,
                           state="Cancelled", reason="forged")
    async with httpx.AsyncClient(timeout=10) as http:
        refused = await http.post(vendure.webhook_url(), content=body, headers=headers)
        unsigned = await http.post(vendure.webhook_url(), content=body,
                                   headers={"content-type": "application/json"})
    assert (refused.status_code, unsigned.status_code) == (400, 400)
    # Had the forged cancel been believed, the payment would be Declined and the real settle refused.
    admin = await admin_login(vendure.url)
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    assert [p["state"] for p in paid["payments"]] == ["Settled"] and not paid["payments"][0]["errorMessage"]
    assert "Declined" not in await payment_transitions(admin, order["code"])


async def test_the_same_settled_webhook_delivered_at_once_settles_once(vendure, pool):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    payment = (await add_payment(shop, SETTLES))["payments"][0]
    assert payment["state"] == "Pending"
    # Sent while the payment is still Pending (the sandbox answers after 300 ms, the notifier after that).
    headers, body = signed(vendure.webhook_secret, "payment.settled", payment["transactionId"],
                           vendure.pipeline_channel, state="Settled", mpesaReceipt="TST0RACE01")
    async with httpx.AsyncClient(timeout=30) as http:
        answers = await asyncio.gather(*(http.post(vendure.webhook_url(), content=body, headers=headers)
                                         for _ in range(6)))
    assert [a.status_code for a in answers] == [204] * 6
    admin = await admin_login(vendure.url)
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    assert [p["state"] for p in paid["payments"]] == ["Settled"]

    async def pipeline_delivered():  # the notifier's own payment.settled arrives too: a third duplicate
        async with pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT state FROM webhook_deliveries WHERE payment_id = %s AND event_type = 'payment.settled'",
                (payment["transactionId"],))).fetchone()
        return row is not None and row[0] == "delivered"
    await eventually(pipeline_delivered, timeout=60, interval=0.3)
    assert (await payment_transitions(admin, order["code"])).count("Settled") == 1


async def order_transitions(admin: GraphQL, code: str) -> list[str]:
    order = await admin_order(admin, code)
    data = await admin("query($id: ID!) { order(id: $id) { history(options: {take: 100}) { items { type data } } } }",
                       id=order["id"])
    return [i["data"]["to"] for i in data["order"]["history"]["items"] if i["type"] == "ORDER_STATE_TRANSITION"]


async def post_after(delay_s: float, http: httpx.AsyncClient, url: str, body: bytes, headers: dict) -> int:
    await asyncio.sleep(delay_s)
    return (await http.post(url, content=body, headers=headers)).status_code


async def test_one_settled_webhook_delivered_to_two_server_instances_settles_once(vendure, vendure_too):
    # Each instance handles a payment's webhooks one at a time in its own process; across instances
    # only the database's row lock keeps the later one from acting on a Pending it read before the
    # earlier one committed. Without the lock the slow instance, having read Pending just before the
    # other's commit, saved the payment back as Pending and settled it again; its 50 ms of slowness
    # after each read makes that window wide enough that some of these gaps fall into it.
    admin = await admin_login(vendure_too.url)
    for gap_ms in range(0, 160, 10):
        shop = GraphQL(f"{vendure.url}/shop-api")
        order = await checkout(shop)
        payment = (await add_payment(shop, SETTLES))["payments"][0]
        assert payment["state"] == "Pending"
        headers, body = signed(vendure.webhook_secret, "payment.settled", payment["transactionId"],
                               vendure.pipeline_channel, state="Settled", mpesaReceipt="TST0RACE02")
        async with httpx.AsyncClient(timeout=30) as http:
            answers = await asyncio.gather(
                *(post_after(0, http, vendure.webhook_url(), body, headers) for _ in range(3)),
                *(post_after(gap_ms / 1000, http, vendure_too.webhook_url(), body, headers) for _ in range(3)))
        assert answers == [204] * 6, (gap_ms, answers)
        paid = await paid_order(admin, order["code"], "PaymentSettled")
        assert [p["state"] for p in paid["payments"]] == ["Settled"], gap_ms
        assert (await payment_transitions(admin, order["code"])).count("Settled") == 1, gap_ms
        assert (await order_transitions(admin, order["code"])).count("PaymentSettled") == 1, gap_ms


async def test_a_checkout_retried_at_once_prompts_the_customer_once(stack, vendure):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    # Two tabs (or a double click) pay the same order at once, then the storefront retries.
    answers = [*await asyncio.gather(add_payment(shop, SETTLES), add_payment(shop, SETTLES)),
               await add_payment(shop, SETTLES)]
    assert any("payments" in a for a in answers), answers
    assert "already waiting" in answers[2]["paymentErrorMessage"], answers[2]

    admin = await admin_login(vendure.url)
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    assert [p["state"] for p in paid["payments"]].count("Settled") == 1, paid["payments"]
    # Both tabs may have got a Pending payment (the same pipeline payment: the same idempotency
    # key); only one of them carries the money, the other is declined as its duplicate.
    assert len({p["transactionId"] for p in paid["payments"] if p["transactionId"]}) == 1
    assert pushes(stack, account_reference(order["code"])) == 1  # the sandbox's record: one prompt


def account_reference(order_code: str) -> str:
    """As src/handler.ts's accountReference: Daraja's 12 characters, the order code's last."""
    return "".join(c for c in order_code if c.isascii() and (c.isalnum() or c in " -"))[-12:]


async def test_two_vendure_channels_keep_their_payments_and_webhooks_apart(stack, vendure):
    first, second = GraphQL(f"{vendure.url}/shop-api"), GraphQL(f"{vendure.url}/shop-api", f"{SECOND_CHANNEL}-token")
    orders = [await checkout(first), await checkout(second)]
    payments = [(await add_payment(shop, phone))["payments"][0]
                for shop, phone in ((first, SETTLES), (second, SETTLES_TOO))]
    # Each pipeline payment belongs to its Vendure channel's pipeline channel, asked with that key.
    for code, payment in zip((DEFAULT_CHANNEL, SECOND_CHANNEL), payments, strict=True):
        pipeline_channel, api_key, _ = vendure.channels[code]
        assert (await state(stack, (pipeline_channel, api_key), payment["transactionId"]))["channelId"] \
            == pipeline_channel
    # The first channel's webhook at the second's URL: the second's secret does not verify it, and
    # signed with the second's secret it names a pipeline channel the second does not use.
    a_channel, _, a_secret = vendure.channels[DEFAULT_CHANNEL]
    b_secret = vendure.channels[SECOND_CHANNEL][2]
    async with httpx.AsyncClient(timeout=10) as http:
        answers = []
        for secret in (a_secret, b_secret):
            headers, body = signed(secret, "payment.cancelled", payments[0]["transactionId"], a_channel,
                                   state="Cancelled", reason="crossed")
            answers.append((await http.post(vendure.webhook_url(SECOND_CHANNEL), content=body, headers=headers))
                           .status_code)
    assert answers == [400, 422]
    admin = await admin_login(vendure.url)
    for order, token in zip(orders, (None, f"{SECOND_CHANNEL}-token"), strict=True):
        if token:
            admin.headers["vendure-token"] = token
        paid = await paid_order(admin, order["code"], "PaymentSettled")
        assert [p["state"] for p in paid["payments"]] == ["Settled"]


async def test_one_channels_secret_moves_no_payment_of_another_channel(vendure):
    """Every order is in the default channel too, and the second channel's payment method also is,
    under the same code: the default channel's secret must still not reach the second's payments."""
    second = GraphQL(f"{vendure.url}/shop-api", f"{SECOND_CHANNEL}-token")
    order = await checkout(second)
    payment = (await add_payment(second, SETTLES_LATER))["payments"][0]
    a_channel, _, a_secret = vendure.channels[DEFAULT_CHANNEL]
    b_channel = vendure.channels[SECOND_CHANNEL][0]
    async with httpx.AsyncClient(timeout=10) as http:
        answers = []
        for channel_id in (a_channel, b_channel):  # naming its own pipeline channel, or the payment's
            headers, body = signed(a_secret, "payment.settled", payment["transactionId"], channel_id,
                                   state="Settled", mpesaReceipt="TST0CROSS1")
            answers.append((await http.post(vendure.webhook_url(), content=body, headers=headers)).status_code)
    assert answers == [404, 404]
    admin = await admin_login(vendure.url)
    admin.headers["vendure-token"] = f"{SECOND_CHANNEL}-token"
    paid = await paid_order(admin, order["code"], "PaymentSettled")  # by the pipeline's own webhook
    assert paid["payments"][0]["metadata"]["mpesaReceipt"] != "TST0CROSS1"


async def test_a_settled_webhook_for_a_declined_payment_flags_it_and_settles_nothing(vendure):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    payment = (await add_payment(shop, CANCELS))["payments"][0]
    admin = await admin_login(vendure.url)

    async def declined():
        o = await admin_order(admin, order["code"])
        return o if o["payments"][0]["state"] == "Declined" else None
    await eventually(declined, timeout=60, interval=0.3)
    headers, body = signed(vendure.webhook_secret, "payment.settled", payment["transactionId"],
                           vendure.pipeline_channel, state="Settled", mpesaReceipt="TST0LATE01")
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(vendure.webhook_url(), content=body, headers=headers)).status_code == 204
    after = await admin_order(admin, order["code"])
    assert after["state"] == "ArrangingPayment" and after["payments"][0]["state"] == "Declined"
    assert after["payments"][0]["metadata"]["needsReview"] is True
    assert after["payments"][0]["metadata"]["mpesaReceipt"] == "TST0LATE01"


async def test_a_checkout_retried_after_a_crash_finds_the_same_pipeline_payment(stack, vendure):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    # What the handler sent before the Vendure server died, its payment never saved: the same
    # request with the key of the order's first attempt.
    pipeline_channel, api_key, _ = vendure.channels[DEFAULT_CHANNEL]
    async with httpx.AsyncClient(timeout=10) as http:
        first = await http.post(f"{stack.ingress_url}/api/payments", headers={
            "Authorization": f"Bearer {api_key}", "Idempotency-Key": f"vendure:{order['code']}:1"}, json={
            "channelId": pipeline_channel, "amount": 100, "phone": SETTLES,
            "accountReference": account_reference(order["code"]), "orderReference": order["code"]})
    assert first.status_code == 202, first.text

    payment = (await add_payment(shop, SETTLES))["payments"][0]
    assert payment["transactionId"] == first.json()["paymentId"]
    admin = await admin_login(vendure.url)
    await paid_order(admin, order["code"], "PaymentSettled")
    assert pushes(stack, account_reference(order["code"])) == 1


async def test_a_payment_the_pipeline_puts_in_review_stays_pending_flagged_until_the_pipeline_settles_it(
        stack, vendure):
    shop = GraphQL(f"{vendure.url}/shop-api", f"{CONFIRMING_CHANNEL}-token")
    order = await checkout(shop)
    payment = (await add_payment(shop, CONTRADICTED))["payments"][0]
    assert payment["state"] == "Pending"
    admin = await admin_login(vendure.url)
    admin.headers["vendure-token"] = f"{CONFIRMING_CHANNEL}-token"

    async def flagged():
        o = await admin_order(admin, order["code"])
        return o if o["payments"][0]["metadata"].get("needsReview") else None
    after = await eventually(flagged, timeout=60, interval=0.3)
    pipeline_channel, api_key, secret = vendure.channels[CONFIRMING_CHANNEL]
    assert (await state(stack, (pipeline_channel, api_key), payment["transactionId"]))["state"] == "Review"
    [reviewed] = after["payments"]
    assert reviewed["state"] == "Pending" and after["state"] == "ArrangingPayment", after
    assert "contradicting the success callback" in reviewed["metadata"]["reviewReason"]
    assert "settledByPipeline" not in reviewed["metadata"]
    assert "Settled" not in await payment_transitions(admin, order["code"])
    seen = (await shop("{ activeOrder { code state payments { state metadata } } }"))["activeOrder"]
    assert seen["code"] == order["code"] and seen["state"] == "ArrangingPayment"
    assert seen["payments"][0]["metadata"] == {"public": {"mpesaStatus": "Review"}}

    # An operator resolves it as paid (the pipeline's resolve command, #16, is to come): its
    # payment.settled, signed as the notifier signs, settles the flagged payment and lifts the flag.
    headers, body = signed(secret, "payment.settled", payment["transactionId"], pipeline_channel,
                           state="Settled", mpesaReceipt="TST0REVU01")
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(vendure.webhook_url(CONFIRMING_CHANNEL), content=body, headers=headers)).status_code \
            == 204
    paid = await admin_order(admin, order["code"])
    assert paid["state"] == "PaymentSettled" and paid["payments"][0]["state"] == "Settled", paid
    assert paid["payments"][0]["metadata"]["needsReview"] is False
    assert paid["payments"][0]["metadata"]["mpesaReceipt"] == "TST0REVU01"


@pytest.fixture(scope="module")
async def polling_vendure(stack, pool):
    """A second Vendure test server whose pipeline channels have no webhook endpoint at all (every
    webhook lost), with the poller asking every second about payments Pending for 3 s; its second
    channel's pipeline channel confirms successes by query (Review with CONTRADICTED)."""
    build()
    database = await empty_schema(pool, POLLING_SCHEMA)
    onboarding = Onboarding(pool, public_key_file=public_key_path(stack.key_file))
    channels = {}
    for code in (DEFAULT_CHANNEL, CONFIRMING_CHANNEL):
        pipeline_channel = f"e2e-vendure-poll-{code.strip('_')[:6]}-{stack.unique}"
        api_key = await stack.onboard(pool, pipeline_channel)
        if code == CONFIRMING_CHANNEL:
            await onboarding.update_channel(pipeline_channel, {"confirmSuccessByQuery": True}, "tests")
        channels[code] = (pipeline_channel, api_key, "whsec_" + "B" * 43 + "=")  # a secret nothing signs with
    server = VendureServer(free_port(), ingress_url=stack.ingress_url, channels=channels, database=database,
                           schema=POLLING_SCHEMA, poll=(1, 3), log=True)
    yield server
    print("----- vendure (polling)\n" + server.stop()[-4000:])
    await drop_schema(pool, POLLING_SCHEMA)


async def test_the_poller_settles_a_payment_whose_webhook_never_came(stack, polling_vendure):
    shop = GraphQL(f"{polling_vendure.url}/shop-api")
    order = await checkout(shop)
    payment = (await add_payment(shop, SETTLES))["payments"][0]
    assert payment["state"] == "Pending"
    admin = await admin_login(polling_vendure.url)
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    [settled] = paid["payments"]
    assert settled["state"] == "Settled" and settled["metadata"]["settledByPipeline"] is True
    pipeline = await state(stack, polling_vendure.channels[DEFAULT_CHANNEL][:2], payment["transactionId"])
    assert settled["metadata"]["mpesaReceipt"] == pipeline["mpesa"]["receiptNumber"]
    assert (await payment_transitions(admin, order["code"])).count("Settled") == 1
    logged = "".join(polling_vendure.lines)
    assert "MpesaPipelinePlugin" in logged or "Vendure" in logged  # logs are on: the next line means something
    assert polling_vendure.channels[DEFAULT_CHANNEL][1] not in logged and SETTLES not in logged


async def test_the_poller_declines_a_payment_the_customer_cancelled(polling_vendure):
    shop = GraphQL(f"{polling_vendure.url}/shop-api")
    order = await checkout(shop)
    (await add_payment(shop, CANCELS))["payments"][0]
    admin = await admin_login(polling_vendure.url)

    async def declined():
        o = await admin_order(admin, order["code"])
        return o if o["payments"][0]["state"] == "Declined" else None
    after = await eventually(declined, timeout=60, interval=0.3)
    assert after["state"] == "ArrangingPayment" and after["payments"][0]["errorMessage"]


async def test_the_poller_flags_a_payment_the_pipeline_put_in_review(polling_vendure):
    shop = GraphQL(f"{polling_vendure.url}/shop-api", f"{CONFIRMING_CHANNEL}-token")
    order = await checkout(shop)
    await add_payment(shop, CONTRADICTED)
    admin = await admin_login(polling_vendure.url)
    admin.headers["vendure-token"] = f"{CONFIRMING_CHANNEL}-token"

    async def flagged():
        o = await admin_order(admin, order["code"])
        return o if o["payments"][0]["metadata"].get("needsReview") else None
    after = await eventually(flagged, timeout=60, interval=0.3)
    [reviewed] = after["payments"]
    assert reviewed["state"] == "Pending" and after["state"] == "ArrangingPayment", after
    assert "contradicting the success callback" in reviewed["metadata"]["reviewReason"]
    assert reviewed["metadata"]["public"] == {"mpesaStatus": "Review"}


async def test_the_poller_waits_out_an_ingress_that_is_down_and_settles_afterwards(polling_vendure):
    shop = GraphQL(f"{polling_vendure.url}/shop-api")
    order = await checkout(shop)
    await add_payment(shop, SETTLES)
    admin = await admin_login(polling_vendure.url)
    # The ingress goes away (the payment method now points at a port nothing listens on).
    pipeline_channel = polling_vendure.pipeline_channel
    ingress_url = await set_ingress_url(admin, pipeline_channel, f"http://127.0.0.1:{free_port()}")
    warned = len([line for line in polling_vendure.lines if "did not say how" in line])

    async def unanswered():
        return len([line for line in polling_vendure.lines if "did not say how" in line]) >= warned + 2
    await eventually(unanswered, timeout=60, interval=0.3)  # two rounds asked and got nothing
    assert (await admin_order(admin, order["code"]))["payments"][0]["state"] == "Pending"

    await set_ingress_url(admin, pipeline_channel, ingress_url)
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    assert [p["state"] for p in paid["payments"]] == ["Settled"]


async def set_ingress_url(admin: GraphQL, pipeline_channel: str, url: str) -> str:
    """Points the mpesa-stk payment method of `pipeline_channel` at `url`; answers the URL it had."""
    methods = (await admin("{ paymentMethods { items { id code handler { args { name value } } } } }")
               )["paymentMethods"]["items"]
    [method] = [m for m in methods if {"name": "pipelineChannelId", "value": pipeline_channel} in m["handler"]["args"]]
    args = {a["name"]: a["value"] for a in method["handler"]["args"]}
    await admin("mutation($input: UpdatePaymentMethodInput!) { updatePaymentMethod(input: $input) { id } }",
                input={"id": method["id"], "handler": {"code": "mpesa-stk", "arguments": [
                    {"name": "pipelineChannelId", "value": args["pipelineChannelId"]},
                    {"name": "ingressUrl", "value": url}]}})
    return args["ingressUrl"]
