"""The command line when PostgreSQL does not answer, its version, and the help of options with a
fixed set of values: run as a subprocess, as an operator would."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from importlib import metadata

import pytest

from services.cli import build_parser
from tests.conftest import ROOT


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", [
    ["channels", "list"], ["channels", "show", "ch-1"], ["keys", "list"], ["webhooks", "list", "ch-1"],
    ["migrate"], ["audit", "verify"], ["vault", "status"],
])
def test_a_command_says_in_one_line_that_postgresql_is_unreachable_and_exits_1(command, tmp_path):
    port = closed_port()
    key_file = tmp_path / "kek.json"
    env = {"DATABASE_URL": f"postgresql://someone:hunter2-secret@127.0.0.1:{port}/mpesa",
           "VAULT_KEY_FILE": str(key_file), "VAULT_PUBLIC_KEY_FILE": str(tmp_path / "kek.pub.json"),
           "AUDIT_ANCHOR_PUBLIC_KEY_FILE": str(tmp_path / "anchor.pub")}
    assert cli("vault", "init", env=env).returncode == 0  # vault status reads the key file first

    result = cli(*command, env=env)

    assert result.returncode == 1
    name = " ".join(["mpesa-pipeline", *[a for a in command if a != "ch-1"]])
    assert result.stderr.splitlines() == [f"{name}: cannot reach PostgreSQL at 127.0.0.1:{port} (Connection refused)"]
    assert "hunter2" not in result.stdout + result.stderr


def test_version_is_the_installed_packages():
    result = cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"mpesa-pipeline {metadata.version('mpesa-pipeline')}")


def _leaf_parsers(parser: argparse.ArgumentParser):
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield parser
    for action in subcommands:
        for child in action.choices.values():
            yield from _leaf_parsers(child)


def test_the_help_of_every_option_with_fixed_values_lists_them():
    options = [(leaf, action) for leaf in _leaf_parsers(build_parser()) for action in leaf._actions
               if action.choices is not None and not isinstance(action, argparse._SubParsersAction)]
    assert {a.dest for _, a in options} >= {"shortcodeType", "environment", "clear", "state", "event_types"}
    for leaf, action in options:
        text = leaf.format_help()
        missing = [str(choice) for choice in action.choices if str(choice) not in text]
        assert not missing, f"{leaf.prog} {action.option_strings}: help lacks {missing}"


@pytest.mark.parametrize("args", [
    ["channels", "create", "ch-1", "--shortcode-type", "tills"],
    ["channels", "update", "ch-1", "--environment", "prod"],
    ["channels", "update", "ch-1", "--confirm-success-by-query", "maybe"],
    ["webhooks", "deliveries", "ep-1", "--state", "sent"],
    ["webhooks", "add", "ch-1", "--url", "https://example.com/h", "--event", "payment.lost"],
])
def test_a_value_outside_the_set_is_refused_before_anything_is_done(args):
    result = cli(*args, env={"DATABASE_URL": f"postgresql://127.0.0.1:{closed_port()}/mpesa"})
    assert result.returncode == 2
    assert "invalid choice" in result.stderr or "must be true or false" in result.stderr
    assert "PostgreSQL" not in result.stderr
