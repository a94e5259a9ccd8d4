"""The Vendure plugin attacked: answers lost between the shop and the pipeline, odd answers, hostile
storefront input and configuration, an administrator's hand on M-Pesa payments. A loopback proxy
stands between the Vendure server and the ingress: it forwards what the handler sends (and keeps a
copy), and loses or replaces the answer when a test tells it to. The money is what the tests look
at: the sandbox's record of pushes and the payments Vendure's APIs show."""
from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from services.channels.vault import public_key_path
from services.channels.webhooks import WebhookManagement
from services.notifier.destinations import DestinationPolicy, parse_networks
from tests.conftest import eventually, free_port
from tests.e2e.stack import running
from tests.e2e.test_pipeline import pushes, state
from tests.integrations.test_vendure_e2e import CANCELS, SETTLES, SETTLES_TOO, account_reference, paid_order, signed
from tests.integrations.vendure import (
    DEFAULT_CHANNEL,
    ORDER_FIELDS,
    PLUGIN,
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

SCHEMA = "vendure_attacks"  # this module's shop, apart from test_vendure_e2e's
SLOW = "254700005005"  # the sandbox settles this phone's pushes 5 s after the push
Answer = Callable[[], web.Response]


class LossyProxy:
    """Forwards POST /api/payments to the ingress. `plan` says what to do with the next requests, in
    order: "forward" (the default), "502" or "reset" (forward, then lose the answer), or an Answer
    given without forwarding. `seen` keeps each request's Idempotency-Key and body."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.url = ""  # where it listens, once the fixture has started it
        self.plan: list[str | Answer] = []
        self.seen: list[tuple[str, dict]] = []
        self.lost: list[dict] = []  # the ingress's answers the handler never got

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.headers.get("Idempotency-Key", ""), json.loads(body)))
        action = self.plan.pop(0) if self.plan else "forward"
        if callable(action):
            return action()
        async with httpx.AsyncClient(timeout=30) as http:
            answer = await http.post(f"{self.upstream}/api/payments", content=body, headers={
                name: request.headers[name] for name in ("Authorization", "Idempotency-Key", "Content-Type")})
        if action in ("502", "reset"):
            self.lost.append(answer.json())
        if action == "502":
            return web.Response(status=502, text="bad gateway")
        if action == "reset":
            assert request.transport is not None, "the request is being served"
            request.transport.abort()
            return web.Response(status=204)
        return web.Response(status=answer.status_code, body=answer.content,
                            content_type=answer.headers["content-type"].split(";")[0])

    def keys(self) -> list[str]:
        return [key for key, _ in self.seen]


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    yield from running(infra, tmp_path_factory.mktemp("e2e-vendure-attacks"), with_notifier=True)


@pytest.fixture(scope="module")
async def proxy(stack):
    lossy = LossyProxy(stack.ingress_url)
    app = web.Application()
    app.router.add_post("/api/payments", lossy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    lossy.url = f"http://127.0.0.1:{port}"
    yield lossy
    await runner.cleanup()


@pytest.fixture(scope="module")
async def vendure(stack, proxy, pool, onboarding_pool):
    """A Vendure test server paying through the proxy, with Vendure's logger on (LOG=1) so that the
    tests can read what it writes."""
    build()
    database = await empty_schema(pool, SCHEMA)
    management = WebhookManagement(onboarding_pool, public_key_file=public_key_path(stack.webhooks_key_file),
                                   policy=DestinationPolicy(parse_networks("127.0.0.0/8")))
    port = free_port()
    pipeline_channel = f"e2e-vendure-attacks-{stack.unique}"
    api_key = await stack.onboard(pool, pipeline_channel)
    _, secret = await management.add_endpoint(
        pipeline_channel, {"url": f"http://127.0.0.1:{port}/mpesa-pipeline/webhooks/{DEFAULT_CHANNEL}"}, "tests")
    server = VendureServer(port, ingress_url=proxy.url, channels={DEFAULT_CHANNEL: (pipeline_channel, api_key, secret)},
                           database=database, schema=SCHEMA, log=True)
    yield server
    print("----- vendure\n" + server.stop()[-4000:])
    await drop_schema(pool, SCHEMA)


@pytest.fixture(autouse=True)
def fresh_plan(proxy):
    proxy.plan.clear()
    proxy.seen.clear()
    proxy.lost.clear()


async def pending_unknown_to_the_pipeline(shop: GraphQL, proxy: LossyProxy, vendure: VendureServer) -> dict:
    """A Pending payment whose pipeline payment id the pipeline never made (the proxy answers the
    202 itself): only a test's own signed webhooks move it, never the pipeline's, however late."""
    channel = vendure.channels[DEFAULT_CHANNEL][0]
    proxy.plan = [lambda: web.json_response({"paymentId": str(uuid.uuid4()), "channelId": channel, "state": "Pending"},
                                            status=202)]
    [payment] = (await add_payment(shop, SETTLES))["payments"]
    assert payment["state"] == "Pending", payment
    return payment


async def pay(shop: GraphQL, metadata: dict) -> dict:
    """addPaymentToOrder with any metadata the storefront might send."""
    data = await shop("mutation($m: JSON!) { addPaymentToOrder(input: {method: \"mpesa-stk\", metadata: $m}) {"
                      f" ... on Order {{ {ORDER_FIELDS} }}"
                      " ... on ErrorResult { errorCode message }"
                      " ... on PaymentDeclinedError { paymentErrorMessage } } }", m=metadata)
    return data["addPaymentToOrder"]


@pytest.mark.parametrize("lost", ["502", "reset"])
async def test_a_retry_after_a_lost_answer_prompts_the_customer_once(stack, vendure, proxy, lost):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    # The ingress accepts the first request (the push goes out), but its answer never reaches Vendure.
    proxy.plan = [lost]
    first = await add_payment(shop, SETTLES)
    assert first["errorCode"] == "PAYMENT_DECLINED_ERROR" and "did not answer" in first["paymentErrorMessage"], first
    # The customer tries again: the same key finds the payment the pipeline already made.
    again = await add_payment(shop, SETTLES)
    pending = [p for p in again["payments"] if p["state"] == "Pending"]
    assert len(pending) == 1, again
    assert proxy.keys()[0] == proxy.keys()[1]

    admin = await admin_login(vendure.url)
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    assert [p["state"] for p in paid["payments"]] == ["Declined", "Settled"]
    assert len({p["transactionId"] for p in paid["payments"] if p["transactionId"]}) == 1
    assert pushes(stack, account_reference(order["code"])) == 1  # the sandbox's record: one prompt


async def test_a_retry_with_another_phone_after_a_lost_answer_waits_for_the_same_phone(stack, vendure, proxy):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    proxy.plan = ["502"]
    await add_payment(shop, SETTLES)
    # The first prompt may be on SETTLES's phone: another phone would be a second charge.
    other = await add_payment(shop, SETTLES_TOO)
    assert "same phone number" in other["paymentErrorMessage"], other
    same = await add_payment(shop, SETTLES)
    assert [p["state"] for p in same["payments"]].count("Pending") == 1, same
    assert len(set(proxy.keys())) == 1

    admin = await admin_login(vendure.url)
    await paid_order(admin, order["code"], "PaymentSettled")
    assert pushes(stack, account_reference(order["code"])) == 1


async def test_a_retry_that_finds_the_lost_request_cancelled_moves_the_next_attempt_to_a_new_key(stack, vendure, proxy):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    proxy.plan = ["502"]
    await add_payment(shop, CANCELS)
    [lost] = proxy.lost

    async def cancelled():  # the customer declined the prompt the shop never heard of
        shown = await state(stack, vendure.channels[DEFAULT_CHANNEL][:2], lost["paymentId"])
        return shown.get("state") == "Cancelled"
    await eventually(cancelled, timeout=60, interval=0.3)
    replayed = await add_payment(shop, CANCELS)
    assert "was cancelled" in replayed["paymentErrorMessage"], replayed
    fresh = await add_payment(shop, SETTLES)
    assert [p["state"] for p in fresh["payments"]].count("Pending") == 1, fresh
    assert proxy.keys() == [f"vendure:{order['code']}:1"] * 2 + [f"vendure:{order['code']}:3"]
    admin = await admin_login(vendure.url)
    await paid_order(admin, order["code"], "PaymentSettled")
    assert pushes(stack, account_reference(order["code"])) == 2  # the cancelled prompt and the paid one


async def test_a_definite_refusal_moves_the_next_attempt_to_a_new_key(vendure, proxy):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    refused = await add_payment(shop, "0812345678")  # not a Kenyan mobile number: the ingress says 400
    assert "phone" in refused["paymentErrorMessage"], refused
    accepted = await add_payment(shop, SETTLES)
    assert [p["state"] for p in accepted["payments"]].count("Pending") == 1, accepted
    assert proxy.keys() == [f"vendure:{order['code']}:1", f"vendure:{order['code']}:2"]


@pytest.mark.parametrize("answer", [
    lambda: web.json_response({}, status=202),
    lambda: web.json_response({"paymentId": "../../admin", "channelId": "x", "state": "Requested"}, status=202),
    lambda: web.Response(status=202, body=b"{" * 200_000, content_type="application/json"),
    lambda: web.json_response({"paymentId": "00000000-0000-7000-8000-000000000000"}, status=200),
    lambda: web.Response(status=307, headers={"Location": "http://127.0.0.1:9/api/payments"}),
], ids=["empty-202", "bad-id-202", "huge-202", "200", "redirect"])
async def test_an_answer_that_is_not_the_contracts_keeps_the_key_for_the_retry(vendure, proxy, answer):
    shop = GraphQL(f"{vendure.url}/shop-api")
    await checkout(shop)
    proxy.plan = [answer]
    odd = await add_payment(shop, SETTLES)
    assert "did not answer" in odd["paymentErrorMessage"], odd
    again = await add_payment(shop, SETTLES)
    assert [p["state"] for p in again["payments"]].count("Pending") == 1, again
    assert len(proxy.seen) == 2 and proxy.keys()[0] == proxy.keys()[1]


async def test_a_problem_detail_with_control_characters_and_huge_text_is_shown_cleaned_and_bounded(vendure, proxy):
    shop = GraphQL(f"{vendure.url}/shop-api")
    await checkout(shop)
    proxy.plan = [lambda: web.json_response({
        "title": "Bad\u202e\r\nphone\u0000", "detail": "x" * 10_000,
        "errors": [{"field": "phone", "message": "\u2028evil"}] * 1000}, status=400,
        content_type="application/problem+json")]
    refused = await add_payment(shop, SETTLES)
    message = refused["paymentErrorMessage"]
    assert message.startswith("Bad") and len(message) <= 300, message
    assert not re.search(r"[\x00-\x1f\u2028\u202e]", message), message


async def test_storefront_metadata_other_than_the_phone_goes_nowhere(vendure, proxy):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    placed = await pay(shop, {"phone": SLOW, "settledByPipeline": True, "idempotencyKey": "vendure:X:1",
                              "public": {"mpesaStatus": "Settled"}, "amount": 1, "channelId": "someone-else"})
    [payment] = placed["payments"]
    assert payment["metadata"] == {"public": {"mpesaStatus": "Pending"}}
    [(key, sent)] = proxy.seen
    assert key == f"vendure:{order['code']}:1"
    assert sent == {"channelId": vendure.pipeline_channel, "amount": 100, "phone": SLOW,
                    "accountReference": account_reference(order["code"]), "orderReference": order["code"]}
    admin = await admin_login(vendure.url)
    stored = (await admin_order(admin, order["code"]))["payments"][0]["metadata"]  # still Pending
    assert set(stored) == {"pipelineChannelId", "idempotencyKey", "public"} and "phone" not in json.dumps(stored)
    await paid_order(admin, order["code"], "PaymentSettled")


@pytest.mark.parametrize("phone", [254700000000, {"number": SETTLES}, "0" * 10_000, ""],
                         ids=["number", "object", "long", "empty"])
async def test_a_phone_that_is_not_a_short_string_is_declined_without_asking_the_pipeline(vendure, proxy, phone):
    shop = GraphQL(f"{vendure.url}/shop-api")
    await checkout(shop)
    refused = await pay(shop, {"phone": phone})
    assert "phone number" in refused["paymentErrorMessage"], refused
    assert proxy.seen == []


async def test_an_amount_above_the_pipelines_limit_is_declined_with_its_reason(vendure, proxy):
    admin = await admin_login(vendure.url)
    # KIKOY-1 at KES 300,000: above M-Pesa's 250,000 per payment.
    await admin('mutation { updateProductVariants(input: [{id: "T_1", price: 30000000}]) { id } }')
    try:
        shop = GraphQL(f"{vendure.url}/shop-api")
        await checkout(shop)
        refused = await add_payment(shop, SETTLES)
    finally:
        await admin('mutation { updateProductVariants(input: [{id: "T_1", price: 10000}]) { id } }')
    assert "250000" in refused["paymentErrorMessage"], refused
    assert proxy.seen[0][1]["amount"] == 300_000


async def test_an_administrator_can_neither_settle_nor_cancel_a_pending_payment(vendure):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    payment = (await add_payment(shop, SLOW))["payments"][0]  # Pending for 5 s
    admin = await admin_login(vendure.url)
    settle = await admin("mutation($id: ID!) { settlePayment(id: $id) { ... on Payment { state }"
                         " ... on ErrorResult { errorCode message }"
                         " ... on SettlePaymentError { paymentErrorMessage } } }", id=payment["id"])
    cancel = await admin("mutation($id: ID!) { cancelPayment(id: $id) { ... on Payment { state errorMessage }"
                         " ... on ErrorResult { errorCode message }"
                         " ... on CancelPaymentError { paymentErrorMessage } } }", id=payment["id"])
    assert "Only the pipeline" in json.dumps(settle), settle
    assert "may still be answered" in json.dumps(cancel), cancel
    assert (await admin_order(admin, order["code"]))["payments"][0]["state"] == "Pending"
    # The pipeline's word still settles it.
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    assert [p["state"] for p in paid["payments"]] == ["Settled"]


async def test_the_order_changed_while_pending_is_paid_in_full_before_it_counts_as_paid(vendure):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    await add_payment(shop, SETTLES)  # KES 100 asked for
    # Back to the cart while the prompt is out: one more Kikoy (KES 200 in all).
    await shop('mutation { transitionOrderToState(state: "AddingItems") { ... on Order { state } } }')
    await shop('mutation { addItemToOrder(productVariantId: "T_1", quantity: 1) { ... on Order { code } } }')
    await shop('mutation { transitionOrderToState(state: "ArrangingPayment") { ... on Order { state } } }')
    admin = await admin_login(vendure.url)

    async def first_settled():
        o = await admin_order(admin, order["code"])
        return o if o["payments"][0]["state"] == "Settled" else None
    half = await eventually(first_settled, timeout=60, interval=0.3)
    assert half["state"] == "ArrangingPayment" and half["totalWithTax"] == 20000, half
    rest = await add_payment(shop, SETTLES)
    # PostgreSQL returns the payments in no set order (the settled one was rewritten): the newest by id.
    newest = max(rest["payments"], key=lambda p: int(p["id"].removeprefix("T_")))
    assert newest["state"] == "Pending" and newest["metadata"], rest
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    assert sum(p["amount"] for p in (await admin(
        "query($id: ID!) { order(id: $id) { payments { amount state } } }", id=paid["id"]))["order"]["payments"]
               if p["state"] == "Settled") == 20000


async def test_the_vendure_log_shows_neither_phones_nor_the_api_key(vendure, proxy):
    shop = GraphQL(f"{vendure.url}/shop-api")
    await checkout(shop)
    proxy.plan = ["502", lambda: web.json_response({"title": "Unknown channel"}, status=422)]
    await add_payment(shop, "0712 345 678")
    await add_payment(shop, "0712 345 678")

    async def logged():  # the server's output is read by a thread
        log = "".join(vendure.lines)
        return log if "was lost" in log and "the pipeline refused" in log else None
    log = await eventually(logged, timeout=10)
    for secret in ("712 345 678", "712345678", SETTLES, SETTLES_TOO, vendure.channels[DEFAULT_CHANNEL][1]):
        assert secret not in log


async def set_ingress_url(admin: GraphQL, url: str) -> None:
    methods = (await admin("{ paymentMethods { items { id code handler { args { name value } } } } }"))
    [method] = [m for m in methods["paymentMethods"]["items"] if m["code"] == "mpesa-stk"]
    args = [{"name": a["name"], "value": url if a["name"] == "ingressUrl" else a["value"]}
            for a in method["handler"]["args"]]
    await admin("mutation($input: UpdatePaymentMethodInput!) { updatePaymentMethod(input: $input) { id } }",
                input={"id": method["id"], "handler": {"code": "mpesa-stk", "arguments": args}})


@pytest.mark.parametrize("hostile", ["file:///etc/passwd", "data:application/json,{}", "ftp://127.0.0.1/",
                                     "http://user:password@127.0.0.1:{port}", "not a url"])
async def test_an_ingress_url_that_is_not_plain_http_is_refused_before_anything_is_sent(vendure, proxy, hostile):
    admin = await admin_login(vendure.url)
    await set_ingress_url(admin, hostile.replace("{port}", proxy.url.rsplit(":", 1)[1]))
    try:
        shop = GraphQL(f"{vendure.url}/shop-api")
        await checkout(shop)
        refused = await add_payment(shop, SETTLES)
    finally:
        await set_ingress_url(admin, proxy.url)
    assert refused["paymentErrorMessage"] == "M-Pesa payments are not configured for this shop.", refused
    assert proxy.seen == []


@pytest.mark.parametrize("code", ["Ordre n° 42", "ORD/2026/000042", "#42", "    ", "x" * 250, "番号-42"])
async def test_order_codes_of_a_custom_strategy_give_a_request_the_ingress_accepts(stack, vendure, code):
    """What the handler derives from an order code (src/handler.ts, run by node) for codes a custom
    OrderCodeStrategy could make: the ingress accepts the request, and asked again, finds it."""
    script = ("const h = require('./dist/src/handler'); const c = process.argv[1];"
              "console.log(JSON.stringify({key: `vendure:${h.orderKeyPart(c)}:1`,"
              " accountReference: h.accountReference(c), orderReference: h.orderReference(c)}))")
    derived = json.loads(subprocess.run(["node", "-e", script, code], cwd=PLUGIN, check=True, text=True,
                                        capture_output=True).stdout)
    pipeline_channel, api_key, _ = vendure.channels[DEFAULT_CHANNEL]
    request = {"channelId": pipeline_channel, "amount": 100, "phone": SETTLES_TOO,
               "accountReference": derived["accountReference"]}
    if derived.get("orderReference") is not None:  # none for a code longer than the pipeline's 128
        request["orderReference"] = derived["orderReference"]
    async with httpx.AsyncClient(timeout=10) as http:
        answers = [await http.post(f"{stack.ingress_url}/api/payments", json=request, headers={
            "Authorization": f"Bearer {api_key}", "Idempotency-Key": derived["key"]}) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 202], answers[0].text
    assert answers[0].json()["paymentId"] == answers[1].json()["paymentId"]


async def test_an_order_whose_prompt_is_open_cannot_be_cancelled(vendure):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    await add_payment(shop, SLOW)  # Pending for 5 s
    admin = await admin_login(vendure.url)
    full = await admin_order(admin, order["code"])
    cancelled = await admin("mutation($id: ID!) { cancelOrder(input: {orderId: $id}) { ... on Order { state }"
                            " ... on ErrorResult { errorCode message } } }", id=full["id"])
    assert cancelled["cancelOrder"].get("errorCode"), cancelled
    # Had it been cancelled, the money below would have paid a cancelled order, with nobody told.
    paid = await paid_order(admin, order["code"], "PaymentSettled")
    assert [p["state"] for p in paid["payments"]] == ["Settled"]


async def test_a_settled_webhook_for_another_amount_flags_the_payment_and_settles_nothing(vendure, proxy):
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    payment = await pending_unknown_to_the_pipeline(shop, proxy, vendure)  # KES 100, Pending
    headers, body = signed(vendure.webhook_secret, "payment.settled", payment["transactionId"],
                           vendure.pipeline_channel, state="Settled", mpesaReceipt="TST0AMOUNT1", amount=1)
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(vendure.webhook_url(), content=body, headers=headers)).status_code == 204
    after = await admin_order(await admin_login(vendure.url), order["code"])
    assert after["state"] == "ArrangingPayment", after
    flagged = after["payments"][0]
    assert flagged["state"] == "Pending", after
    assert flagged["metadata"]["needsReview"] is True
    assert flagged["metadata"]["mpesaReceipt"] == "TST0AMOUNT1"
    assert "KES 1 " in flagged["metadata"]["reviewReason"] and "KES 100" in flagged["metadata"]["reviewReason"]


async def test_a_late_older_cancel_does_not_decline_a_payment_the_pipeline_put_in_review(vendure, proxy):
    """A parked payment.cancelled redelivered after the payment's payment.review (docs/webhooks.md §4:
    a receiver compares data.occurredAt): declined, the customer would pay again while the review may
    still settle the first payment."""
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    payment = await pending_unknown_to_the_pipeline(shop, proxy, vendure)  # Pending
    channel, _, secret = vendure.channels[DEFAULT_CHANNEL]
    events = [("payment.review", "Review", "2026-11-29T10:00:05.000Z"),
              ("payment.cancelled", "Cancelled", "2026-11-29T10:00:01.000Z")]
    async with httpx.AsyncClient(timeout=10) as http:
        for event_type, state, occurred_at in events:
            headers, body = signed(secret, event_type, payment["transactionId"], channel, state=state,
                                   occurredAt=occurred_at, reason="the receipt contradicts the cancel")
            assert (await http.post(vendure.webhook_url(), content=body, headers=headers)).status_code == 204
    after = await admin_order(await admin_login(vendure.url), order["code"])
    flagged = after["payments"][0]
    assert flagged["state"] == "Pending", after
    assert flagged["metadata"]["needsReview"] is True
    # The operator's resolution, after the review, is the pipeline's final word.
    headers, body = signed(secret, "payment.cancelled", payment["transactionId"], channel, state="Cancelled",
                           occurredAt="2026-11-29T10:09:00.000Z", reason="refunded by the operator")
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(vendure.webhook_url(), content=body, headers=headers)).status_code == 204
    resolved = (await admin_order(await admin_login(vendure.url), order["code"]))["payments"][0]
    assert resolved["state"] == "Declined" and resolved["metadata"]["needsReview"] is False, resolved


@pytest.mark.parametrize("seconds", [2_147_484, 3_000_000, 1e12])
async def test_a_poll_interval_longer_than_a_timer_can_wait_is_refused_at_boot(vendure, seconds):
    """Node runs a setInterval longer than 2^31 - 1 ms every millisecond: an interval meant as
    "hardly ever" would ask the pipeline about every Pending payment without pause."""
    script = ("const o = require('./dist/src/options');"
              "try { o.withDefaults({pollIntervalSeconds: Number(process.argv[1])}); console.log('accepted') }"
              " catch (e) { console.log(e.message) }")
    answers = [subprocess.run(["node", "-e", script, str(s)], cwd=PLUGIN, check=True, text=True,
                              capture_output=True).stdout.strip() for s in (seconds, 2_147_483)]
    assert "pollIntervalSeconds" in answers[0] and answers[1] == "accepted"


@pytest.mark.parametrize("skew", [timedelta(minutes=-6), timedelta(days=-3), timedelta(minutes=6)])
async def test_a_validly_signed_cancel_sent_long_ago_or_dated_ahead_is_refused(vendure, proxy, skew):
    """A captured payment.cancelled replayed later (or one dated ahead, to be replayed later): the
    signature covers the timestamp, which must be within five minutes of the server's clock."""
    shop = GraphQL(f"{vendure.url}/shop-api")
    order = await checkout(shop)
    payment = await pending_unknown_to_the_pipeline(shop, proxy, vendure)  # Pending
    channel, _, secret = vendure.channels[DEFAULT_CHANNEL]
    headers, body = signed(secret, "payment.cancelled", payment["transactionId"], channel, state="Cancelled")
    when = datetime.now(UTC) + skew
    headers |= {"webhook-timestamp": str(int(when.timestamp())),
                "webhook-signature": Webhook(secret).sign(headers["webhook-id"], when, body.decode())}
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(vendure.webhook_url(), content=body, headers=headers)).status_code == 400
    after = await admin_order(await admin_login(vendure.url), order["code"])
    assert after["payments"][0]["state"] == "Pending", after


async def test_a_validly_signed_body_that_is_not_json_is_refused_as_bad(vendure):
    """Refused with a 4xx, which the pipeline parks after a few tries, rather than a 5xx it would
    retry for three days."""
    channel, _, secret = vendure.channels[DEFAULT_CHANNEL]
    headers, _ = signed(secret, "payment.cancelled", "p", channel, state="Cancelled")
    body, now = "{not json", datetime.now(UTC)
    headers |= {"webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": Webhook(secret).sign(headers["webhook-id"], now, body)}
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(vendure.webhook_url(), content=body, headers=headers)).status_code == 400
