"""The webhook gateway in-process against the real broker: what is published, what is refused, and how.

Each test uses its own channel id and reads the callback topics from their ends at the start of the
test. "Nothing reached the raw topic" is shown with a sentinel: a valid callback on the same channel
(same key, same partition) published afterwards; whatever the refused request had published would
be read before it.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

import pytest

from services.common.topics import CALLBACK_RAW, CALLBACK_REJECTED
from services.webhook_consumer.app import _redacted_path, gateway_producer
from services.webhook_consumer.settings import SAFARICOM_CALLBACK_SOURCES, GatewaySettings
from services.webhook_consumer.sources import parse_networks
from tests.conftest import free_port
from tests.webhook.conftest import (
    ACCEPTED_BODY,
    DARAJA_CONTENT_TYPE,
    PREVIOUS_SECRET,
    SECRET,
    FrozenClock,
    Seen,
    callback_path,
    count,
    has_payment,
    metric,
    token,
)

SUCCESS_BODY = ('{"Body": {"stkCallback": {"MerchantRequestID": "29115-34620561-1",\n'
                ' "CheckoutRequestID": "ws_CO_191220191020363925", "ResultCode": 0,\n'
                ' "ResultDesc": "The service request is processed successfully. \u00e9\u20ac",\n'
                ' "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": 1.00},'
                ' {"Name": "Balance"}]}}}}\r\n').encode()
SAFARICOM = parse_networks(SAFARICOM_CALLBACK_SOURCES)
MAX = 64 * 1024


async def assert_raw_topic_untouched(raw, gateway, channel_id: str) -> None:
    """Publishes a sentinel on the channel and checks it is the only thing the raw topic got for it."""
    sentinel = f"sentinel-{time.monotonic_ns()}"
    assert (await gateway.callback(channel_id, sentinel)).status_code == 200
    seen = await raw.collect(channel_id, until=has_payment(sentinel))
    assert [s.record["payment_id"] for s in seen] == [sentinel]


def assert_token_free(seen: Seen, *tokens: str) -> None:
    for t in tokens:
        assert t.encode() not in seen.value
    assert set(seen.record["path_params"]) <= {"channelId", "paymentId"}


async def test_a_valid_callback_is_published_byte_for_byte_and_answered_accepted(start_gateway, tail, unique):
    gateway, raw = await start_gateway(), tail(CALLBACK_RAW)
    channel, payment = f"shop-{unique}", f"pay-{unique}"
    accepted_before = metric("webhook_callbacks_accepted_total")
    before = datetime.now(timezone.utc)

    response = await gateway.callback(channel, payment, SUCCESS_BODY, headers={"BusinessShortCode": "174379"})

    assert response.status_code == 200
    assert response.content == ACCEPTED_BODY
    assert response.headers["content-type"] == "application/json"
    assert metric("webhook_callbacks_accepted_total") == accepted_before + 1
    [seen] = await raw.collect(channel, until=count(1))
    record = seen.record
    assert seen.key == channel.encode()
    assert record["body"] == SUCCESS_BODY
    assert record["channel_id"] == channel and record["payment_id"] == payment
    assert record["path_params"] == {"channelId": channel, "paymentId": payment}
    assert record["path"] == f"/api/webhooks/mpesa/{channel}/{payment}/<token>"
    assert record["content_type"] == DARAJA_CONTENT_TYPE
    assert record["source_address"] == "127.0.0.1"
    assert record["rejection_reason"] is None and record["schema_version"] == 1
    assert before - timedelta(milliseconds=1) <= record["received_at"] <= datetime.now(timezone.utc)
    assert record["occurred_at"] == record["received_at"]
    assert_token_free(seen, token(channel, payment))


@pytest.mark.parametrize("body, content_type", [
    (b'{"Body": {"stkCallback": {"ResultCode": "SFC_IC0003"}}}', "application/json"),
    (b'{"unexpected": ["shape", 1, null]}', "text/plain"),
    (b"\xef\xbb\xbf{}", None),
])
async def test_the_content_is_not_judged_any_json_object_with_a_valid_token_is_published(start_gateway, tail, unique,
                                                                                         body, content_type):
    gateway, raw = await start_gateway(), tail(CALLBACK_RAW)
    channel = f"shop-{unique}"
    headers = {"Content-Type": content_type} if content_type else {}
    request = gateway.http.build_request("POST", gateway.base + callback_path(channel, "p1"), content=body,
                                         headers=headers)
    response = await gateway.http.send(request)
    assert response.status_code == 200 and response.content == ACCEPTED_BODY
    [seen] = await raw.collect(channel, until=count(1))
    assert seen.record["body"] == body
    assert seen.record["content_type"] == content_type


MALFORMED_BODIES = {
    "not UTF-8": b'{"Body": {"stkCallback": {"ResultDesc": "\xff\xfe"}}}',
    "UTF-16": '{"Body": {}}'.encode("utf-16"),
    "not JSON": b"\x00\xffthis is not json",
    "empty": b"",
    "a JSON array": b'[{"Body": {"stkCallback": {"ResultCode": 0}}}]',
    "a JSON string": b'"Body"',
    "nested 33 deep": b'{"Body": ' + b"[" * 32 + b"]" * 32 + b"}",
    "nested 100000 deep": b'{"Body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "NaN": b'{"Body": {"stkCallback": {"CallbackMetadata": {"Item": [{"Name": "Amount", "Value": NaN}]}}}}',
    "Infinity": b'{"Body": {"stkCallback": {"CallbackMetadata": {"Item": [{"Name": "Amount", "Value": Infinity}]}}}}',
    "1e999": b'{"Body": {"stkCallback": {"CallbackMetadata": {"Item": [{"Name": "Amount", "Value": 1e999}]}}}}',
}


@pytest.mark.parametrize("case", list(MALFORMED_BODIES))
async def test_a_body_that_is_not_a_bounded_json_object_is_refused_with_400_and_kept_for_forensics(
        start_gateway, tail, unique, case):
    gateway, raw, rejected = await start_gateway(), tail(CALLBACK_RAW), tail(CALLBACK_REJECTED)
    channel, payment = f"shop-{unique}", f"pay-{unique}"
    body = MALFORMED_BODIES[case][:MAX]  # the deepest case is cut to the size limit: still far too deep
    refused_before = metric("webhook_callbacks_rejected_total", reason="malformed_body")

    response = await gateway.callback(channel, payment, body)

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["title"] == "Bad request"
    assert metric("webhook_callbacks_rejected_total", reason="malformed_body") == refused_before + 1
    await assert_raw_topic_untouched(raw, gateway, channel)
    [kept] = await rejected.collect(channel, until=count(1))
    assert kept.record["rejection_reason"] == "malformed_body"
    assert kept.record["body"] == body and kept.record["payment_id"] == payment
    assert_token_free(kept, token(channel, payment))


def _forgeries(channel: str, payment: str) -> dict[str, tuple[str, int, str]]:
    """name -> (path, status, reason)"""
    valid = token(channel, payment)
    return {
        "no token, channel only": (f"/api/webhooks/mpesa/{channel}", 401, "missing_token"),
        "no token, channel and payment": (f"/api/webhooks/mpesa/{channel}/{payment}", 401, "missing_token"),
        "a valid token in the wrong shape": (f"/api/webhooks/mpesa/{channel}/{payment}/{valid}/x", 401,
                                             "missing_token"),
        "a token in the query string": (f"/api/webhooks/mpesa/{channel}/{payment}?token={valid}", 401,
                                        "missing_token"),
        "a made-up token": (f"/api/webhooks/mpesa/{channel}/{payment}/{'A' * 32}", 403, "bad_token"),
        "the token of another payment": (callback_path(channel, "another-payment"
                                                       ).replace("another-payment", payment), 403, "bad_token"),
        "the token of another channel": (callback_path("another-channel", payment
                                                       ).replace("another-channel", channel), 403, "bad_token"),
        "a token under a secret we never had": (callback_path(channel, payment, b"x" * 40), 403, "bad_token"),
        "a truncated token": (f"/api/webhooks/mpesa/{channel}/{payment}/{valid[:-1]}", 403, "bad_token"),
        "a non-ASCII token": (f"/api/webhooks/mpesa/{channel}/{payment}/%C3%A9{valid[2:]}", 403, "bad_token"),
    }


@pytest.mark.parametrize("forgery", list(_forgeries("c", "p")))
async def test_a_forged_callback_is_refused_publishes_nothing_and_is_kept_without_its_token(
        start_gateway, tail, unique, forgery):
    gateway, raw, rejected = await start_gateway(), tail(CALLBACK_RAW), tail(CALLBACK_REJECTED)
    channel, payment = f"shop-{unique}", f"pay-{unique}"
    path, status, reason = _forgeries(channel, payment)[forgery]
    refused_before = metric("webhook_callbacks_rejected_total", reason=reason)
    body = b'{"Body": {"stkCallback": {"ResultCode": 0, "forged": true}}}'

    response = await gateway.post(path, body)

    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == status
    assert metric("webhook_callbacks_rejected_total", reason=reason) == refused_before + 1
    await assert_raw_topic_untouched(raw, gateway, channel)
    [kept] = await rejected.collect(channel, until=count(1))
    assert kept.record["rejection_reason"] == reason
    assert kept.record["body"] == body
    assert kept.record["path_params"]["channelId"] == channel
    assert kept.record["path"].startswith(f"/api/webhooks/mpesa/{channel}")
    assert_token_free(kept, token(channel, payment), path.rsplit("/", 1)[1] if status == 403 else "<none>")


async def test_callbacks_under_the_previous_secret_are_accepted_during_rotation(start_gateway, tail, unique):
    gateway = await start_gateway(token_secrets=(SECRET, PREVIOUS_SECRET))
    raw = tail(CALLBACK_RAW)
    channel = f"shop-{unique}"

    assert (await gateway.post(callback_path(channel, "under-previous", PREVIOUS_SECRET))).status_code == 200
    assert (await gateway.post(callback_path(channel, "under-current", SECRET))).status_code == 200
    retired = await gateway.post(callback_path(channel, "under-retired", b"retired-secret-" + b"0" * 32))
    assert retired.status_code == 403

    seen = await raw.collect(channel, until=count(2))
    assert [s.record["payment_id"] for s in seen] == ["under-previous", "under-current"]


async def test_a_callback_from_a_source_not_on_the_allow_list_is_refused(start_gateway, tail, unique):
    strict = await start_gateway(allowed_sources=SAFARICOM)
    open_gateway, raw, rejected = await start_gateway(), tail(CALLBACK_RAW), tail(CALLBACK_REJECTED)
    channel = f"shop-{unique}"
    refused_before = metric("webhook_callbacks_rejected_total", reason="source_not_allowed")

    response = await strict.callback(channel, "p1", SUCCESS_BODY)

    assert response.status_code == 403
    assert metric("webhook_callbacks_rejected_total", reason="source_not_allowed") == refused_before + 1
    await assert_raw_topic_untouched(raw, open_gateway, channel)
    [kept] = await rejected.collect(channel, until=count(1))
    assert kept.record["rejection_reason"] == "source_not_allowed"
    assert kept.record["source_address"] == "127.0.0.1"
    assert_token_free(kept, token(channel, "p1"))


async def test_a_listed_source_is_accepted(start_gateway, unique):
    gateway = await start_gateway(allowed_sources=SAFARICOM + parse_networks("127.0.0.0/8"))
    assert (await gateway.callback(f"shop-{unique}", "p1")).status_code == 200


async def test_forwarded_for_is_believed_only_from_a_trusted_proxy(start_gateway, tail, unique):
    behind_proxy = await start_gateway(allowed_sources=SAFARICOM, trusted_proxies=parse_networks("127.0.0.1"))
    no_proxy = await start_gateway(allowed_sources=SAFARICOM)
    raw, rejected = tail(CALLBACK_RAW), tail(CALLBACK_REJECTED)
    channel = f"shop-{unique}"

    # From a trusted proxy, the hop it appended is the client.
    assert (await behind_proxy.callback(channel, "via-proxy", headers={"X-Forwarded-For": "196.201.212.69"})
            ).status_code == 200
    # A client cannot smuggle a Safaricom address in front of the one the proxy appended.
    spoofed = await behind_proxy.callback(channel, "spoofed-behind-proxy",
                                          headers={"X-Forwarded-For": "196.201.212.69, 203.0.113.9"})
    assert spoofed.status_code == 403
    # Nor can it claim one when the gateway trusts no proxy.
    direct = await no_proxy.callback(channel, "spoofed-direct", headers={"X-Forwarded-For": "196.201.212.69"})
    assert direct.status_code == 403

    [accepted] = await raw.collect(channel, until=count(1))
    assert accepted.record["payment_id"] == "via-proxy"
    assert accepted.record["source_address"] == "196.201.212.69"
    kept = await rejected.collect(channel, until=count(2))
    assert {(s.record["payment_id"], s.record["source_address"]) for s in kept} == {
        ("spoofed-behind-proxy", "203.0.113.9"), ("spoofed-direct", "127.0.0.1")}


async def test_a_body_over_64_kib_is_refused_with_413_and_kept_capped(start_gateway, tail, unique):
    gateway, raw, rejected = await start_gateway(), tail(CALLBACK_RAW), tail(CALLBACK_REJECTED)
    channel = f"shop-{unique}"
    refused_before = metric("webhook_callbacks_rejected_total", reason="too_large")
    at_limit, over_limit = b'{"a": "' + b"a" * (MAX - 9) + b'"}', b"b" * MAX + b"c" * 1000

    assert (await gateway.callback(channel, "at-limit", at_limit)).status_code == 200
    too_large = await gateway.callback(channel, "over-limit", over_limit)

    assert too_large.status_code == 413
    assert metric("webhook_callbacks_rejected_total", reason="too_large") == refused_before + 1
    assert (await gateway.callback(channel, "sentinel")).status_code == 200
    seen = await raw.collect(channel, until=has_payment("sentinel"))
    assert [s.record["payment_id"] for s in seen] == ["at-limit", "sentinel"]
    assert seen[0].record["body"] == at_limit
    [kept] = await rejected.collect(channel, until=count(1))
    assert kept.record["rejection_reason"] == "too_large"
    assert kept.record["body"] == over_limit[:MAX]


async def test_a_chunked_body_over_64_kib_is_refused_too(start_gateway, tail, unique):
    gateway, raw = await start_gateway(), tail(CALLBACK_RAW)
    channel = f"shop-{unique}"

    async def chunks():
        for _ in range(17):
            yield b"x" * 4096  # 68 KiB, no Content-Length

    response = await gateway.post(callback_path(channel, "chunked"), chunks())

    assert response.status_code == 413
    await assert_raw_topic_untouched(raw, gateway, channel)


async def test_a_source_over_its_rate_is_refused_with_429_and_only_counted(start_gateway, tail, unique):
    clock = FrozenClock()
    gateway = await start_gateway(rate_per_source_s=1.0, rate_burst=2, clock=clock,
                                  trusted_proxies=parse_networks("127.0.0.1"))
    raw, rejected = tail(CALLBACK_RAW), tail(CALLBACK_REJECTED)
    channel = f"shop-{unique}"
    limited_before = metric("webhook_callbacks_rejected_total", reason="rate_limited")

    def source(address: str) -> dict:
        return {"headers": {"X-Forwarded-For": address}}

    statuses = [(await gateway.callback(channel, f"a{i}", **source("203.0.113.1"))).status_code for i in range(3)]
    limited = await gateway.callback(channel, "a-limited", **source("203.0.113.1"))
    other_source = await gateway.callback(channel, "b0", **source("203.0.113.2"))
    clock.now += 1.0
    refilled = await gateway.callback(channel, "a-refilled", **source("203.0.113.1"))
    forged_from_fresh_source = await gateway.post(f"/api/webhooks/mpesa/{channel}/forged/{'A' * 32}",
                                                  **source("203.0.113.3"))

    assert statuses == [200, 200, 429]
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert limited.json()["status"] == 429
    assert metric("webhook_callbacks_rejected_total", reason="rate_limited") == limited_before + 2
    assert other_source.status_code == 200 and refilled.status_code == 200
    assert forged_from_fresh_source.status_code == 403
    seen = await raw.collect(channel, until=has_payment("a-refilled"))
    assert [s.record["payment_id"] for s in seen] == ["a0", "a1", "b0", "a-refilled"]
    # The forensic copy of the forgery arrives; the rate-limited ones were never written.
    kept = await rejected.collect(channel, until=has_payment("forged"))
    assert [s.record["rejection_reason"] for s in kept] == ["bad_token"]


async def test_ipv6_sources_share_one_bucket_per_64(start_gateway, tail, unique):
    clock = FrozenClock()
    gateway = await start_gateway(rate_per_source_s=1.0, rate_burst=2, clock=clock,
                                  trusted_proxies=parse_networks("127.0.0.1"))
    raw = tail(CALLBACK_RAW)
    channel = f"shop-{unique}"

    async def from_address(payment: str, address: str) -> int:
        return (await gateway.callback(channel, payment, headers={"X-Forwarded-For": address})).status_code

    # One host rotating through the addresses of its /64 spends one bucket.
    rotating = [await from_address(f"r{i}", f"2001:db8:1:2::{i + 1:x}") for i in range(2)]
    rotating.append(await from_address("r-limited", "2001:db8:1:2:ffff:ffff:ffff:ffff"))
    # The neighbouring /64 is someone else.
    neighbour = await from_address("n0", "2001:db8:1:3::1")

    assert rotating == [200, 200, 429] and neighbour == 200
    seen = await raw.collect(channel, until=has_payment("n0"))
    assert [s.record["payment_id"] for s in seen] == ["r0", "r1", "n0"]
    assert seen[0].record["source_address"] == "2001:db8:1:2::1"  # the address itself is kept, not its /64


async def test_when_kafka_does_not_acknowledge_the_answer_is_503_in_bounded_time(start_gateway, unique, codec):
    settings = GatewaySettings(token_secrets=(SECRET,), kafka_timeout_ms=500)
    nowhere = gateway_producer(f"127.0.0.1:{free_port()}", codec, settings)
    try:
        gateway = await start_gateway(producer=nowhere, kafka_timeout_ms=500)
        failures_before = metric("webhook_publish_failures_total", topic=CALLBACK_RAW.name)
        accepted_before = metric("webhook_callbacks_accepted_total")
        started = time.monotonic()

        response = await gateway.callback(f"shop-{unique}", "p1", SUCCESS_BODY)

        elapsed_s = time.monotonic() - started
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["title"] == "Service unavailable"
        assert 0.4 < elapsed_s < 3.0
        assert metric("webhook_publish_failures_total", topic=CALLBACK_RAW.name) == failures_before + 1
        assert metric("webhook_callbacks_accepted_total") == accepted_before
    finally:
        nowhere.close(timeout=1)


async def test_ops_routes_serve_health_and_the_gateway_metrics_without_tokens(start_gateway, unique):
    gateway = await start_gateway()
    channel = f"shop-{unique}"
    assert (await gateway.callback(channel, "p1")).status_code == 200

    health = await gateway.http.get(gateway.base + "/healthz")
    ready = await gateway.http.get(gateway.base + "/readyz")
    metrics = await gateway.http.get(gateway.base + "/metrics")

    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "failing": []}
    assert 'mpesa_pipeline_build_info{python="' in metrics.text
    assert 'webhook_callbacks_rejected_total{reason="rate_limited"}' in metrics.text
    assert "webhook_callbacks_accepted_total" in metrics.text
    assert 'http_request_seconds_count{route="/api/webhooks/mpesa/{channelId}/{paymentId}/{token}"}' in metrics.text
    assert token(channel, "p1") not in metrics.text and channel not in metrics.text


@pytest.mark.parametrize("raw_path, kept", [
    ("/api/webhooks/mpesa", ("/api/webhooks/mpesa", "", None)),
    ("/api/webhooks/mpesa/c1", ("/api/webhooks/mpesa/c1", "c1", None)),
    ("/api/webhooks/mpesa/c1/p1?token=secret", ("/api/webhooks/mpesa/c1/p1", "c1", "p1")),
    ("/api/webhooks/mpesa/c1/p1/secret/", ("/api/webhooks/mpesa/c1/p1/<token>/", "c1", "p1")),
    ("/api/webhooks/mpesa//p1/secret", ("/api/webhooks/mpesa//p1/<token>", "", "p1")),
    ("/api/webhooks/mpesa/c%201/p1/secret/more", ("/api/webhooks/mpesa/c 1/p1/<token>/<token>", "c 1", "p1")),
])
def test_the_path_kept_of_a_tokenless_request_holds_nothing_past_channel_and_payment(raw_path, kept):
    assert _redacted_path(raw_path) == kept


async def test_a_refused_request_logs_its_path_ids_only_as_safe_text(start_gateway, unique, caplog):
    gateway = await start_gateway()
    caplog.set_level(logging.DEBUG, logger="services.webhook_consumer.app")

    response = await gateway.post(f"/api/webhooks/mpesa/shop-{unique}%0Aforged%20line%E2%80%AE/pay%1B[31m/{'A' * 32}")

    assert response.status_code == 403
    [refused] = [r for r in caplog.records if r.getMessage().startswith("callback refused")]
    assert refused.channel_id == f"shop-{unique}\\u000aforged line\\u202e"
    assert refused.payment_id == "pay\\u001b[31m"
