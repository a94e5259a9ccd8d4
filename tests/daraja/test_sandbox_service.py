"""The sandbox as a service: its admin API, callback delivery to receivers that misbehave, and the
runnable `python -m services.daraja_sandbox`."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from services.daraja.models import AppCredentials, QueryStatus, Shortcode
from services.daraja_sandbox.__main__ import load_apps, parse_args, settings_from
from services.daraja_sandbox.settings import DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY
from tests.daraja.conftest import new_phone, push_request

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_health_and_unknown_paths(sandbox, raw_http):
    assert (await raw_http.get(f"{sandbox.base_url}/sandbox/health")).json() == {"status": "ok"}
    missing = await raw_http.get(f"{sandbox.base_url}/mpesa/nothing/v1/here")
    assert missing.status_code == 404 and missing.json()["errorCode"] == "404.001.01"


async def test_settings_can_be_read_and_changed_but_not_broken(sandbox, raw_http):
    url = f"{sandbox.base_url}/sandbox/settings"
    changed = await raw_http.patch(url, json={"latency_ms": 5, "rate_limit_per_s": 100})
    assert (changed.json()["latency_ms"], changed.json()["rate_limit_per_s"]) == (5, 100.0)
    refused = await raw_http.patch(url, json={"latency_ms": -5})
    assert refused.status_code == 400 and "latency_ms" in refused.json()["error"]
    assert (await raw_http.get(url)).json()["latency_ms"] == 5


async def test_apps_registered_at_run_time_can_push_on_their_shortcode(sandbox, raw_http, client, receiver):
    app = {"consumer_key": "new-app-key", "consumer_secret": "new-app-secret", "shortcode": "654321",
           "passkey": "new-passkey", "shortcode_type": "paybill"}
    assert (await raw_http.post(f"{sandbox.base_url}/sandbox/apps", json=app)).status_code == 201
    accepted = await client.push(AppCredentials("new-app-key", "new-app-secret", "new-passkey"), Shortcode("654321"),
                                 push_request(receiver.new_url()))
    assert accepted.checkout_request_id.startswith("ws_CO_")
    listing = (await raw_http.get(f"{sandbox.base_url}/sandbox/apps")).text
    assert "new-app-key" in listing and "new-app-secret" not in listing and "new-passkey" not in listing
    assert SANDBOX_PASSKEY not in listing
    bad = await raw_http.post(f"{sandbox.base_url}/sandbox/apps", json={"consumer_key": "x"})
    assert bad.status_code == 400


async def test_scenarios_through_the_admin_api(sandbox, raw_http, client, receiver, app_credentials, paybill):
    phone, url = new_phone(), receiver.new_url()
    chosen = await raw_http.post(f"{sandbox.base_url}/sandbox/scenarios", json={"phone": phone, "scenario": "expired"})
    assert chosen.status_code == 201
    await client.push(app_credentials, paybill, push_request(url, phone=phone))
    assert json.loads((await receiver.wait_for(url))[0].body)["Body"]["stkCallback"]["ResultCode"] == 1019
    listed = (await raw_http.get(f"{sandbox.base_url}/sandbox/scenarios")).json()
    assert listed["overrides"]["phone"][phone]["result_code"] == 1019 and listed["selectors"]["1032"] == "cancelled"
    unknown = await raw_http.post(f"{sandbox.base_url}/sandbox/scenarios", json={"phone": phone, "scenario": "lucky"})
    two_targets = await raw_http.post(f"{sandbox.base_url}/sandbox/scenarios",
                                      json={"phone": phone, "amount": 5, "scenario": "expired"})
    assert (unknown.status_code, two_targets.status_code) == (400, 400)
    await raw_http.delete(f"{sandbox.base_url}/sandbox/scenarios")
    assert sandbox.state.overrides.by_phone == {}


async def test_default_scenario_through_the_admin_api(sandbox, raw_http, client, receiver, app_credentials, paybill):
    await raw_http.post(f"{sandbox.base_url}/sandbox/scenarios", json={"default": True, "scenario": "cancelled"})
    accepted = await client.push(app_credentials, paybill, push_request(receiver.new_url()))
    result = await client.query(app_credentials, paybill, accepted.checkout_request_id)
    assert (result.status, result.result_code) == (QueryStatus.FINAL_FAILURE, "1032")


async def test_push_log_proves_how_often_a_payment_was_pushed(sandbox, raw_http, client, receiver, app_credentials,
                                                             paybill):
    url = receiver.new_url()
    await client.push(app_credentials, paybill, push_request(url, reference="ONCE"))
    await client.push(app_credentials, paybill, push_request(url, reference="TWICE"))
    await client.push(app_credentials, paybill, push_request(url, reference="TWICE"))

    async def count(**filters) -> int:
        answer = (await raw_http.get(f"{sandbox.base_url}/sandbox/pushes", params=filters)).json()
        assert answer["count"] == len(answer["pushes"])
        return answer["count"]

    assert (await count(AccountReference="ONCE"), await count(AccountReference="TWICE"), await count(CallBackURL=url),
            await count(CallBackURL=url, status="accepted")) == (1, 2, 3, 3)
    [push] = (await raw_http.get(f"{sandbox.base_url}/sandbox/pushes", params={"AccountReference": "ONCE"})).json()[
        "pushes"]
    assert push["receivedAt"].endswith("+00:00") and push["Amount"] == 1 and "Password" not in push
    assert (await raw_http.get(f"{sandbox.base_url}/sandbox/pushes", params={"Pasword": "x"})).status_code == 400
    assert (await raw_http.post(f"{sandbox.base_url}/sandbox/reset")).json() == {"reset": True}
    assert await count(CallBackURL=url) == 0


async def test_faults_through_the_admin_api(sandbox, raw_http, client, app_credentials):
    created = await raw_http.post(f"{sandbox.base_url}/sandbox/faults",
                                  json={"operation": "oauth", "status": 503, "body": "down", "remaining": 2})
    assert created.status_code == 201
    assert (await raw_http.post(f"{sandbox.base_url}/sandbox/faults", json={"operation": "x"})).status_code == 400
    first = await raw_http.get(f"{sandbox.base_url}/oauth/v1/generate?grant_type=client_credentials")
    await raw_http.delete(f"{sandbox.base_url}/sandbox/faults")
    assert (first.status_code, first.text) == (503, "down")
    assert (await client.fetch_token(app_credentials)).value  # the second fault was cleared


async def test_callback_to_a_dead_receiver_is_tried_once_and_recorded(sandbox, raw_http, client, app_credentials,
                                                                     paybill):
    dead_url = f"http://127.0.0.1:{free_port()}/callbacks/x"
    https_url = f"https://127.0.0.1:{free_port()}/callbacks/y"  # goes through aiohttp, not the lean client
    for url in (dead_url, https_url):
        await client.push(app_credentials, paybill, push_request(url))
    for _ in range(100):
        if sandbox.state.counters["callbacks_failed"] >= 2:
            break
        await asyncio.sleep(0.02)
    pushes = (await raw_http.get(f"{sandbox.base_url}/sandbox/pushes")).json()["pushes"]
    deliveries = {p["CallBackURL"]: p["callbacks"] for p in pushes}
    assert len(deliveries[dead_url]) == 1 and "connect failed" in deliveries[dead_url][0]
    assert deliveries[https_url] == ["ClientConnectorError"]
    stats = (await raw_http.get(f"{sandbox.base_url}/sandbox/stats")).json()
    assert stats["callbacks_failed"] >= 2 and stats["pushes_accepted"] == 2


async def test_receiver_answering_500_gets_no_retry(sandbox, client, app_credentials, paybill):
    hits = []

    async def refuse(request: web.Request) -> web.Response:
        hits.append(await request.read())
        return web.Response(status=500, text="no")

    app = web.Application()
    app.router.add_post("/cb", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/cb"
        accepted = await client.push(app_credentials, paybill, push_request(url))
        await asyncio.sleep(0.3)
    finally:
        await runner.cleanup()
    assert len(hits) == 1  # daraja.md §5: a 500 answer was not followed by a redelivery
    assert sandbox.state.transactions[accepted.checkout_request_id].deliveries == [500]


def test_port_comes_from_the_flag_then_the_environment_then_8089():
    assert parse_args([], {}).port == 8089
    assert parse_args([], {"DARAJA_SANDBOX_PORT": "9001"}).port == 9001
    assert parse_args(["--port", "9002"], {"DARAJA_SANDBOX_PORT": "9001"}).port == 9002
    args = parse_args(["--latency-ms", "300", "--reject-localhost", "--no-subscriber-lock"], {})
    settings = settings_from(args)
    assert (args.host, settings.latency_ms, settings.reject_localhost, settings.subscriber_lock) == \
        ("127.0.0.1", 300, True, False)


def test_apps_file(tmp_path):
    path = tmp_path / "apps.json"
    path.write_text(json.dumps([{"consumer_key": "k", "consumer_secret": "s", "shortcode": "600100", "passkey": "p",
                                 "shortcode_type": "till", "till_number": "600200"}]))
    [app] = load_apps(path)
    assert (app.consumer_key, app.till_number) == ("k", "600200")
    path.write_text('{"consumer_key": "k"}')
    with pytest.raises(ValueError):
        load_apps(path)


def test_runs_as_a_module_and_stops_on_sigterm():
    port = free_port()
    env = {**os.environ, "DARAJA_SANDBOX_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-m", "services.daraja_sandbox", "--log-level", "WARNING"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        token = None
        for _ in range(100):
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/oauth/v1/generate?grant_type=client_credentials",
                                     auth=(DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET), timeout=1, trust_env=False)
                token = response.json()["access_token"]
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert token is not None and len(token) == 28
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
