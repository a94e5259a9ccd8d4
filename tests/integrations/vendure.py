"""The Vendure plugin (integrations/vendure) as the tests drive it: built with npm from its own lock
file, its test server (e2e/server.ts: @vendure/testing on sql.js) in a process of its own, and
Vendure's Shop and Admin GraphQL APIs."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT

PLUGIN = ROOT / "integrations" / "vendure"
DEFAULT_CHANNEL = "__default_channel__"  # @vendure/testing's default channel code
CHANNEL_TOKEN = "e2e-default-channel"    # and its token (testConfig.defaultChannelToken)


def build() -> None:
    """npm ci when the lock file changed since the last install, then the TypeScript build."""
    installed = PLUGIN / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < (PLUGIN / "package-lock.json").stat().st_mtime:
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PLUGIN, check=True, capture_output=True)
    subprocess.run(["npm", "run", "build"], cwd=PLUGIN, check=True, capture_output=True)


def env_suffix(channel_code: str) -> str:
    """As src/secrets.ts names a Vendure channel's variables."""
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in channel_code.upper())


class VendureServer:
    """e2e/server.ts with the plugin; `channels` maps each Vendure channel code to its pipeline
    channel, API key and webhook secret (the default channel first; the others are created)."""

    def __init__(self, tmp: Path, port: int, *, ingress_url: str, channels: dict[str, tuple[str, str, str]],
                 poll: tuple[float, float] | None = None, log: bool = False, env: dict[str, str] | None = None):
        """`poll`: (interval, pending after) in seconds switches the poller on; it is off otherwise.
        `log`: Vendure's logs in `lines` (@vendure/testing logs nothing unless LOG is set).
        `env`: further environment variables for the server."""
        self.channels = channels
        env = {**os.environ, "VENDURE_DISABLE_TELEMETRY": "true", **({"LOG": "1"} if log else {}), **(env or {})}
        for code, (_, api_key, secret) in channels.items():
            env[f"MPESA_PIPELINE_API_KEY__{env_suffix(code)}"] = api_key
            env[f"MPESA_PIPELINE_WEBHOOK_SECRET__{env_suffix(code)}"] = secret
        others = [arg for code, (pipeline, _, _) in channels.items() if code != DEFAULT_CHANNEL
                  for arg in ("--channel", f"{code}={pipeline}")]
        (tmp / "sqljs").mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            ["node", "dist/e2e/server.js", "--port", str(port), "--data-dir", str(tmp / "sqljs"),
             "--pipeline-channel", channels[DEFAULT_CHANNEL][0], "--ingress-url", ingress_url, *others,
             *(("--poll-interval-seconds", str(poll[0]), "--poll-pending-after-seconds", str(poll[1])) if poll else ())],
            cwd=PLUGIN, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        threading.Thread(target=self.lines.extend, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + 90
        while not any(line.startswith("VENDURE_READY") for line in self.lines):
            assert time.monotonic() < deadline and self.proc.poll() is None, \
                f"the Vendure test server did not start: {''.join(self.lines)[-3000:]}"
            time.sleep(0.1)

    @property
    def pipeline_channel(self) -> str:
        return self.channels[DEFAULT_CHANNEL][0]

    @property
    def webhook_secret(self) -> str:
        return self.channels[DEFAULT_CHANNEL][2]

    def webhook_url(self, channel_code: str = DEFAULT_CHANNEL) -> str:
        return f"{self.url}/mpesa-pipeline/webhooks/{channel_code}"

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return "".join(self.lines)


class GraphQL:
    """One Vendure API session: Vendure answers a session's bearer token in `vendure-auth-token`."""

    def __init__(self, url: str, channel_token: str = CHANNEL_TOKEN):
        self.url = url
        self.headers = {"vendure-token": channel_token}

    async def __call__(self, query: str, **variables) -> dict:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(self.url, json={"query": query, "variables": variables}, headers=self.headers)
        if token := response.headers.get("vendure-auth-token"):
            self.headers["Authorization"] = f"Bearer {token}"
        body = response.json()
        assert response.status_code == 200 and not body.get("errors"), body
        return body["data"]


ORDER_FIELDS = "id code state active totalWithTax payments { id state transactionId errorMessage metadata }"


async def checkout(shop: GraphQL, variant_id: str = "T_1") -> dict:
    """A guest's order of one item, ready for payment (ArrangingPayment)."""
    added = (await shop("mutation($v: ID!) { addItemToOrder(productVariantId: $v, quantity: 1) {"
                        " ... on Order { code } ... on ErrorResult { errorCode message } } }", v=variant_id))
    assert "code" in added["addItemToOrder"], added
    await shop('mutation { setCustomerForOrder(input: {emailAddress: "wanjiru@example.com", firstName: "Wanjiru",'
               ' lastName: "Kamau"}) { ... on Order { code } ... on ErrorResult { errorCode message } } }')
    await shop('mutation { setOrderShippingAddress(input: {streetLine1: "Moi Avenue 1", city: "Nairobi",'
               ' countryCode: "KE"}) { ... on Order { code } ... on ErrorResult { errorCode message } } }')
    methods = (await shop("{ eligibleShippingMethods { id } }"))["eligibleShippingMethods"]
    await shop("mutation($id: [ID!]!) { setOrderShippingMethod(shippingMethodId: $id) { ... on Order { code } } }",
               id=[methods[0]["id"]])
    moved = await shop('mutation { transitionOrderToState(state: "ArrangingPayment") {'
                       f" ... on Order {{ {ORDER_FIELDS} }}"
                       " ... on OrderStateTransitionError { transitionError } } }")
    order = moved["transitionOrderToState"]
    assert order.get("state") == "ArrangingPayment", order
    return order


async def add_payment(shop: GraphQL, phone: str) -> dict:
    """addPaymentToOrder with mpesa-stk: the order, or the error result (errorCode, message...)."""
    data = await shop("mutation($phone: String!) { addPaymentToOrder(input: {method: \"mpesa-stk\","
                      " metadata: {phone: $phone}}) {"
                      f" ... on Order {{ {ORDER_FIELDS} }}"
                      " ... on ErrorResult { errorCode message }"
                      " ... on PaymentDeclinedError { paymentErrorMessage } } }",
                      phone=phone)
    return data["addPaymentToOrder"]


async def admin_order(admin: GraphQL, code: str) -> dict:
    data = await admin("query($code: String!) { orders(options: {filter: {code: {eq: $code}}}) {"
                       f" items {{ {ORDER_FIELDS} }} }} }}", code=code)
    [order] = data["orders"]["items"]
    return order


async def admin_login(url: str) -> GraphQL:
    admin = GraphQL(f"{url}/admin-api")
    await admin('mutation { login(username: "superadmin", password: "superadmin") {'
                " ... on CurrentUser { id } ... on ErrorResult { errorCode message } } }")
    return admin
