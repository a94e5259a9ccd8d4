"""`mpesa-pipeline payments` as an operator runs it: a subprocess on the real database (onboarding
role) and broker (onboarding-api principal). Output is a table or JSON; a refusal, bad input or an
unreachable database is one line on stderr, never a traceback, and never the payer's full number."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, database_url_of, kafka_login, service_env
from tests.operations.conftest import make_payment


def run(infra, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    environ = service_env(infra, **{"DATABASE_URL": database_url_of(infra, "onboarding"),
                                    "OPERATOR_VERDICT_WAIT_S": "1", **kafka_login(infra, "onboarding-api"), **env})
    return subprocess.run([sys.executable, "-m", "services.cli", "payments", *args], cwd=ROOT, env=environ,
                          input=stdin, capture_output=True, text=True, timeout=120)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("mpesa-pipeline payments: ")
    return lines[0]


async def test_an_operator_finds_a_review_payment_by_phone_and_sees_it_masked(infra, ledger, unique):
    made = await make_payment(ledger, f"ch-{unique}")
    listed = run(infra, "list", "--phone", "0" + made.phone[3:])
    assert listed.returncode == 0, listed.stderr
    assert made.payment_id in listed.stdout and "*********" + made.phone[-3:] in listed.stdout
    from_stdin = run(infra, "list", "--phone", "-", "--json", stdin="+" + made.phone + "\n")
    assert [p["paymentId"] for p in json.loads(from_stdin.stdout)["payments"]] == [made.payment_id]
    shown = run(infra, "show", made.payment_id)
    assert shown.returncode == 0 and "Review" in shown.stdout and made.receipt in shown.stdout
    for done in (listed, from_stdin, shown):
        assert made.phone[3:] not in done.stdout + done.stderr


async def test_resolving_a_payment_not_in_review_is_one_line_and_exit_1(infra, ledger, unique):
    cancelled = await make_payment(ledger, f"ch-{unique}", review=False)
    done = run(infra, "resolve", cancelled.payment_id, "--outcome", "Cancelled", "--reason", "dup", "--operator", "o")
    assert done.returncode == 1 and "only a payment in Review" in one_line_error(done)


async def test_a_query_is_sent_as_the_onboarding_api_principal_with_the_cli_actor(infra, ledger, unique):
    made = await make_payment(ledger, f"ch-{unique}")
    done = run(infra, "query", made.payment_id, "--reason", "customer called", "--operator", "wanjiku", "--json")
    # Kafka acknowledged it (the principal may write the topic); no ledger runs here to decide it.
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["status"] == "accepted"


def test_bad_input_is_one_line_and_exit_2(infra):
    for args in (["list", "--state", "review"], ["list", "--phone", "0812"], ["list", "--cursor", "forged"],
                 ["resolve", "p-1", "--outcome", "Settled", "--reason", "r", "--operator", "o"],
                 ["query", "p-1", "--reason", "r", "--operator", "eve via cli"]):
        done = run(infra, *args)
        assert done.returncode == 2, (args, done.stderr)
        line = one_line_error(done)
        assert "0812" not in line


def test_an_unreachable_database_is_one_line(infra):
    done = run(infra, "list", DATABASE_URL="postgresql://onboarding@127.0.0.1:9/mpesa")
    assert done.returncode == 1 and "cannot reach PostgreSQL" in one_line_error(done)


def test_the_help_lists_the_allowed_states_and_formats(infra):
    helped = " ".join(run(infra, "list", "--help").stdout.split())  # as argparse wraps it
    assert "Requested, Pending, Settled, Cancelled, Failed, Review" in helped and "{table,json}" in helped
    assert "{Cancelled,Settled}" in run(infra, "resolve", "--help").stdout
