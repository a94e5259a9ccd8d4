"""POST /api/payments and GET /api/payments/{id} on the real broker and database.

Each test uses a channel of its own, so what it finds on the topic (read from where the test began)
is its own doing. "Publishes nothing" is proven with a sentinel: after the refused requests a valid
one is sent on the same channel, whose event lands on the same partition after anything they could
have published; once it is visible, it must be the only event of that channel.
"""
from __future__ import annotations

import asyncio
import json
import uuid

import psycopg

from services.channels import repository as channels_repository
from tests.conftest import eventually
from tests.ingress.conftest import (
    TopicWatch,
    ingress_config,
    make_api_key,
    make_channel,
    new_key,
    of_channel,
    payment_body,
    start_ingress,
)


async def post(http, body, key: str | None = None, **headers):
    if key is not None:
        headers["Idempotency-Key"] = key
    return await http.post("/api/payments", json=body, headers=headers)


def assert_problem(response, status: int, case: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status
    assert problem["type"] == f"urn:mpesa-pipeline:problem:{case}"
    if field is not None:
        assert field in [e["field"] for e in problem["errors"]], problem
    return problem


async def only_event_is_the_sentinel(http, topic: TopicWatch, channel_id: str) -> None:
    sentinel = await post(http, payment_body(channel_id), new_key())
    assert sentinel.status_code == 202, sentinel.text
    events = topic.events(of_channel(channel_id))
    assert [e["payment_id"] for _, e in events] == [sentinel.json()["paymentId"]]


async def test_accepted_payment_is_published_once_with_the_request_fields(ingress, shop, topic):
    channel_id, api_key = shop
    key = new_key()
    async with ingress.client(api_key) as http:
        response = await post(http, payment_body(channel_id, phone="+254 712 345 678", orderReference="ord-77",
                                                 metadata={"cart": "7", "customer": "c-9"}), key)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["state"] == "Requested" and accepted["channelId"] == channel_id
    assert uuid.UUID(accepted["paymentId"]).version == 7  # time-ordered: services/common/ids.py
    assert response.headers["Location"] == f"/api/payments/{accepted['paymentId']}"
    assert response.headers["Idempotent-Replayed"] == "false"

    [(kafka_key, event)] = topic.events(of_channel(channel_id))
    assert kafka_key == channel_id.encode()
    assert event["payment_id"] == accepted["paymentId"]
    assert uuid.UUID(event["event_id"]).version == 7
    assert (event["amount"], event["phone"], event["account_reference"]) == (150, "254712345678", "INV-42")
    assert (event["description"], event["order_reference"]) == ("Shoes", "ord-77")
    assert event["metadata"] == {"cart": "7", "customer": "c-9"}
    assert (event["idempotency_key"], event["source"], event["schema_version"]) == (key, "API", 1)


async def test_replay_with_the_same_key_and_body_returns_the_same_payment_without_publishing(ingress, shop, topic):
    channel_id, api_key = shop
    key, body = new_key(), payment_body(channel_id)
    async with ingress.client(api_key) as http:
        first = await post(http, body, key)
        # Same meaning, other spelling: key order and the phone's form do not make it a new request.
        respelt = {**dict(reversed(list(body.items()))), "phone": "254712345678"}
        again = [await post(http, respelt, key), await post(http, body, key, **{"X-Api-Key": api_key})]
    assert first.status_code == 202
    for response in again:
        assert response.status_code == 202, response.text
        assert response.json() == first.json()
        assert response.headers["Idempotent-Replayed"] == "true"
    assert len(topic.events(of_channel(channel_id))) == 1


async def test_the_same_key_with_another_body_is_a_conflict_and_publishes_nothing_more(ingress, shop, topic):
    channel_id, api_key = shop
    key, body = new_key(), payment_body(channel_id)
    async with ingress.client(api_key) as http:
        first = await post(http, body, key)
        conflict = await post(http, {**body, "amount": body["amount"] + 1}, key)
        also_conflict = await post(http, {**body, "metadata": {"cart": "8"}}, key)
        replay = await post(http, body, key)
    assert first.status_code == 202
    assert_problem(conflict, 409, "idempotency-conflict", "Idempotency-Key")
    assert_problem(also_conflict, 409, "idempotency-conflict", "Idempotency-Key")
    assert replay.json()["paymentId"] == first.json()["paymentId"]
    assert [e["payment_id"] for _, e in topic.events(of_channel(channel_id))] == [first.json()["paymentId"]]


async def test_concurrent_requests_with_one_key_make_one_payment(ingress, shop, topic):
    channel_id, api_key = shop
    key, body = new_key(), payment_body(channel_id)
    async with ingress.client(api_key) as http:
        responses = await asyncio.gather(*(post(http, body, key) for _ in range(20)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["paymentId"] for r in responses}) == 1
    assert sorted(r.headers["Idempotent-Replayed"] for r in responses) == ["false"] + ["true"] * 19
    assert len(topic.events(of_channel(channel_id))) == 1


async def test_concurrent_requests_on_two_ingress_processes_make_one_payment(infra, ingress, shop, topic):
    # Two ingress instances share the database: the claim in PostgreSQL, not the in-process map, decides.
    channel_id, api_key = shop
    other = await start_ingress(ingress_config(infra))
    key, body = new_key(), payment_body(channel_id)
    try:
        async with ingress.client(api_key) as a, other.client(api_key) as b:
            responses = await asyncio.gather(*(post(http, body, key) for http in [a, b] * 10))
    finally:
        await other.stop()
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["paymentId"] for r in responses}) == 1
    # The claim row is unique; the event may be sent twice (same event id) if the second instance
    # saw the row before the first had recorded its publish: consumers drop such a repeat.
    events = topic.events(of_channel(channel_id))
    assert len({e["event_id"] for _, e in events}) == 1
    assert {e["payment_id"] for _, e in events} == {responses[0].json()["paymentId"]}


async def test_idempotency_keys_are_scoped_to_the_channel(ingress, pool, unique, topic):
    one, two = f"one-{unique}", f"two-{unique}"
    await make_channel(pool, one)
    await make_channel(pool, two)
    api_key = await make_api_key(pool, one, two)
    key = new_key()
    async with ingress.client(api_key) as http:
        first = await post(http, payment_body(one), key)
        second = await post(http, payment_body(two), key)
    assert first.status_code == second.status_code == 202
    assert first.json()["paymentId"] != second.json()["paymentId"]
    assert len(topic.events(of_channel(one))) == len(topic.events(of_channel(two))) == 1


async def test_missing_or_unknown_api_key_is_401(ingress, shop, pool):
    channel_id, api_key = shop
    revoked = await make_api_key(pool, channel_id)
    async with pool.connection() as conn:
        assert await channels_repository.revoke_api_key(conn, revoked.split("_")[1], "tests")
    forged = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    attempts = [{}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {api_key}"},
                {"Authorization": "Bearer not-a-key"}, {"Authorization": f"Bearer {forged}"},
                {"X-Api-Key": forged}, {"Authorization": f"Bearer {revoked}"}]
    async with ingress.client() as http:
        for headers in attempts:
            response = await post(http, payment_body(channel_id), new_key(), **headers)
            assert_problem(response, 401, "unauthenticated")
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        accepted = await post(http, payment_body(channel_id), new_key(), **{"X-Api-Key": api_key})
        assert accepted.status_code == 202, accepted.text


async def test_a_key_for_another_channel_is_403_and_publishes_nothing(ingress, shop, pool, unique, topic):
    channel_id, api_key = shop
    stranger = f"other-{unique}"
    await make_channel(pool, stranger)
    other_key = await make_api_key(pool, stranger)
    async with ingress.client(other_key) as http:
        refused = await post(http, payment_body(channel_id), new_key())
        # A key learns nothing about channels outside its scope, not even whether they exist.
        nowhere = await post(http, payment_body(f"absent-{unique}"), new_key())
    assert_problem(refused, 403, "channel-not-allowed", "channelId")
    assert_problem(nowhere, 403, "channel-not-allowed", "channelId")
    async with ingress.client(api_key) as http:
        await only_event_is_the_sentinel(http, topic, channel_id)


async def test_unknown_suspended_and_onboarding_channels_are_refused_each_in_its_own_way(infra, pool, unique,
                                                                                        topic):
    suspended, onboarding, absent = f"susp-{unique}", f"onb-{unique}", f"absent-{unique}"
    await make_channel(pool, suspended, status="suspended")
    await make_channel(pool, onboarding, status="onboarding")
    # A key scoped to a channel that does not exist (API keys carry no foreign key to channels).
    api_key = await make_api_key(pool, suspended, onboarding, absent)
    running = await start_ingress(ingress_config(infra))  # its own, so that stopping it proves nothing is pending
    try:
        async with running.client(api_key) as http:
            assert_problem(await post(http, payment_body(absent), new_key()), 422, "unknown-channel", "channelId")
            assert_problem(await post(http, payment_body(suspended), new_key()), 403, "channel-suspended",
                           "channelId")
            assert_problem(await post(http, payment_body(onboarding), new_key()), 403, "channel-not-active",
                           "channelId")
    finally:
        await running.stop()  # drains its batches and flushes its producer: whatever it would publish has landed
    assert topic.events(lambda e: e["channel_id"] in (suspended, onboarding, absent)) == []


async def test_a_channel_suspended_later_is_refused_once_the_cache_expires(infra, pool, unique, topic):
    channel_id = f"later-{unique}"
    await make_channel(pool, channel_id)
    api_key = await make_api_key(pool, channel_id)
    running = await start_ingress(ingress_config(infra, ingress_auth_cache_ttl_s=0.5))
    try:
        async with running.client(api_key) as http:
            assert (await post(http, payment_body(channel_id), new_key())).status_code == 202
            async with pool.connection() as conn:
                await channels_repository.set_status(conn, channel_id, "suspended")
            await asyncio.sleep(0.6)
            assert_problem(await post(http, payment_body(channel_id), new_key()), 403, "channel-suspended")
    finally:
        await running.stop()
    assert len(topic.events(of_channel(channel_id))) == 1


async def test_channel_max_amount_replaces_the_default_limit(ingress, pool, unique):
    channel_id = f"small-{unique}"
    await make_channel(pool, channel_id, max_amount=1000)
    api_key = await make_api_key(pool, channel_id)
    async with ingress.client(api_key) as http:
        assert (await post(http, payment_body(channel_id, amount=1000), new_key())).status_code == 202
        problem = assert_problem(await post(http, payment_body(channel_id, amount=1001), new_key()), 400,
                                 "invalid-request", "amount")
    assert "between 1 and 1000" in problem["errors"][0]["message"]


async def test_without_a_channel_limit_the_limit_is_250000(ingress, shop):
    channel_id, api_key = shop
    async with ingress.client(api_key) as http:
        assert (await post(http, payment_body(channel_id, amount=250_000), new_key())).status_code == 202
        assert_problem(await post(http, payment_body(channel_id, amount=250_001), new_key()), 400,
                       "invalid-request", "amount")


async def test_refused_envelopes_each_get_their_own_answer_and_publish_nothing(ingress, shop, topic):
    channel_id, api_key = shop
    good = payment_body(channel_id)
    raw = json.dumps(good).encode()

    async def send(content: bytes, content_type: str | None = "application/json", key: str | None = "fresh"):
        headers = {"Idempotency-Key": new_key() if key == "fresh" else key} if key else {}
        if content_type:
            headers["Content-Type"] = content_type
        return await http.post("/api/payments", content=content, headers=headers)

    async def chunks():
        yield b'{"channelId": "' + channel_id.encode() + b'", "metadata": {"pad": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}}'

    async with ingress.client(api_key) as http:
        assert_problem(await send(raw, "text/plain"), 415, "unsupported-media-type")
        assert_problem(await send(raw, None), 415, "unsupported-media-type")
        assert_problem(await send(raw, "application/x-www-form-urlencoded"), 415, "unsupported-media-type")
        too_large = json.dumps({**good, "metadata": {"pad": "x" * 20_000}}).encode()
        assert_problem(await send(too_large), 413, "request-too-large")
        chunked = await http.post("/api/payments", content=chunks(),
                                  headers={"Idempotency-Key": new_key(), "Content-Type": "application/json"})
        assert_problem(chunked, 413, "request-too-large")
        assert_problem(await send(b'{"channelId": '), 400, "malformed-json")
        assert_problem(await send(b"\xff\xfe{}"), 400, "malformed-json")
        assert_problem(await send(b'{"amount": NaN}'), 400, "malformed-json")
        assert_problem(await send(b"[" * 5000 + b"]" * 5000), 400, "malformed-json")
        duplicate = raw[:-1] + b', "amount": 200000}'
        assert "'amount'" in assert_problem(await send(duplicate), 400, "malformed-json")["detail"]
        assert_problem(await send(b"[]"), 400, "invalid-request", "body")
        assert_problem(await send(raw, key=None), 400, "idempotency-key-required", "Idempotency-Key")
        assert_problem(await send(raw, key="has space"), 400, "idempotency-key-required", "Idempotency-Key")
        invalid = json.dumps({**good, "amount": 10.5, "phone": "0812345678", "accountReference": "X" * 13}).encode()
        problem = assert_problem(await send(invalid), 400, "invalid-request")
        assert {e["field"] for e in problem["errors"]} == {"amount", "phone", "accountReference"}
        await only_event_is_the_sentinel(http, topic, channel_id)


async def test_a_request_refused_for_its_body_does_not_spend_its_key(ingress, shop):
    channel_id, api_key = shop
    key = new_key()
    async with ingress.client(api_key) as http:
        assert_problem(await post(http, payment_body(channel_id, amount="150"), key), 400, "invalid-request", "amount")
        assert (await post(http, payment_body(channel_id), key)).status_code == 202


async def test_get_shows_a_fresh_payment_as_requested(ingress, shop):
    channel_id, api_key = shop
    async with ingress.client(api_key) as http:
        created = (await post(http, payment_body(channel_id, orderReference="ord-9"), new_key())).json()
        response = await http.get(f"/api/payments/{created['paymentId']}")
    assert response.status_code == 200, response.text
    payment = response.json()
    assert (payment["paymentId"], payment["channelId"], payment["state"]) == (created["paymentId"], channel_id,
                                                                             "Requested")
    assert (payment["amount"], payment["accountReference"], payment["orderReference"]) == (150, "INV-42", "ord-9")
    # The ledger (if one runs) may already have recorded it; either way there is no M-Pesa result yet.
    assert payment["mpesa"]["receiptNumber"] is None and payment["mpesa"]["resultCode"] is None
    assert [h["state"] for h in payment["history"]] in ([], ["Requested"])


async def test_get_shows_the_ledgers_state_references_result_and_history(ingress, shop, database_url):
    channel_id, api_key = shop
    async with ingress.client(api_key) as http:
        created = (await post(http, payment_body(channel_id), new_key())).json()
        payment_id = created["paymentId"]
        await record_settled_payment(database_url, payment_id, channel_id)
        response = await http.get(f"/api/payments/{payment_id}")
    payment = response.json()
    assert payment["state"] == "Settled"
    assert payment["mpesa"] == {"merchantRequestId": "29115-1", "checkoutRequestId": f"ws_CO_{payment_id[-8:]}",
                                "receiptNumber": f"R{payment_id[-9:].upper()}",
                                "transactionTime": "2025-01-06T07:21:15+00:00", "resultCode": "0",
                                "resultDesc": "The service request is processed successfully."}
    assert [(h["state"], h["previous"]) for h in payment["history"]] == [
        ("Requested", None), ("Pending", "Requested"), ("Settled", "Pending")]


async def test_a_replay_answers_the_payments_current_state(ingress, shop, database_url):
    channel_id, api_key = shop
    key, body = new_key(), payment_body(channel_id)
    async with ingress.client(api_key) as http:
        created = (await post(http, body, key)).json()
        await record_settled_payment(database_url, created["paymentId"], channel_id)
        replay = await post(http, body, key)
    assert replay.status_code == 202
    assert replay.json() == {**created, "state": "Settled"}


async def test_get_is_scoped_to_the_keys_channels(ingress, shop, pool, unique):
    channel_id, api_key = shop
    stranger = f"nosy-{unique}"
    await make_channel(pool, stranger)
    other_key = await make_api_key(pool, stranger)
    async with ingress.client(api_key) as http:
        payment_id = (await post(http, payment_body(channel_id), new_key())).json()["paymentId"]
    async with ingress.client(other_key) as http:
        assert_problem(await http.get(f"/api/payments/{payment_id}"), 404, "payment-not-found")
        assert_problem(await http.get(f"/api/payments/{uuid.uuid4()}"), 404, "payment-not-found")
        assert_problem(await http.get("/api/payments/not-a-uuid"), 404, "payment-not-found")
    async with ingress.client() as http:
        assert_problem(await http.get(f"/api/payments/{payment_id}"), 401, "unauthenticated")
    async with ingress.client(api_key) as http:
        assert (await http.get(f"/api/payments/{payment_id}")).status_code == 200


async def test_kafka_down_is_503_and_a_retry_publishes_the_same_payment(infra, ingress, shop, topic, database_url):
    # An ingress whose broker does not exist answers 503; the same request sent again once Kafka is
    # back (here: to the ingress that has a broker) publishes the event fixed by the first claim.
    channel_id, api_key = shop
    broken = await start_ingress(ingress_config(infra, kafka_bootstrap_servers="127.0.0.1:9",
                                                ingress_kafka_timeout_ms=1000))
    key, body = new_key(), payment_body(channel_id)
    try:
        async with broken.client(api_key) as http:
            refused = await post(http, body, key)
            refused_again = await post(http, body, key)
    finally:
        await broken.stop()
    for response in (refused, refused_again):
        assert_problem(response, 503, "unavailable")
        assert response.headers["Retry-After"] == "1"
    claimed = await claim_row(database_url, channel_id, key)
    assert claimed["published_at"] is None

    async with ingress.client(api_key) as http:
        accepted = await post(http, body, key)
        replay = await post(http, body, key)
        assert (await http.get(f"/api/payments/{claimed['payment_id']}")).status_code == 200
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["paymentId"] == replay.json()["paymentId"] == claimed["payment_id"]
    [(_, event)] = topic.events(of_channel(channel_id))
    assert (event["payment_id"], event["event_id"]) == (claimed["payment_id"], claimed["event_id"])
    # The publish is recorded after the answer, without holding it up.
    await eventually(lambda: _published(database_url, channel_id, key), timeout=10)


async def test_a_payment_whose_publish_failed_cannot_be_read(infra, shop, database_url):
    channel_id, api_key = shop
    broken = await start_ingress(ingress_config(infra, kafka_bootstrap_servers="127.0.0.1:9",
                                                ingress_kafka_timeout_ms=500))
    key = new_key()
    try:
        async with broken.client(api_key) as http:
            assert_problem(await post(http, payment_body(channel_id), key), 503, "unavailable")
            payment_id = (await claim_row(database_url, channel_id, key))["payment_id"]
            assert_problem(await http.get(f"/api/payments/{payment_id}"), 404, "payment-not-found")
    finally:
        await broken.stop()


async def test_unknown_routes_and_methods_are_problems_too(ingress):
    async with ingress.client() as http:
        assert_problem(await http.get("/api/nothing"), 404, "not-found")
        response = await http.delete("/api/payments")
        assert_problem(response, 405, "method-not-allowed")
        assert "POST" in response.headers["Allow"]


async def record_settled_payment(database_url: str, payment_id: str, channel_id: str) -> None:
    """Writes what the ledger would have recorded for a settled payment (the ledger is the only
    writer of these tables in production; here it stands in for it)."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute(
            "INSERT INTO payments (payment_id, channel_id, state, amount, phone, account_reference, description,"
            " order_reference, merchant_request_id, checkout_request_id, mpesa_receipt, transaction_time,"
            " result_code, result_desc, requested_at)"
            " VALUES (%s, %s, 'Settled', 150, '254712345678', 'INV-42', 'Shoes', NULL, '29115-1', %s, %s,"
            " '2025-01-06T07:21:15Z', '0', 'The service request is processed successfully.', now())"
            " ON CONFLICT (payment_id) DO UPDATE SET state = 'Settled', merchant_request_id = '29115-1',"
            " checkout_request_id = EXCLUDED.checkout_request_id, mpesa_receipt = EXCLUDED.mpesa_receipt,"
            " transaction_time = EXCLUDED.transaction_time, result_code = '0', result_desc = EXCLUDED.result_desc",
            (payment_id, channel_id, f"ws_CO_{payment_id[-8:]}", f"R{payment_id[-9:].upper()}"))
        await conn.execute("DELETE FROM payment_history WHERE payment_id = %s", (payment_id,))
        for state, previous in (("Requested", None), ("Pending", "Requested"), ("Settled", "Pending")):
            await conn.execute("INSERT INTO payment_history (payment_id, state, previous, reason, event_id)"
                               " VALUES (%s, %s, %s, NULL, %s)", (payment_id, state, previous, uuid.uuid4()))


async def _published(database_url: str, channel_id: str, key: str) -> bool:
    return (await claim_row(database_url, channel_id, key))["published_at"] is not None


async def claim_row(database_url: str, channel_id: str, key: str) -> dict:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT payment_id, event_id::text, published_at FROM ingress_requests"
                                 " WHERE channel_id = %s AND idempotency_key = %s", (channel_id, key))
        row = await cur.fetchone()
    assert row is not None
    return {"payment_id": row[0], "event_id": row[1], "published_at": row[2]}
