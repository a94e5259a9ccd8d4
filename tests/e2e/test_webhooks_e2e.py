"""End to end with status webhooks: payments requested at the ingress reach an upstream receiver
as signed webhooks, one per state they went through, in order, each once.

The receiver is examples/webhook_receiver.py, the README's example, which uses nothing of this
project (aiohttp and the standardwebhooks library): what it accepts, any receiver can verify."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from services.channels.vault import public_key_path
from services.channels.webhooks import WebhookManagement
from services.notifier.destinations import DestinationPolicy, parse_networks
from tests.conftest import ROOT, eventually, free_port
from tests.e2e.stack import running
from tests.e2e.test_pipeline import final_state, pay, state


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    yield from running(infra, tmp_path_factory.mktemp("e2e-webhooks"), with_notifier=True)


class Receiver:
    """examples/webhook_receiver.py in a process of its own; `events` are the lines it printed."""

    def __init__(self, secret: str, port: int):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "webhook_receiver.py"),
                                      "--port", str(port)], cwd=ROOT, text=True,
                                     env={**os.environ, "WEBHOOK_SECRET": secret},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        threading.Thread(target=self.lines.extend, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + 30
        while not _listening(port):
            assert time.monotonic() < deadline and self.proc.poll() is None, f"receiver did not start: {self.lines}"
            time.sleep(0.05)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
async def subscribed(stack, onboarding_pool, pool):
    """A channel with an API key and one webhook endpoint, whose receiver is running."""
    channel_id = f"e2e-wh-{stack.unique}"
    api_key = await stack.onboard(pool, channel_id)
    management = WebhookManagement(onboarding_pool, public_key_file=public_key_path(stack.webhooks_key_file),
                                   policy=DestinationPolicy(parse_networks("127.0.0.0/8")))
    port = free_port()
    # The secret is shown once, here; the receiver gets it as an upstream operator would paste it.
    record, secret = await management.add_endpoint(channel_id, {"url": f"http://127.0.0.1:{port}/mpesa"}, "tests")
    receiver = Receiver(secret, port)
    yield (channel_id, api_key), receiver, record
    receiver.stop()


async def test_each_payment_reaches_the_receiver_as_its_states_in_order(stack, subscribed, pool):
    channel, receiver, endpoint = subscribed
    paid = [await pay(stack, channel, phone) for phone in ("254700000000", "254700001032", "254711000777")]
    finals = await asyncio.gather(*(final_state(stack, channel, payment_id) for payment_id, _ in paid))
    assert [f["state"] for f in finals] == ["Settled", "Cancelled", "Settled"]

    async def announced_in_full():
        events = receiver.events()
        return events if {e["paymentId"] for e in events if e["state"] in ("Settled", "Cancelled")} \
            >= {p for p, _ in paid} else None
    await eventually(announced_in_full, timeout=60, interval=0.2)
    events = receiver.events()
    for payment_id, _ in paid:
        history = [h["state"] for h in (await state(stack, channel, payment_id))["history"]]
        delivered = [e["state"] for e in events if e["paymentId"] == payment_id]
        assert delivered == [s for s in history if s != "Requested"], (payment_id, history, delivered)
        settled = [e for e in events if e["paymentId"] == payment_id and e["state"] == "Settled"]
        assert all(e["type"] == "payment.settled" and e["mpesaReceipt"] for e in settled)
    # Once each: every delivery row of the endpoint delivered at its first attempt, none pending.
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT state, attempts, webhook_id FROM webhook_deliveries WHERE endpoint_id = %s",
            (endpoint.endpoint_id,))).fetchall()
    assert sorted(r[0] for r in rows) == ["delivered"] * len(events)
    assert {r[2] for r in rows} == {e["webhookId"] for e in events}
