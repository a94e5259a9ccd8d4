"""The plan of processes `mpesa-pipeline run --workers N --gateways N --ledgers N` starts
(services/devstack.py stack_processes) and the Prometheus targets that follow it: every process listens
on ports of its own, except the gateways' callback port, which they share (Daraja calls one URL), and
every process is scraped on its own metrics port."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from services.common import config
from services.devstack import METRICS_ENDPOINTS, SCALABLE, STACK, drop_admin_login, metrics_targets, stack_processes
from tests.conftest import ROOT

DATABASE = "postgresql://mpesa@127.0.0.1:5433/mpesa"
SHARED = {("webhook-gateway", "WEBHOOK_PORT")}  # the one callback address, with SO_REUSEPORT


def listening(process) -> dict[str, int]:
    """The ports a process of the plan listens on: its service's *_PORT settings as its env sets them."""
    if process.service not in METRICS_ENDPOINTS:  # the sandbox: its --port
        return {}
    settings = [s for s in METRICS_ENDPOINTS[process.service][0] if s.parse is config.port]
    return {env: port for env, port in config.load(settings, process.env).items() if port is not None}


scale = st.fixed_dictionaries({service: st.integers(1, 16) for service in SCALABLE})


@settings(max_examples=25, deadline=None, derandomize=True)
@given(scale)
def test_no_two_processes_listen_on_one_port_but_the_gateways_on_their_callback_port(instances):
    plan = stack_processes(DATABASE, instances)
    owners: dict[int, set[tuple[str, str]]] = {}
    for process in plan:
        for env, port in listening(process).items():
            owners.setdefault(port, set()).add((process.name, env))
    for port, holders in owners.items():
        if len(holders) > 1:
            assert {(name.rsplit("-", 1)[0] if name[-1].isdigit() else name, env) for name, env in holders} \
                == SHARED, (port, holders)


def test_several_gateways_share_the_callback_port_with_reuse_port_and_each_has_a_metrics_port():
    gateways = [p for p in stack_processes(DATABASE, {"webhook-gateway": 3}) if p.service == "webhook-gateway"]
    assert [p.name for p in gateways] == ["webhook-gateway-1", "webhook-gateway-2", "webhook-gateway-3"]
    assert {listening(p)["WEBHOOK_PORT"] for p in gateways} == {8081}
    assert [p.env["WEBHOOK_REUSE_PORT"] for p in gateways] == ["true"] * 3
    assert [listening(p)["WEBHOOK_METRICS_PORT"] for p in gateways] == [8181, 8281, 8381]


def test_one_process_of_each_keeps_its_configured_ports_and_its_name():
    plan = stack_processes(DATABASE)
    assert [p.name for p in plan] == [name for name, _ in STACK]
    gateway = next(p for p in plan if p.service == "webhook-gateway")
    assert "WEBHOOK_REUSE_PORT" not in gateway.env and "WEBHOOK_METRICS_PORT" not in gateway.env
    assert listening(gateway) == {"WEBHOOK_PORT": 8081}


def test_only_the_scalable_services_get_several_processes():
    plan = stack_processes(DATABASE, {"ingress": 3, "stk-worker": 2, "ledger": 2, "webhook-gateway": 2})
    counts = {service: sum(p.service == service for p in plan) for service, _ in STACK}
    assert counts == {**{service: 1 for service, _ in STACK}, "stk-worker": 2, "ledger": 2, "webhook-gateway": 2}
    assert [p.name for p in plan if p.service == "ledger"] == ["ledger-1", "ledger-2"]
    # Each logs in as its service, whichever instance it is.
    assert {p.env["DATABASE_URL"] for p in plan if p.service == "stk-worker"} == {
        "postgresql://stk_worker@127.0.0.1:5433/mpesa"}


@pytest.mark.parametrize("instances", [{}, {"stk-worker": 2, "webhook-gateway": 2, "ledger": 3}])
def test_prometheus_scrapes_each_process_on_the_metrics_port_the_plan_gives_it(instances):
    plan = stack_processes(DATABASE, instances)
    targets = metrics_targets({}, instances)
    for service in METRICS_ENDPOINTS:
        processes = [p for p in plan if p.service == service]
        wanted = []
        for p in processes:
            ports = listening(p)
            wanted.append(f"127.0.0.1:{ports.get('WEBHOOK_METRICS_PORT') or ports[METRICS_ENDPOINTS[service][2]]}")
        assert targets[service] == wanted, service


def test_the_targets_command_prints_a_line_per_process():
    out = subprocess.run([sys.executable, "-m", "services.devstack", "metrics-targets", "--workers", "2",
                          "--gateways", "2"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout.splitlines()
    assert [line for line in out if line.startswith(("stk-worker", "webhook-gateway"))] == [
        "webhook-gateway 127.0.0.1:8181", "webhook-gateway 127.0.0.1:8281",
        "stk-worker 127.0.0.1:9103", "stk-worker 127.0.0.1:9203"]


def test_the_run_command_passes_its_options_to_the_plan():
    from services.cli import build_parser, instances
    args = build_parser().parse_args(["run", "--workers", "2", "--gateways", "3"])
    assert instances(args) == {"stk-worker": 2, "webhook-gateway": 3, "ledger": 1}
    with pytest.raises(SystemExit):  # 1 to 16
        build_parser().parse_args(["run", "--ledgers", "17"])


def test_no_service_inherits_the_admin_login_make_run_sources(monkeypatch):
    # `make run` sources infra/up.sh's lines, the admin principal's login among them.
    monkeypatch.setenv("KAFKA_CLIENT_SASL_USERNAME", "admin")
    monkeypatch.setenv("KAFKA_CLIENT_SASL_PASSWORD_FILE", "/secrets/kafka-admin.password")
    logins = {p.name: p.env.get("KAFKA_CLIENT_SASL_USERNAME") for p in stack_processes(DATABASE)}
    assert logins["ledger"] == "ledger" and logins["ingress"] == "ingress" and "admin" not in logins.values()
    environ = dict(os.environ)
    drop_admin_login(environ)
    assert "KAFKA_CLIENT_SASL_USERNAME" not in environ and "KAFKA_CLIENT_SASL_PASSWORD_FILE" not in environ


def test_an_operators_own_login_is_kept(monkeypatch):
    monkeypatch.setenv("KAFKA_CLIENT_SASL_USERNAME", "ops-pipeline")
    assert all("KAFKA_CLIENT_SASL_USERNAME" not in p.env for p in stack_processes(DATABASE))
    environ = {"KAFKA_CLIENT_SASL_USERNAME": "ops-pipeline"}
    drop_admin_login(environ)
    assert environ == {"KAFKA_CLIENT_SASL_USERNAME": "ops-pipeline"}
