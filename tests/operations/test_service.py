"""`python -m services.channels` with the review desk: Kafka and the schema registry unreachable do
not stop it starting or serving its channel routes; an instruction then answers 503 and says why, as it
does when the Kafka client cannot be made."""
from __future__ import annotations

import hashlib
import secrets

import httpx

from tests.channels.test_service import _healthy
from tests.conftest import eventually, free_port, service_env, start_service
from tests.operations.conftest import make_payment


async def test_without_kafka_the_api_serves_channels_and_payments_and_refuses_instructions_with_503(
        infra, ledger, tmp_path, unique):
    made = await make_payment(ledger, f"ch-{unique}")
    token, port = secrets.token_urlsafe(32), free_port()
    env = service_env(infra, ADMIN_PORT=port, ADMIN_TOKEN_SHA256=hashlib.sha256(token.encode()).hexdigest(),
                      VAULT_PUBLIC_KEY_FILE=tmp_path / "absent.pub.json", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",
                      SCHEMA_REGISTRY_URL=f"http://127.0.0.1:{free_port()}/apis/ccompat/v7")
    env.pop("ADMIN_TOKEN", None)
    service = start_service("services.channels", env)
    admin = {"Authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=admin) as http:
            await eventually(lambda: _healthy(http))
            assert (await http.get("/admin/channels")).status_code == 200
            found = await http.get("/admin/payments", params={"receipt": made.receipt})
            assert [p["paymentId"] for p in found.json()["payments"]] == [made.payment_id]
            asked = await http.post(f"/admin/payments/{made.payment_id}/query",
                                    json={"reason": "customer called", "operator": "otieno"})
            assert asked.status_code == 503 and "schema registry" in asked.json()["detail"]
            assert (await http.get("/admin/channels")).status_code == 200
    finally:
        service.terminate()
        output = service.communicate(timeout=30)[0]
        assert service.returncode == 0, output
    assert made.phone[3:] not in output


async def test_a_kafka_client_setting_librdkafka_refuses_is_a_503_not_a_500(monkeypatch):
    from services.operations.desk import KafkaCommands
    from services.operations.model import Unavailable
    monkeypatch.setenv("KAFKA_CLIENT_SECURITY_PROTOCOL", "carrier-pigeon")
    commands = KafkaCommands("127.0.0.1:9", "")
    try:
        await commands.send({"event_id": "e", "channel_id": "c"})
        raise AssertionError("expected Unavailable")
    except Unavailable as error:
        assert "misconfigured" in error.detail
    finally:
        await commands.close()


async def test_kafka_not_acknowledging_an_instruction_is_a_503_that_says_it_may_still_arrive():
    from services.common.kafka import new_event_fields
    from services.operations.desk import KafkaCommands
    from services.operations.model import Unavailable
    commands = KafkaCommands("127.0.0.1:9", "", delivery_timeout_ms=1000)
    record = {**new_event_fields("c", "p"), "action": "QUERY", "actor": "o via cli", "reason": "r",
              "mpesa_receipt": None}
    try:
        await commands.send(record)
        raise AssertionError("expected Unavailable")
    except Unavailable as error:
        assert record["event_id"] in error.detail and "may or may not reach the ledger" in error.detail
    finally:
        await commands.close()
