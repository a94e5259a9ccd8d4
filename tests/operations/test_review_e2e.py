"""The issue's done-when for the review desk, end to end on the real broker and database: a payment
sent to Review by a contradiction (a success callback after the customer's cancel) is found by search,
queried, and resolved with its receipt through the admin API; the instruction goes to Kafka as the
onboarding-api principal, the ledger applies it (its consumer adapter fed from the topic), and the
audit entry and the status event carry who and why. Resolving twice, or a payment not in Review, is
refused and changes nothing.

These tests need the ledger side of operator instructions (part L of issue #16: OperatorCommand
facts, audit_log.actor, payment_status resolved_by); the desk's own logic is tested without it in
test_desk_db.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Consumer, TopicPartition

from services.common.kafka import ConsumedEvent, client_config, new_event_fields
from services.common.topics import OPERATOR_COMMAND, PAYMENT_STATUS
from services.operations.desk import KafkaCommands, ReviewDesk
from tests.conftest import kafka_login
from tests.operations.conftest import ADMIN, admin_app, audit_rows, make_payment, payment_row
from tests.platform.kafka_helpers import end_offsets


class OperatorTopicFeeder:
    """Reads mpesa.operator.command.v1 from where it ended when made, and hands each command to the
    ledger as its consumer loop would. Made before the test logs in as onboarding-api, which may not read."""

    def __init__(self, bootstrap: str, codec, ledger):
        self._codec, self._ledger = codec, ledger
        self._consumer = Consumer(client_config({"bootstrap.servers": bootstrap, "group.id": f"feeder-{uuid.uuid4()}",
                                                 "enable.auto.commit": False}))
        self._consumer.assign([TopicPartition(OPERATOR_COMMAND.name, p, end)
                               for p, end in end_offsets(bootstrap, OPERATOR_COMMAND.name).items()])
        self.fed: list[dict] = []

    async def run(self) -> None:
        while True:
            messages = await asyncio.to_thread(self._consumer.consume, 100, 0.2)
            events = []
            for msg in messages:
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                if msg.error() is None and topic is not None and partition is not None and offset is not None:
                    schema, value = self._codec.decode(msg.value())
                    events.append(ConsumedEvent(topic, partition, offset, msg.key(), schema, value, msg.value()))
            if events:
                self.fed += [e.value for e in events]
                await self._ledger.handle_batch(events)

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture
async def feeding(infra, codec, ledger):
    feeder = OperatorTopicFeeder(infra["KAFKA_BOOTSTRAP_SERVERS"], codec, ledger)
    task = asyncio.create_task(feeder.run())
    yield feeder
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    feeder.close()


@pytest.fixture
async def desk_client(infra, feeding, onboarding_pool, tmp_path, monkeypatch):
    """The admin API with the desk publishing as the onboarding-api principal (its only ACL: write
    the operator topic), waiting long enough for the fed ledger's verdict."""
    for name, value in kafka_login(infra, "onboarding-api").items():
        monkeypatch.setenv(name, value)
    commands = KafkaCommands(infra["KAFKA_BOOTSTRAP_SERVERS"], infra.get("SCHEMA_REGISTRY_URL", ""))
    desk = ReviewDesk(onboarding_pool, commands, verdict_wait_s=30.0)
    async with TestClient(TestServer(admin_app(onboarding_pool, desk, tmp_path))) as client:
        yield client
    await commands.close()


async def status_events(ledger_pool, codec, channel) -> list[dict]:
    async with ledger_pool.connection() as conn:
        rows = await (await conn.execute("SELECT payload FROM outbox WHERE key = %s AND topic = %s ORDER BY id",
                                         (channel.encode(), PAYMENT_STATUS.name))).fetchall()
    return [codec.decode(bytes(r[0]))[1] for r in rows]


async def test_a_review_payment_is_found_queried_and_settled_with_who_and_why_and_a_second_resolve_changes_nothing(
        desk_client, ledger, ledger_pool, pool, codec, unique):
    made = await make_payment(ledger, f"ch-{unique}")
    # Found by receipt, by phone as an operator types it, and by order reference.
    for query in ({"receipt": made.receipt}, {"phone": "0" + made.phone[3:]}, {"orderReference": made.order_reference}):
        found = await desk_client.get("/admin/payments", params=query, headers=ADMIN)
        assert [p["paymentId"] for p in (await found.json())["payments"]] == [made.payment_id], query

    # Queried: the ledger asks the STK worker (its outbox), the payment stays in Review.
    asked = await desk_client.post(f"/admin/payments/{made.payment_id}/query", headers=ADMIN,
                                   json={"reason": "customer says the SMS came", "operator": "wanjiku"})
    assert asked.status == 200, await asked.text()
    assert (await asked.json())["payment"]["state"] == "Review"

    # Resolved with the receipt: Settled, and who and why in the audit entry and the status event.
    body = {"outcome": "Settled", "mpesaReceipt": made.receipt, "reason": "M-Pesa statement shows it",
            "operator": "wanjiku"}
    settled = await desk_client.post(f"/admin/payments/{made.payment_id}/resolve", json=body, headers=ADMIN)
    assert settled.status == 200, await settled.text()
    answer = await settled.json()
    assert (answer["payment"]["state"], answer["payment"]["mpesaReceipt"]) == ("Settled", made.receipt)
    actor = "wanjiku via admin-api from 127.0.0.1"
    [entry] = [a for a in answer["payment"]["audit"] if a["eventId"] == answer["eventId"]]
    assert entry["actor"] == actor and "M-Pesa statement shows it" in entry["detail"]
    last = (await status_events(ledger_pool, codec, made.channel_id))[-1]
    assert (last["status"], last["resolved_by"], last["reason"]) == ("Settled", actor, "M-Pesa statement shows it")

    # Resolving again is refused before publishing, and changes nothing.
    before = (await payment_row(pool, made.payment_id), await audit_rows(pool, made.payment_id))
    again = await desk_client.post(f"/admin/payments/{made.payment_id}/resolve", json=body, headers=ADMIN)
    assert again.status == 409
    assert (await payment_row(pool, made.payment_id), await audit_rows(pool, made.payment_id)) == before


async def test_the_ledger_refuses_a_resolution_of_a_payment_not_in_review_and_changes_nothing(
        desk_client, feeding, ledger, producer, pool, unique):
    cancelled = await make_payment(ledger, f"ch-{unique}", review=False)
    before = await payment_row(pool, cancelled.payment_id)
    refused = await desk_client.post(f"/admin/payments/{cancelled.payment_id}/resolve", headers=ADMIN, json={
        "outcome": "Settled", "mpesaReceipt": cancelled.receipt, "reason": "r", "operator": "o"})
    assert refused.status == 409 and feeding.fed == []
    # Straight to the topic, past the desk's check: the ledger's rules are the authority.
    command = {**new_event_fields(cancelled.channel_id, cancelled.payment_id), "action": "SETTLE", "actor": "o via cli",
               "reason": "forged past the desk", "mpesa_receipt": cancelled.receipt}
    await producer.publish(OPERATOR_COMMAND, command)
    desk = ReviewDesk(pool, None)

    async def verdict():
        return await desk.verdict(cancelled.payment_id, command["event_id"])
    from tests.conftest import eventually
    seen = await eventually(verdict, timeout=30)
    assert seen["verdict"] == "rejected" and seen["detail"]
    assert await payment_row(pool, cancelled.payment_id) == before
