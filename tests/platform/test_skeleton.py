"""The walking skeleton: POST a payment to the ingress, the ledger stores it, GET shows Requested."""
from __future__ import annotations

import uuid

import httpx

from services.common.topics import CALLBACK_RAW, PAYMENT_REQUESTED, STK_PUSH_RESULT, STK_QUERY_RESULT
from tests.conftest import eventually, free_port, service_env, start_service
from tests.ingress.conftest import make_api_key, make_channel
from tests.platform.kafka_helpers import start_group_at_end


async def test_post_then_get_shows_a_requested_payment(infra, pool, unique):
    channel_id = f"shop-{unique}"
    await make_channel(pool, channel_id)
    auth = {"Authorization": f"Bearer {await make_api_key(pool, channel_id)}"}
    start_group_at_end(infra["KAFKA_BOOTSTRAP_SERVERS"], f"ledger-{unique}",
                       [t.name for t in (PAYMENT_REQUESTED, STK_PUSH_RESULT, CALLBACK_RAW, STK_QUERY_RESULT)])
    port = free_port()
    env = service_env(infra, INGRESS_PORT=port, LEDGER_GROUP_ID=f"ledger-{unique}", LEDGER_METRICS_PORT=free_port())
    ingress, ledger = start_service("services.ingress", env), start_service("services.ledger", env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            await eventually(lambda: _healthy(http))
            created = await http.post("/api/payments", headers={**auth, "Idempotency-Key": str(uuid.uuid4())}, json={
                "channelId": channel_id, "amount": 150, "phone": "0712 345 678",
                "accountReference": "INV-42", "description": "Shoes", "orderReference": "ord-1"})
            assert created.status_code == 202, created.text
            payment_id = created.json()["paymentId"]
            assert created.json()["state"] == "Requested"

            shown = await eventually(lambda: _recorded(http, payment_id, auth), timeout=30)
            assert shown["state"] == "Requested"
            assert shown["amount"] == 150 and shown["channelId"] == channel_id
            assert [h["state"] for h in shown["history"]] == ["Requested"]
    finally:
        for proc in (ingress, ledger):
            proc.terminate()
        for proc in (ingress, ledger):
            assert proc.wait(timeout=30) == 0, proc.output()


async def _healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def _recorded(http: httpx.AsyncClient, payment_id: str, auth: dict):
    """The ingress answers Requested even before the ledger has it; wait for the ledger's history."""
    response = await http.get(f"/api/payments/{payment_id}", headers=auth)
    return response.json() if response.status_code == 200 and response.json()["history"] else None
