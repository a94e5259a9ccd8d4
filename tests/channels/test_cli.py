"""The command line, run as a subprocess like an operator would: help, the channel life cycle with
secrets from stdin and the environment (never argv), API keys, and the vault commands."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from tests.channels.conftest import assert_no_secret, new_secrets
from tests.conftest import ROOT, database_url_of


@pytest.fixture
def run(infra, tmp_path, daraja_sandbox):
    env = {**os.environ, "DATABASE_URL": database_url_of(infra, "onboarding"),
           "VAULT_KEY_FILE": str(tmp_path / "v" / "kek.json"),
           "VAULT_PUBLIC_KEY_FILE": str(tmp_path / "v" / "kek.pub.json"), "DARAJA_BASE_URL": daraja_sandbox}
    for name in ("MPESA_CONSUMER_KEY", "MPESA_CONSUMER_SECRET", "MPESA_PASSKEY"):
        env.pop(name, None)

    def run(*args: str, stdin: str = "", extra_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, input=stdin,
                              capture_output=True, text=True, timeout=60, env={**env, **(extra_env or {})})
    return run


@pytest.mark.parametrize("args, expected", [
    ([], "channels"), (["channels"], "rotate-credentials"), (["keys"], "revoke"), (["vault"], "rotate-kek"),
    (["vault"], "retire-old"), (["vault", "rotate-kek"], "--webhooks"),
    (["channels", "set-credentials"], "--from-stdin"), (["channels", "create"], "--shortcode-type"),
])
def test_every_command_has_help(args, expected):
    result = subprocess.run([sys.executable, "-m", "services.cli", *args, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and expected in result.stdout


def test_a_channel_from_creation_to_activation(run, unique, tmp_path):
    channel_id, first, second = f"cli-{unique}", new_secrets(), new_secrets()
    assert run("vault", "init").returncode == 0
    assert stat.S_IMODE((tmp_path / "v" / "kek.json").stat().st_mode) == 0o600  # the fixture's VAULT_KEY_FILE
    created = run("channels", "create", channel_id, "--name", "Duka", "--shortcode-type", "till", "--shortcode",
                  "174379", "--till-number", "5123456", "--environment", "sandbox")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["status"] == "onboarding"

    stored = run("channels", "set-credentials", channel_id, "--from-stdin", stdin=json.dumps(first.body))
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout)["credentials"]["version"] == 1
    env = {"MPESA_CONSUMER_KEY": second.consumer_key, "MPESA_CONSUMER_SECRET": second.consumer_secret,
           "MPESA_PASSKEY": second.passkey}
    rotated = run("channels", "rotate-credentials", channel_id, extra_env=env)
    assert json.loads(rotated.stdout)["credentials"]["version"] == 2

    refused = run("channels", "resume", channel_id)
    assert refused.returncode == 1 and refused.stderr.splitlines()[0] == (
        f"mpesa-pipeline: channel '{channel_id}' cannot be activated yet: it lacks consentReference, "
        "agreementReference, agreementVersion, agreementSignedOn, lawfulBasis; nothing was changed")
    updated = run("channels", "update", channel_id, "--consent-reference", "AGR-7", "--consent-date", "2024-02-01",
                  "--confirm-success-by-query", "true", "--payer-data-retention-days", "30",
                  "--agreement-reference", "DPA-7", "--agreement-version", "1",
                  "--agreement-signed-on", "2024-02-01", "--lawful-basis", "contract",
                  "--analytics-metadata-keys", "cart, campaign")
    assert updated.returncode == 0, updated.stderr
    assert json.loads(updated.stdout)["confirmSuccessByQuery"] is True
    assert json.loads(updated.stdout)["payerDataRetentionDays"] == 30
    assert json.loads(updated.stdout)["analyticsMetadataKeys"] == ["cart", "campaign"]
    assert json.loads(run("channels", "resume", channel_id).stdout)["status"] == "active"
    listed = run("channels", "list")
    mine = [c for c in json.loads(listed.stdout) if c["channelId"] == channel_id]
    assert mine[0]["credentials"]["version"] == 2
    outputs = "".join(r.stdout + r.stderr for r in (created, stored, rotated, refused, updated, listed))
    assert_no_secret(outputs, *first.values, *second.values)


def test_bad_input_names_the_field_and_exits_1(run, unique):
    result = run("channels", "create", f"cli-{unique}", "--name", "Duka", "--shortcode-type", "till",
                 "--shortcode", "17437", "--environment", "sandbox")
    assert result.returncode == 1 and "tillNumber:" in result.stderr
    assert run("channels", "show", f"cli-{unique}").returncode == 1


def test_credentials_are_never_read_from_a_non_terminal_without_being_asked(run, unique):
    run("channels", "create", f"cli-{unique}", "--name", "Duka", "--shortcode-type", "paybill", "--shortcode",
        "174379", "--environment", "sandbox")
    result = run("channels", "set-credentials", f"cli-{unique}")
    assert result.returncode == 2 and "--from-stdin" in result.stderr


def test_api_keys_are_printed_once(run, unique):
    run("channels", "create", f"cli-{unique}", "--name", "Duka", "--shortcode-type", "paybill", "--shortcode",
        "174379", "--environment", "sandbox")
    issued = run("keys", "issue", "--label", "shop", "--channel", f"cli-{unique}")
    assert issued.returncode == 0 and "shown once" in issued.stderr
    key = json.loads(issued.stdout)
    assert key["apiKey"].startswith(f"mpk_{key['keyId']}_")
    listed = run("keys", "list")
    assert key["keyId"] in listed.stdout and key["apiKey"] not in listed.stdout
    assert json.loads(run("keys", "revoke", key["keyId"]).stdout)["revokedAt"]


def test_rotating_the_kek_from_the_command_line(run, unique):
    run("vault", "init")
    run("channels", "create", f"cli-{unique}", "--name", "Duka", "--shortcode-type", "paybill", "--shortcode",
        "174379", "--environment", "sandbox")
    run("channels", "set-credentials", f"cli-{unique}", "--from-stdin", stdin=json.dumps(new_secrets().body))
    before = json.loads(run("vault", "status").stdout)
    result = run("vault", "rotate-kek", "--retire-old")
    report = json.loads(result.stdout)
    assert report["rewrapped"] == 1 and report["failed"] == [], result.stdout
    assert report["retiredKeyIds"] == [before["activeKeyId"]]
    # Rows of other key files (other tests' channels in this shared database) are reported, not touched.
    assert result.returncode == (1 if report["versionsUnderKeysNotHeld"] else 0)
    after = json.loads(run("vault", "status").stdout)
    assert after["versionsPerKey"] == {report["activeKeyId"]: 1}


def test_admin_token_prints_a_token_and_its_hash():
    result = subprocess.run([sys.executable, "-m", "services.cli", "admin-token"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert hashlib.sha256(lines["ADMIN_TOKEN"].encode()).hexdigest() == lines["ADMIN_TOKEN_SHA256"]
    assert len(lines["ADMIN_TOKEN"]) >= 32
