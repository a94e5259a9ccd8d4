"""Fields no payment may carry, over HTTP on the real broker and database: each is a 400 naming the
field, and nothing is published. Before, a NUL or a lone surrogate passed validation and failed in
PostgreSQL, which the ingress reports as 503 "database unavailable" (and a client retries forever)."""
from __future__ import annotations

import json

import pytest

from tests.ingress.conftest import new_key, payment_body
from tests.ingress.test_payments_api import assert_problem, only_event_is_the_sentinel


@pytest.mark.parametrize("field, value", [
    ("orderReference", "ord-1\u0000"), ("orderReference", "ord-\ud800"), ("orderReference", "ord-1\nforged"),
    ("metadata", {"cart": "7\u0000"}), ("metadata", {"cart\n": "7"}), ("metadata", {"\ud83d": "7"}),
    ("accountReference", "INV-42\n"), ("description", "Shoes\n"), ("channelId", "{channel}\n"),
    ("phone", "0712345678\n"),
])
async def test_unstorable_or_multi_line_fields_are_400_and_publish_nothing(ingress, shop, topic, field, value):
    channel_id, api_key = shop
    if isinstance(value, str):
        value = value.replace("{channel}", channel_id)
    body = json.dumps(payment_body(channel_id, **{field: value}))  # json.dumps escapes the surrogate as \ud800
    async with ingress.client(api_key) as http:
        response = await http.post("/api/payments", content=body, headers={
            "Idempotency-Key": new_key(), "Content-Type": "application/json"})
        assert_problem(response, 400, "invalid-request", field)
        await only_event_is_the_sentinel(http, topic, channel_id)


async def test_an_unknown_field_name_is_echoed_cleaned(ingress, shop):
    channel_id, api_key = shop
    async with ingress.client(api_key) as http:
        response = await http.post("/api/payments", json={**payment_body(channel_id), "x\n\u202eforged": 1},
                                   headers={"Idempotency-Key": new_key()})
        problem = assert_problem(response, 400, "invalid-request")
        assert [e["field"] for e in problem["errors"]] == ["x\\u000a\\u202eforged"]
