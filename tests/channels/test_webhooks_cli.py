"""`mpesa-pipeline webhooks ...`, run as a subprocess like an operator would: an endpoint's life
from creation to deletion, the secret printed once, the delivery log and redelivery."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.channels.vault import public_key_path
from tests.channels.conftest import LOOPBACK_NETWORKS, assert_no_secret, insert_delivery
from tests.conftest import ROOT, database_url_of


@pytest.fixture
def run(infra, tmp_path, webhook_key_file, webhook_provider):
    env = {**os.environ, "DATABASE_URL": database_url_of(infra, "onboarding"),
           "WEBHOOK_VAULT_PUBLIC_KEY_FILE": str(public_key_path(webhook_key_file)),
           "WEBHOOK_ALLOWED_NETWORKS": LOOPBACK_NETWORKS}

    def run(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env={**env, **(extra_env or {})})
    return run


def ok(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("args, expected", [
    (["webhooks"], "rotate-secret"), (["webhooks", "redeliver"], "--since"), (["webhooks", "add"], "--event"),
])
def test_every_webhook_command_has_help(args, expected):
    result = subprocess.run([sys.executable, "-m", "services.cli", *args, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and expected in result.stdout


def test_an_endpoint_from_creation_to_deletion(run, unique):
    channel_id = f"cli-hooks-{unique}"
    ok(run("channels", "create", channel_id, "--name", "Duka", "--shortcode-type", "paybill", "--shortcode",
           "174379", "--environment", "sandbox"))
    added = run("webhooks", "add", channel_id, "--url", "http://127.0.0.1:8099/hook", "--event", "payment.settled",
                "--event", "payment.failed", "--description", "ERP")
    endpoint = ok(added)
    secret, endpoint_id = endpoint["secret"], endpoint["endpointId"]
    assert secret.startswith("whsec_") and "shown once" in added.stderr
    assert endpoint["eventTypes"] == ["payment.settled", "payment.failed"]

    outputs = [run("webhooks", "list", channel_id), run("webhooks", "show", endpoint_id)]
    assert [e["endpointId"] for e in ok(outputs[0])] == [endpoint_id]
    outputs.append(run("webhooks", "update", endpoint_id, "--clear-description", "--event", "payment.settled"))
    assert ok(outputs[-1])["description"] is None
    rotated = run("webhooks", "rotate-secret", endpoint_id, "--overlap", "600")
    new_secret = ok(rotated)["secret"]
    assert [s["version"] for s in ok(rotated)["signingSecrets"]] == [2, 1] and new_secret != secret
    outputs.append(run("webhooks", "disable", endpoint_id, "--reason", "receiver moving"))
    assert ok(outputs[-1])["disabledReason"] == "receiver moving"
    outputs.append(run("webhooks", "enable", endpoint_id))
    assert ok(outputs[-1])["status"] == "enabled"
    outputs.append(run("webhooks", "delete", endpoint_id))
    assert ok(outputs[-1])["status"] == "deleted"
    assert ok(run("webhooks", "list", channel_id)) == []
    assert [e["status"] for e in ok(run("webhooks", "list", channel_id, "--all"))] == ["deleted"]
    everything = "".join(r.stdout + r.stderr for r in outputs)
    assert_no_secret(everything, secret, new_secret)


def test_refusals_name_the_field_and_exit_1(run, unique):
    channel_id = f"cli-hooks-{unique}"
    ok(run("channels", "create", channel_id, "--name", "Duka", "--shortcode-type", "paybill", "--shortcode",
           "174379", "--environment", "sandbox"))
    refused = run("webhooks", "add", channel_id, "--url", "https://169.254.169.254/latest/meta-data/")
    assert refused.returncode == 1 and "url:" in refused.stderr and "not a public address" in refused.stderr
    strict = run("webhooks", "add", channel_id, "--url", "http://127.0.0.1:8099/hook",
                 extra_env={"WEBHOOK_ALLOWED_NETWORKS": ""})
    assert strict.returncode == 1 and "url:" in strict.stderr
    unknown = run("webhooks", "add", channel_id, "--url", "http://127.0.0.1:8099/hook", "--event", "payment.lost")
    # Refused by the option itself (a usage error), which names the event types there are.
    assert unknown.returncode == 2 and "'payment.lost'" in unknown.stderr and "payment.settled" in unknown.stderr
    assert ok(run("webhooks", "list", channel_id)) == []
    assert run("webhooks", "redeliver", "--since", "2026-01-01T00:00:00Z").returncode == 2  # which endpoint?


async def test_the_delivery_log_and_redelivery_from_the_command_line(run, unique, pool):
    channel_id = f"cli-hooks-{unique}"
    ok(run("channels", "create", channel_id, "--name", "Duka", "--shortcode-type", "paybill", "--shortcode",
           "174379", "--environment", "sandbox"))
    endpoint_id = ok(run("webhooks", "add", channel_id, "--url", "http://127.0.0.1:8099/hook"))["endpointId"]
    parked = await insert_delivery(pool, endpoint_id, channel_id, state="parked", attempts=5)
    delivered = await insert_delivery(pool, endpoint_id, channel_id, state="delivered")
    log = ok(run("webhooks", "deliveries", endpoint_id, "--state", "parked"))
    assert [d["deliveryId"] for d in log["deliveries"]] == [str(parked["id"])]
    shown = ok(run("webhooks", "attempts", str(parked["id"])))
    assert shown["body"]["data"]["eventId"] == parked["event_id"] and shown["attemptLog"] == []
    assert ok(run("webhooks", "redeliver", "--delivery", str(parked["id"])))["requeued"] == 1
    assert ok(run("webhooks", "redeliver", endpoint_id, "--event-id", delivered["event_id"]))["requeued"] == 1
    again = ok(run("webhooks", "redeliver", endpoint_id, "--since", "2026-01-01T00:00:00Z"))
    assert again["requeued"] == 2  # both are pending now, unleased: made due at once
    assert ok(run("webhooks", "deliveries", endpoint_id, "--state", "pending", "--limit", "1"))["nextCursor"]
