"""The whole pipeline as separate processes on loopback: Daraja sandbox, webhook gateway, STK worker,
ledger and ingress, each with its own consumer groups starting at the topics' current end, and each
logged in to Kafka as its own principal (so a topic outside a service's ACLs fails the test).

`instances` starts several processes of the gateway, the worker and the ledger, as `make run
GATEWAYS= WORKERS= LEDGERS=` does (services/devstack.py instance_ports): the first of each keeps the
service's name ("worker"), the others are "worker-2", "worker-3"...; each has a metrics port of its own,
and the gateways share the callback port (SO_REUSEPORT), each with its own ops port."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.channels.onboarding import Onboarding
from services.channels.vault import LocalKeyFileProvider, public_key_path
from services.common.topics import (
    CALLBACK_RAW,
    PAYMENT_REQUESTED,
    PAYMENT_STATUS,
    STK_PUSH_RESULT,
    STK_QUERY_REQUESTED,
    STK_QUERY_RESULT,
)
from services.daraja_sandbox.settings import ADMIN_TOKEN_ENV, DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY
from tests.conftest import ROOT, free_port, kafka_login, service_env, start_service
from tests.platform.kafka_helpers import start_group_at_end

PRINCIPALS = {"gateway": "webhook-gateway", "ledger": "ledger", "worker": "stk-worker", "ingress": "ingress",
              "notifier": "notifier"}
MODULES = {"gateway": "services.webhook_consumer", "ledger": "services.ledger", "worker": "services.stk_worker",
           "ingress": "services.ingress", "notifier": "services.notifier"}
METRICS_PORTS = {"ledger": "LEDGER_METRICS_PORT", "worker": "STK_WORKER_METRICS_PORT",
                 "notifier": "NOTIFIER_METRICS_PORT"}
SCALABLE = ("gateway", "worker", "ledger")


@dataclass
class Stack:
    infra: dict
    tmp: Path
    unique: str
    sandbox_args: list[str] = field(default_factory=list)
    extra_env: dict = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    sandbox_admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    with_notifier: bool = False  # also the notifier (status webhooks), with its own vault key
    instances: dict[str, int] = field(default_factory=dict)  # processes of "gateway", "worker", "ledger" (1)

    def __post_init__(self):
        self.ports = {name: free_port() for name in ("sandbox", "gateway", "ingress", "ledger", "worker", "notifier")}
        self.ports.update({name: free_port() for name in self.names() if name not in self.ports})
        if self.instances.get("gateway", 1) > 1:  # the callback port is shared: each its own ops port
            self.ports.update({f"{name}-ops": free_port() for name in self.names("gateway")})
        self.key_file = self.tmp / "vault" / "kek.json"
        LocalKeyFileProvider.open(self.key_file, create=True)
        self.webhooks_key_file = self.tmp / "vault" / "webhooks-kek.json"
        LocalKeyFileProvider.open(self.webhooks_key_file, create=True)
        self.env = service_env(
            self.infra, WEBHOOK_PORT=self.ports["gateway"], INGRESS_PORT=self.ports["ingress"],
            LEDGER_METRICS_PORT=self.ports["ledger"], STK_WORKER_METRICS_PORT=self.ports["worker"],
            LEDGER_GROUP_ID=f"ledger-{self.unique}", STK_WORKER_GROUP_ID=f"stk-worker-{self.unique}",
            DARAJA_BASE_URL=self.sandbox_url, CALLBACK_PUBLIC_BASE_URL=self.gateway_url,
            WEBHOOK_TOKEN_SECRETS=secrets.token_hex(32), VAULT_KEY_FILE=str(self.key_file),
            MPESA_ENVIRONMENT="sandbox", INGRESS_AUTH_CACHE_TTL_S="0.1", LEDGER_QUERY_AFTER_S="1", STK_MAX_ATTEMPTS="3",
            DARAJA_READ_TIMEOUT_S="5", NOTIFIER_METRICS_PORT=self.ports["notifier"],
            NOTIFIER_GROUP_ID=f"notifier-{self.unique}", NOTIFIER_VAULT_KEY_FILE=str(self.webhooks_key_file),
            WEBHOOK_VAULT_PUBLIC_KEY_FILE=str(public_key_path(self.webhooks_key_file)),
            WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8", **self.extra_env)

    sandbox_url = property(lambda self: f"http://127.0.0.1:{self.ports['sandbox']}")
    gateway_url = property(lambda self: f"http://127.0.0.1:{self.ports['gateway']}")
    ingress_url = property(lambda self: f"http://127.0.0.1:{self.ports['ingress']}")
    # What a call to the sandbox's admin API (/sandbox/..., health aside) must carry.
    sandbox_admin_headers = property(lambda self: {"Authorization": f"Bearer {self.sandbox_admin_token}"})

    def start(self) -> None:
        bootstrap = self.infra["KAFKA_BOOTSTRAP_SERVERS"]
        start_group_at_end(bootstrap, f"ledger-{self.unique}", [t.name for t in (
            PAYMENT_REQUESTED, STK_PUSH_RESULT, CALLBACK_RAW, STK_QUERY_RESULT)])
        start_group_at_end(bootstrap, f"stk-worker-{self.unique}", [PAYMENT_REQUESTED.name])
        start_group_at_end(bootstrap, f"stk-worker-{self.unique}-queries", [STK_QUERY_REQUESTED.name])
        start_group_at_end(bootstrap, f"notifier-{self.unique}", [PAYMENT_STATUS.name])
        self.procs["sandbox"] = subprocess.Popen(
            [sys.executable, "-m", "services.daraja_sandbox", "--port", str(self.ports["sandbox"]),
             "--callback-delay-ms", "300", *self.sandbox_args], cwd=ROOT,
            env={**os.environ, ADMIN_TOKEN_ENV: self.sandbox_admin_token},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for service in ("gateway", "ledger", "worker", "ingress", *(["notifier"] if self.with_notifier else [])):
            for name in self.names(service):
                self.start_one(name)
        for url in (f"{self.sandbox_url}/sandbox/health", f"{self.gateway_url}/healthz", f"{self.ingress_url}/healthz",
                    *[f"{self.ops_url(name)}/healthz" for name in self.procs if name not in ("sandbox", "ingress")]):
            wait_for(url)

    def names(self, service: str | None = None) -> list[str]:
        """The processes of a service (of every scalable one by default): "worker", "worker-2", ..."""
        services = [service] if service else SCALABLE
        return [s if n == 1 else f"{s}-{n}" for s in services for n in range(1, self.instances.get(s, 1) + 1)]

    def ops_url(self, name: str) -> str:
        """Where the process `name` serves /metrics, /healthz and /readyz."""
        port = self.ports.get(f"{name}-ops") or self.ports[name]
        return f"http://127.0.0.1:{port}"

    def start_one(self, name: str, module: str | None = None) -> None:
        service = name.partition("-")[0]
        own: dict[str, str] = {}
        if f"{name}-ops" in self.ports:
            own = {"WEBHOOK_REUSE_PORT": "true", "WEBHOOK_METRICS_PORT": str(self.ports[f"{name}-ops"])}
        elif service in METRICS_PORTS:
            own = {METRICS_PORTS[service]: str(self.ports[name])}
        # start_service swaps the tests' DATABASE_URL (the migration role's) for the service's own role.
        self.procs[name] = start_service(module or MODULES[service],
                                         {**self.env, **kafka_login(self.infra, PRINCIPALS[service]), **own})

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> dict[str, str]:
        outputs = {}
        for proc in self.procs.values():
            proc.terminate()
        for name, proc in self.procs.items():
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            outputs[name] = out or ""
            (self.tmp / f"{name}.log").write_text(outputs[name])  # kept with pytest's last temp dirs
        return outputs

    async def onboard(self, pool, channel_id: str) -> str:
        """A channel on the sandbox's demo app (shortcode 174379); returns an API key for it."""
        onboarding = Onboarding(pool, public_key_file=public_key_path(self.key_file))
        await onboarding.create_channel({
            "channelId": channel_id, "displayName": "E2E Duka", "shortcodeType": "paybill",
            "businessShortcode": "174379", "environment": "sandbox", "consentReference": "AGR-E2E",
            "consentDate": "2026-01-01", "agreementReference": "DPA-E2E", "agreementVersion": "1",
            "agreementSignedOn": "2026-01-01", "lawfulBasis": "contract"}, "tests")
        await onboarding.set_credentials(channel_id, {"consumerKey": DEMO_CONSUMER_KEY,
                                                      "consumerSecret": DEMO_CONSUMER_SECRET,
                                                      "passkey": SANDBOX_PASSKEY}, "tests")
        await onboarding.resume(channel_id, "tests")
        _, api_key = await onboarding.issue_api_key({"label": "e2e", "channelIds": [channel_id]}, "tests")
        return api_key


def running(infra: dict, tmp: Path, *, with_notifier: bool = False, **options):
    """A started stack for a module's fixture (`yield from running(...)`); at the end its services
    are stopped and the last lines of each log printed (the whole logs stay in `tmp`)."""
    s = Stack(infra, tmp, uuid.uuid4().hex[:10], with_notifier=with_notifier, **options)
    s.start()
    try:
        yield s
    finally:
        for name, output in s.stop().items():
            print(f"----- {name}\n" + "\n".join(line for line in output.splitlines()[-40:] if not line.startswith("%")))


def wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become healthy")


def new_reference() -> str:
    return uuid.uuid4().hex[:12].upper()
