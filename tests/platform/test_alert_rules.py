"""The alert rules (ops/prometheus/alerts.yml) and the Grafana dashboard (ops/grafana/dashboard.json):
promtool checks the rules and runs their unit tests, every alert has a test that fires it and one where
it stays quiet, every row of README's table of metrics to alert on has a rule, every metric the rules
and the dashboard name is one the services define, and a real Prometheus (infra/prometheus.sh) loads
and evaluates every rule group with the config `make run PROMETHEUS=1` uses.

promtool and prometheus come from Debian's prometheus package: `make check` and `make test` install
it through infra/tools.sh (as root); without it these tests fail, saying how to install it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.devstack import METRICS_ENDPOINTS, STACK, metrics_targets
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboard.json"
PROMETHEUS_SH = ROOT / "infra" / "prometheus.sh"
INSTALL_HINT = ("install Debian's prometheus package: `bash infra/tools.sh install prometheus` as root (make check "
                "does), or `sudo apt-get install --no-install-recommends prometheus`")

PROMETHEUS_OWN = {"up"}  # written by Prometheus for every target it scrapes

DEFINITION = re.compile(r'\b(Counter|Gauge|Histogram|Summary)\(\s*"([a-zA-Z_:][\w:]*)"')
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def exposed_names(name: str, kind: str) -> set[str]:
    """The series names prometheus_client writes for a metric defined as `kind`("name", ...)."""
    if kind == "Counter":
        return {name.removesuffix("_total") + "_total"}
    if kind == "Histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    if kind == "Summary":
        return {name, f"{name}_count", f"{name}_sum"}
    return {name}


def defined_metrics() -> dict[str, set[str]]:
    """Each metric the services define (and part M's, until merged), with the series names it exposes."""
    kinds: dict[str, str] = {}
    for source in sorted((ROOT / "services").rglob("*.py")):
        kinds.update({name: kind for kind, name in DEFINITION.findall(source.read_text())})
    return {name: exposed_names(name, kind) for name, kind in kinds.items()}


def series_names() -> set[str]:
    return PROMETHEUS_OWN.union(*defined_metrics().values())


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once label values, matchers, ranges,
    label lists and offsets are gone, minus function calls and keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+\w+", " ", expr)
    words = re.findall(r"(?<![\w$.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {w for w in words if w.lower() not in PROMQL_WORDS}


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in json.loads(DASHBOARD.read_text())["panels"]
            for target in panel.get("targets", [])]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(f"promtool not found: {INSTALL_HINT}", pytrace=False)
    return path


def test_metric_names_are_read_from_promql():
    expr = ('sum by (job, le) (rate(a_bucket{x="b{c}"}[5m])) > 1 or b unless b offset 10m '
            'and on (job) histogram_quantile(0.9, c_total) / time() > 1e9')
    assert metric_names(expr) == {"a_bucket", "b", "c_total"}


def test_promtool_checks_the_rules():
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_every_rule_passes_its_promtool_unit_tests():
    result = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_that_fires_it_and_one_where_it_stays_quiet():
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    alerts = {rule["alert"] for rule in rules()}
    assert alerts - firing == set(), "alerts no test fires"
    assert alerts - quiet == set(), "alerts with no test where they stay quiet"
    assert (firing | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_every_alert_says_how_bad_it_is_and_what_to_do():
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and len(annotations["description"]) > 80, rule["alert"]
        page, _, anchor = annotations["runbook"].partition("#")
        assert (ROOT / page).is_file(), f"{rule['alert']}: runbook {page} does not exist"
        if anchor:
            headings = [line.lstrip("#").strip() for line in (ROOT / page).read_text().splitlines()
                        if line.startswith("#")]
            assert anchor in {re.sub(r"[^\w -]", "", h).lower().replace(" ", "-") for h in headings}, rule["alert"]


def test_every_metric_readme_says_to_alert_on_has_a_rule():
    section = (ROOT / "README.md").read_text().split("## Observability", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines()  # "never": informational, like build_info
            if line.startswith("| `") and not line.split("|")[2].strip().startswith("never")]
    named = {re.sub(r"\{.*", "", name) for row in rows for name in re.findall(r"`([^`]+)`", row)}
    assert len(named) > 20, "README's table of metrics to alert on was not found"
    used = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    exposed = defined_metrics()
    assert {name for name in named if not exposed.get(name, {name}) & used} == set()


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_named_is_one_the_services_define(source):
    expressions = ([(rule["alert"], rule["expr"]) for rule in rules()] if source == "rules"
                   else dashboard_expressions())
    known = series_names()
    unknown = {(where, name) for where, expr in expressions for name in metric_names(expr) - known}
    assert unknown == set()


def test_the_dashboard_takes_its_prometheus_as_an_input_and_every_panel_queries_it():
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["schemaVersion"] >= 39
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["description"] and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and metric_names(target["expr"]), panel["title"]


def test_prometheus_scrapes_every_service_of_make_run_where_its_variables_say():
    assert set(METRICS_ENDPOINTS) == {name for name, _ in STACK} - {"daraja-sandbox"}  # the sandbox has no /metrics
    targets = metrics_targets({"INGRESS_PORT": "18080", "METRICS_HOST": "0.0.0.0", "ADMIN_HOST": "::1"})
    assert targets["ingress"] == ["127.0.0.1:18080"]
    assert targets["ledger"] == ["127.0.0.1:9102"]  # anywhere: scraped on loopback
    assert targets["onboarding-api"] == ["[::1]:8082"]


def _get(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # a refused query: its body says why
        return json.loads(error.read())


def _prometheus(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(PROMETHEUS_SH), command], env=env, capture_output=True, text=True)


def test_a_real_prometheus_loads_and_evaluates_every_rule_group_and_scrapes_every_service(tmp_path):
    """infra/prometheus.sh on a loopback port of its own, with its data in tmp_path: through its HTTP API
    every group of alerts.yml is loaded, has been evaluated, and every rule's health is ok; every service
    of `make run` is a target; every dashboard query is one Prometheus accepts."""
    shutil.which("prometheus") or pytest.fail(f"prometheus not found: {INSTALL_HINT}", pytrace=False)
    port = free_port()
    env = {**os.environ, "PROMETHEUS_PORT": str(port), "PROMETHEUS_DIR": str(tmp_path)}
    started = _prometheus("start", env)
    assert started.returncode == 0, started.stderr
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        wanted = [group["name"] for group in yaml.safe_load(RULES.read_text())["groups"]]
        deadline = time.monotonic() + 90  # groups are evaluated every 15 s, the first time at an offset
        while True:
            groups = {g["name"]: g for g in _get(f"{api}/rules")["data"]["groups"]}
            # An unevaluated group's lastEvaluation is Go's zero time, year 0001.
            evaluated = [name for name in wanted
                         if name in groups and not groups[name]["lastEvaluation"].startswith("0001")]
            if evaluated == wanted or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert evaluated == wanted, f"groups loaded: {sorted(groups)}"
        assert sum(len(g["rules"]) for g in groups.values()) == len(rules())
        unhealthy = [(r["name"], r["health"], r.get("lastError")) for g in groups.values() for r in g["rules"]
                     if r["health"] != "ok"]
        assert unhealthy == []
        targets = _get(f"{api}/targets")["data"]["activeTargets"]
        assert {t["labels"]["job"] for t in targets} == set(METRICS_ENDPOINTS)
        for title, expr in dashboard_expressions():
            query = urllib.parse.urlencode({"query": expr.replace("$__rate_interval", "1m")})
            assert _get(f"{api}/query?{query}")["status"] == "success", title
    finally:
        stopped = _prometheus("stop", env)
    assert stopped.returncode == 0, stopped.stderr
    assert _prometheus("status", env).returncode == 1
