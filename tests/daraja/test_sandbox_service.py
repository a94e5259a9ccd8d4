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
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from services.daraja.models import AppCredentials, QueryStatus, Shortcode
from services.daraja_sandbox.__main__ import load_apps, parse_args, settings_from
from services.daraja_sandbox.admin import redact_callback_url
from services.daraja_sandbox.app import create_app
from services.daraja_sandbox.settings import DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY, environment_from
from tests.conftest import eventually
from tests.daraja.conftest import ADMIN_TOKEN, TEST_SETTINGS, _serve, new_phone, push_request

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_health_and_unknown_paths(sandbox, raw_http):
    assert (await raw_http.get(f"{sandbox.base_url}/sandbox/health")).json() == {"status": "ok"}
    missing = await raw_http.get(f"{sandbox.base_url}/mpesa/nothing/v1/here")
    assert missing.status_code == 404 and missing.json()["errorCode"] == "404.001.01"


async def test_settings_can_be_read_and_changed_but_not_broken(sandbox, admin_http):
    url = f"{sandbox.base_url}/sandbox/settings"
    changed = await admin_http.patch(url, json={"latency_ms": 5, "rate_limit_per_s": 100})
    assert (changed.json()["latency_ms"], changed.json()["rate_limit_per_s"]) == (5, 100.0)
    refused = await admin_http.patch(url, json={"latency_ms": -5})
    assert refused.status_code == 400 and "latency_ms" in refused.json()["error"]
    deep = await admin_http.patch(url, content=b"[" * 60_000, headers={"Content-Type": "application/json"})
    assert deep.status_code == 400
    assert (await admin_http.get(url)).json()["latency_ms"] == 5


async def test_apps_registered_at_run_time_can_push_on_their_shortcode(sandbox, admin_http, client, receiver):
    app = {"consumer_key": "new-app-key", "consumer_secret": "new-app-secret", "shortcode": "654321",
           "passkey": "new-passkey", "shortcode_type": "paybill"}
    assert (await admin_http.post(f"{sandbox.base_url}/sandbox/apps", json=app)).status_code == 201
    accepted = await client.push(AppCredentials("new-app-key", "new-app-secret", "new-passkey"), Shortcode("654321"),
                                 push_request(receiver.new_url()))
    assert accepted.checkout_request_id.startswith("ws_CO_")
    listing = (await admin_http.get(f"{sandbox.base_url}/sandbox/apps")).text
    assert "new-app-key" in listing and "new-app-secret" not in listing and "new-passkey" not in listing
    assert SANDBOX_PASSKEY not in listing
    bad = await admin_http.post(f"{sandbox.base_url}/sandbox/apps", json={"consumer_key": "x"})
    assert bad.status_code == 400


async def test_scenarios_through_the_admin_api(sandbox, admin_http, client, receiver, app_credentials, paybill):
    phone, url = new_phone(), receiver.new_url()
    chosen = await admin_http.post(f"{sandbox.base_url}/sandbox/scenarios",
                                   json={"phone": phone, "scenario": "expired"})
    assert chosen.status_code == 201
    await client.push(app_credentials, paybill, push_request(url, phone=phone))
    assert json.loads((await receiver.wait_for(url))[0].body)["Body"]["stkCallback"]["ResultCode"] == 1019
    listed = (await admin_http.get(f"{sandbox.base_url}/sandbox/scenarios")).json()
    assert listed["overrides"]["phone"][phone]["result_code"] == 1019 and listed["selectors"]["1032"] == "cancelled"
    unknown = await admin_http.post(f"{sandbox.base_url}/sandbox/scenarios", json={"phone": phone, "scenario": "lucky"})
    two_targets = await admin_http.post(f"{sandbox.base_url}/sandbox/scenarios",
                                      json={"phone": phone, "amount": 5, "scenario": "expired"})
    assert (unknown.status_code, two_targets.status_code) == (400, 400)
    await admin_http.delete(f"{sandbox.base_url}/sandbox/scenarios")
    assert sandbox.state.overrides.by_phone == {}


async def test_default_scenario_through_the_admin_api(sandbox, admin_http, client, receiver, app_credentials, paybill):
    await admin_http.post(f"{sandbox.base_url}/sandbox/scenarios", json={"default": True, "scenario": "cancelled"})
    accepted = await client.push(app_credentials, paybill, push_request(receiver.new_url()))
    result = await client.query(app_credentials, paybill, accepted.checkout_request_id)
    assert (result.status, result.result_code) == (QueryStatus.FINAL_FAILURE, "1032")


async def test_push_log_proves_how_often_a_payment_was_pushed(sandbox, admin_http, client, receiver, app_credentials,
                                                             paybill):
    url = receiver.new_url()
    await client.push(app_credentials, paybill, push_request(url, reference="ONCE"))
    await client.push(app_credentials, paybill, push_request(url, reference="TWICE"))
    await client.push(app_credentials, paybill, push_request(url, reference="TWICE"))

    async def count(**filters) -> int:
        answer = (await admin_http.get(f"{sandbox.base_url}/sandbox/pushes", params=filters)).json()
        assert answer["count"] == len(answer["pushes"])
        return answer["count"]

    assert (await count(AccountReference="ONCE"), await count(AccountReference="TWICE"), await count(CallBackURL=url),
            await count(CallBackURL=url, status="accepted")) == (1, 2, 3, 3)
    [push] = (await admin_http.get(f"{sandbox.base_url}/sandbox/pushes", params={"AccountReference": "ONCE"})).json()[
        "pushes"]
    assert push["receivedAt"].endswith("+00:00") and push["Amount"] == 1 and "Password" not in push
    assert (await admin_http.get(f"{sandbox.base_url}/sandbox/pushes", params={"Pasword": "x"})).status_code == 400
    assert (await admin_http.post(f"{sandbox.base_url}/sandbox/reset")).json() == {"reset": True}
    assert await count(CallBackURL=url) == 0


async def test_push_log_says_when_each_callback_was_sent(sandbox, admin_http, client, receiver, app_credentials,
                                                       paybill):
    """Goal: the push log dates each callback's delivery (the pipeline benchmark measures callback → Settled
    from it). Method: a callback held back 300 ms and a duplicated one; each sending time lies between the
    push plus its delay and the moment the receiver had it."""
    once, twice = new_phone(), new_phone()
    for phone, scenario in ((once, "success"), (twice, "duplicate_callback")):
        await admin_http.post(f"{sandbox.base_url}/sandbox/scenarios",
                              json={"phone": phone, "scenario": scenario, "callback_delay_ms": 300})
    urls = {phone: receiver.new_url() for phone in (once, twice)}
    for phone, url in urls.items():
        await client.push(app_credentials, paybill, push_request(url, phone=phone))
    await receiver.wait_for(urls[once])
    await receiver.wait_for(urls[twice], count=2)
    arrived = time.time()

    async def push_of(phone: str) -> dict:
        [push] = (await admin_http.get(f"{sandbox.base_url}/sandbox/pushes", params={"PhoneNumber": phone})).json()[
            "pushes"]
        return push if len(push["callbacksSentAt"]) == len(push["callbacks"]) > 0 else {}

    for phone, count in ((once, 1), (twice, 2)):
        push = await eventually(lambda phone=phone: push_of(phone))  # an attempt is recorded once it is over
        pushed = datetime.fromisoformat(push["receivedAt"]).timestamp()
        sent = [datetime.fromisoformat(t).timestamp() for t in push["callbacksSentAt"]]
        assert push["callbacks"] == [200] * count and len(sent) == count
        assert all(pushed + 0.3 <= t <= arrived for t in sent) and sent == sorted(sent)


async def test_faults_through_the_admin_api(sandbox, raw_http, admin_http, client, app_credentials):
    created = await admin_http.post(f"{sandbox.base_url}/sandbox/faults",
                                  json={"operation": "oauth", "status": 503, "body": "down", "remaining": 2})
    assert created.status_code == 201
    assert (await admin_http.post(f"{sandbox.base_url}/sandbox/faults", json={"operation": "x"})).status_code == 400
    first = await raw_http.get(f"{sandbox.base_url}/oauth/v1/generate?grant_type=client_credentials")
    await admin_http.delete(f"{sandbox.base_url}/sandbox/faults")
    assert (first.status_code, first.text) == (503, "down")
    assert (await client.fetch_token(app_credentials)).value  # the second fault was cleared


async def test_callback_to_a_dead_receiver_is_tried_once_and_recorded(sandbox, admin_http, client, app_credentials,
                                                                     paybill):
    dead_url = f"http://127.0.0.1:{free_port()}/callbacks/x"
    https_url = f"https://127.0.0.1:{free_port()}/callbacks/y"  # goes through aiohttp, not the lean client
    for url in (dead_url, https_url):
        await client.push(app_credentials, paybill, push_request(url))

    async def deliveries(url: str) -> list:
        [push] = (await admin_http.get(f"{sandbox.base_url}/sandbox/pushes", params={"CallBackURL": url})).json()[
            "pushes"]
        return push["callbacks"]

    dead = await eventually(lambda: deliveries(dead_url))  # the attempt is recorded once it is over
    await eventually(lambda: deliveries(https_url))
    assert len(dead) == 1 and "connect failed" in dead[0]
    assert await deliveries(https_url) == ["ClientConnectorError"]
    stats = (await admin_http.get(f"{sandbox.base_url}/sandbox/stats")).json()
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
    assert len(hits) == 1  # docs/daraja.md §5: a 500 answer was not followed by a redelivery
    assert sandbox.state.transactions[accepted.checkout_request_id].deliveries == [500]


def test_port_comes_from_the_flag_then_the_environment_then_8089():
    assert parse_args([], environment_from({})).port == 8089
    assert parse_args([], environment_from({"DARAJA_SANDBOX_PORT": "9001"})).port == 9001
    assert parse_args(["--port", "9002"], environment_from({"DARAJA_SANDBOX_PORT": "9001"})).port == 9002
    args = parse_args(["--latency-ms", "300", "--reject-localhost", "--no-subscriber-lock"], environment_from({}))
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


ADMIN_ROUTES = [("GET", "/sandbox/settings"), ("PATCH", "/sandbox/settings"), ("GET", "/sandbox/apps"),
                ("POST", "/sandbox/apps"), ("POST", "/sandbox/tokens/expire"), ("GET", "/sandbox/scenarios"),
                ("POST", "/sandbox/scenarios"), ("DELETE", "/sandbox/scenarios"), ("GET", "/sandbox/pushes"),
                ("POST", "/sandbox/faults"), ("DELETE", "/sandbox/faults"), ("GET", "/sandbox/stats"),
                ("POST", "/sandbox/reset")]
NOT_THE_TOKEN = [None, "", f"Bearer {ADMIN_TOKEN[:-1]}", f"Bearer {ADMIN_TOKEN}x", f"Basic {ADMIN_TOKEN}",
                 ADMIN_TOKEN, "Bearer", f"Bearer {ADMIN_TOKEN.upper()}"]


@pytest.mark.parametrize("method, path", ADMIN_ROUTES)
async def test_every_admin_route_needs_the_admin_token(sandbox, raw_http, method, path):
    for authorization in NOT_THE_TOKEN:
        headers = {"Authorization": authorization} if authorization is not None else {}
        answer = await raw_http.request(method, sandbox.base_url + path, json={"operation": "push"}, headers=headers)
        assert answer.status_code == 401, (authorization, answer.text)
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert ADMIN_TOKEN not in answer.text
    lower_case_scheme = await raw_http.request(method, sandbox.base_url + path, json={"operation": "push"},
                                               headers={"Authorization": f"bearer {ADMIN_TOKEN}"})
    assert lower_case_scheme.status_code != 401  # RFC 9110 11.1: the scheme is case-insensitive


async def test_a_refused_admin_call_changes_nothing(sandbox, raw_http, client, receiver, app_credentials, paybill):
    await client.push(app_credentials, paybill, push_request(receiver.new_url()))
    assert (await raw_http.post(f"{sandbox.base_url}/sandbox/faults", json={"operation": "oauth"})).status_code == 401
    assert (await raw_http.post(f"{sandbox.base_url}/sandbox/reset")).status_code == 401
    assert (await raw_http.post(f"{sandbox.base_url}/sandbox/apps",
                                json={"consumer_key": "evil", "consumer_secret": "evil"})).status_code == 401
    assert sandbox.state.faults == [] and "evil" not in sandbox.state.apps
    assert len(sandbox.state.pushes) == 1
    assert (await client.fetch_token(app_credentials)).value  # no fault was injected


async def test_without_an_admin_token_the_admin_api_is_closed_and_daraja_still_answers(raw_http):
    runner, base_url = await _serve(create_app(TEST_SETTINGS))
    try:
        for method, path in ADMIN_ROUTES:
            for authorization in ("Bearer", "Bearer None", f"Bearer {ADMIN_TOKEN}"):
                answer = await raw_http.request(method, base_url + path, headers={"Authorization": authorization})
                assert answer.status_code == 401 and "closed" in answer.json()["error"]
        assert (await raw_http.get(base_url + "/sandbox/health")).json() == {"status": "ok"}
        oauth = await raw_http.get(base_url + "/oauth/v1/generate?grant_type=client_credentials",
                                   auth=(DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET))
        assert oauth.status_code == 200
    finally:
        await runner.cleanup()


async def test_the_push_log_never_shows_a_callback_token(sandbox, admin_http, client, receiver, app_credentials,
                                                         paybill):
    path_token, query_token = "Zq3tokenInThePath0123456789abcdefXY", "Qk9tokenInTheQuery0123456789abcdef"
    in_path = f"{receiver.base_url}/api/webhooks/mpesa/shop-1/pay-1/{path_token}"
    in_query = f"{receiver.base_url}/cb/pay-2?token={query_token}"
    for url in (in_path, in_query):
        await client.push(app_credentials, paybill, push_request(url))
    # A push Daraja refuses is logged too, with its CallBackURL.
    await raw_push(admin_http, sandbox, app_credentials, {"CallBackURL": in_path, "Amount": "not a number"})

    answer = await admin_http.get(f"{sandbox.base_url}/sandbox/pushes")
    by_url = await admin_http.get(f"{sandbox.base_url}/sandbox/pushes", params={"CallBackURL": in_path})

    assert path_token not in answer.text and query_token not in answer.text
    assert path_token not in by_url.text and by_url.json()["count"] == 2  # filtering by the real URL still works
    shown = sorted(p["CallBackURL"] for p in answer.json()["pushes"])
    assert shown == sorted([f"{receiver.base_url}/api/webhooks/mpesa/shop-1/pay-1/<token>"] * 2
                           + [f"{receiver.base_url}/cb/<token>?<token>"])


async def raw_push(http: httpx.AsyncClient, sandbox, credentials: AppCredentials, fields: dict) -> None:
    token = (await http.get(f"{sandbox.base_url}/oauth/v1/generate?grant_type=client_credentials",
                            auth=(credentials.consumer_key, credentials.consumer_secret))).json()["access_token"]
    answer = await http.post(f"{sandbox.base_url}/mpesa/stkpush/v1/processrequest", json=fields,
                             headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 400


@pytest.mark.parametrize("url, shown", [
    ("https://gw.example.com/api/webhooks/mpesa/c1/p1/secret", "https://gw.example.com/api/webhooks/mpesa/c1/p1/<token>"),
    ("http://127.0.0.1:8081/cb/secret/", "http://127.0.0.1:8081/cb/<token>/"),
    ("https://user:secret@gw.example.com/cb?token=secret#secret", "https://gw.example.com/<token>?<token>"),
    ("https://gw.example.com", "https://gw.example.com"),
    ("http://[::1/secret", "<token>"),
    (["https://gw.example.com/secret"], "<token>"),
    (None, "<token>"),
])
def test_a_callback_url_is_shown_without_its_token(url, shown):
    assert redact_callback_url(url) == shown


def test_the_admin_token_comes_from_the_environment_and_must_be_strong():
    def admin_token_from(environ: dict[str, str]) -> str | None:
        return environment_from(environ).daraja_sandbox_admin_token

    assert admin_token_from({}) is None and admin_token_from({"DARAJA_SANDBOX_ADMIN_TOKEN": ""}) is None
    assert admin_token_from({"DARAJA_SANDBOX_ADMIN_TOKEN": ADMIN_TOKEN}) == ADMIN_TOKEN
    assert ADMIN_TOKEN not in repr(environment_from({"DARAJA_SANDBOX_ADMIN_TOKEN": ADMIN_TOKEN}))
    for weak in ("short-token", "x" * 31, " " + "x" * 40, "x" * 40 + "\n", "x" * 20 + " " + "x" * 20, "é" * 40):
        with pytest.raises(ValueError, match="DARAJA_SANDBOX_ADMIN_TOKEN must be at least 32") as error:
            admin_token_from({"DARAJA_SANDBOX_ADMIN_TOKEN": weak})
        assert weak.strip() not in str(error.value)


def test_a_weak_admin_token_stops_the_sandbox_without_showing_it():
    env = {**os.environ, "DARAJA_SANDBOX_PORT": str(free_port()), "DARAJA_SANDBOX_ADMIN_TOKEN": "hunter2-too-short"}
    result = subprocess.run([sys.executable, "-m", "services.daraja_sandbox"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "DARAJA_SANDBOX_ADMIN_TOKEN must be at least 32" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_runs_as_a_module_and_stops_on_sigterm():
    port = free_port()
    env = {**os.environ, "DARAJA_SANDBOX_PORT": str(port), "DARAJA_SANDBOX_ADMIN_TOKEN": ADMIN_TOKEN}
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
        stats = f"http://127.0.0.1:{port}/sandbox/stats"
        assert httpx.get(stats, timeout=5, trust_env=False).status_code == 401
        assert httpx.get(stats, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5,
                         trust_env=False).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
