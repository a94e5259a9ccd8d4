"""Readiness tells the truth about Kafka: with a broker of its own that the test stops and starts
again (beside the shared one, which other tests use), the webhook gateway and the workers (STK
worker, ledger, notifier), each its own process, answer /readyz 503 naming the failing check within
10 s of the broker going away, stay alive (/healthz 200) meanwhile, and answer 200 again once the
broker is back."""
from __future__ import annotations

import os
import subprocess
import uuid

import httpx
import pytest

from tests.conftest import ROOT, eventually
from tests.e2e.stack import Stack

# A broker of this test's own: its ports (free for it on the development machine) and its state
# directory; infra/kafka.sh shares the jars and TLS material of the session's broker.
PORT = int(os.environ.get("TEST_STOPPABLE_KAFKA_PORT", "19592"))
CONTROLLER_PORT = int(os.environ.get("TEST_STOPPABLE_KAFKA_CONTROLLER_PORT", "19593"))
WORKERS = {"gateway": "services.webhook_consumer", "worker": "services.stk_worker", "ledger": "services.ledger",
           "notifier": "services.notifier"}


class StoppableKafka:
    def __init__(self, state_dir):
        self.env = {**os.environ, "KAFKA_DIR": str(state_dir), "KAFKA_PORT": str(PORT),
                    "KAFKA_CONTROLLER_PORT": str(CONTROLLER_PORT)}

    def run(self, action: str) -> None:
        done = subprocess.run(["bash", str(ROOT / "infra" / "kafka.sh"), action], env=self.env, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, f"kafka.sh {action} failed:\n{done.stderr}"


@pytest.fixture(scope="module")
def kafka(tmp_path_factory, infra):  # infra: the TLS material and the principals' passwords exist
    broker = StoppableKafka(tmp_path_factory.mktemp("stoppable-kafka"))
    broker.run("start")
    try:
        yield broker
    finally:
        broker.run("stop")


@pytest.fixture(scope="module")
def stack(infra, kafka, tmp_path_factory):
    own = {**infra, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{PORT}"}
    s = Stack(own, tmp_path_factory.mktemp("readiness"), uuid.uuid4().hex[:10], with_notifier=True)
    try:
        for name, module in WORKERS.items():
            s.start_one(name, module)
        yield s
    finally:
        for name, output in s.stop().items():
            print(f"----- {name}\n" + "\n".join(line for line in output.splitlines()[-30:] if not line.startswith("%")))


async def answers(stack: Stack, path: str) -> dict[str, tuple[int, list[str]]]:
    """Each service's status and failing checks at `path` (status 0: no answer at all)."""
    result = {}
    async with httpx.AsyncClient(timeout=2, trust_env=False) as http:
        for name in WORKERS:
            try:
                answer = await http.get(f"http://127.0.0.1:{stack.ports[name]}{path}")
                result[name] = (answer.status_code, answer.json().get("failing", []))
            except httpx.TransportError:
                result[name] = (0, [])
    return result


def all_ready_answer(stack: Stack, status: int):
    async def check():
        now = await answers(stack, "/readyz")
        return now if all(code == status for code, _ in now.values()) else None
    return check


async def test_readiness_follows_kafka_going_away_and_coming_back(stack, kafka):
    # Ready once each has a broker connection, its assignment and its database.
    await eventually(all_ready_answer(stack, 200), timeout=120, interval=0.5)

    # Kafka goes away: within 10 s every one says so, naming its Kafka checks, and stays alive.
    kafka.run("stop")
    down = await eventually(all_ready_answer(stack, 503), timeout=10, interval=0.2)
    assert all("kafka_producer" in failing for _, failing in down.values()), down
    assert all("database" not in failing for _, failing in down.values()), down
    assert {name: code for name, (code, _) in (await answers(stack, "/healthz")).items()} == dict.fromkeys(WORKERS, 200)

    # Kafka is back: ready again, without a restart of any service.
    kafka.run("start")
    await eventually(all_ready_answer(stack, 200), timeout=90, interval=0.5)
    assert all(proc.poll() is None for proc in stack.procs.values())
