"""The Vendure plugin (integrations/vendure) as the tests drive it: built with npm from its own lock
file, its test server (e2e/server.ts: @vendure/testing on the tests' PostgreSQL, in a schema of its
own) in one or more processes, and Vendure's Shop and Admin GraphQL APIs."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import httpx
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

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


async def empty_schema(pool: AsyncConnectionPool, name: str) -> dict[str, str]:
    """Drops and recreates schema `name` in the tests' database (the migration role owns the
    database, so may; it may not create databases). Returns how a Vendure server logs in there, as
    libpq's variables, which node-postgres reads too."""
    async with pool.connection() as conn:
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        info = conn.info  # the password libpq used, from PGPASSFILE when the URL has none
        return {"PGHOST": info.host, "PGPORT": str(info.port), "PGUSER": info.user,
                "PGPASSWORD": info.password or "", "PGDATABASE": info.dbname}


async def drop_schema(pool: AsyncConnectionPool, name: str) -> None:
    async with pool.connection() as conn:
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def env_suffix(channel_code: str) -> str:
    """As src/secrets.ts names a Vendure channel's variables."""
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in channel_code.upper())


class VendureServer:
    """e2e/server.ts with the plugin; `channels` maps each Vendure channel code to its pipeline
    channel, API key and webhook secret (the default channel first; the others are created).
    `database` (empty_schema's) and `schema` say where its tables are; a `shared` server starts on
    the tables another one populated, as a further instance of the same shop, and one with
    `slow_payment_reads_ms` takes that much longer over each read of payments (a loaded server)."""

    def __init__(self, port: int, *, ingress_url: str, channels: dict[str, tuple[str, str, str]],
                 database: dict[str, str], schema: str, shared: bool = False, slow_payment_reads_ms: int = 0,
                 poll: tuple[float, float] | None = None, log: bool = False):
        """`poll`: (interval, pending after) in seconds switches the poller on; it is off otherwise.
        `log`: Vendure's logs in `lines` (@vendure/testing logs nothing unless LOG is set)."""
        self.channels, self.database, self.schema = channels, database, schema
        env = {**os.environ, **database, "VENDURE_DISABLE_TELEMETRY": "true", **({"LOG": "1"} if log else {})}
        for code, (_, api_key, secret) in channels.items():
            env[f"MPESA_PIPELINE_API_KEY__{env_suffix(code)}"] = api_key
            env[f"MPESA_PIPELINE_WEBHOOK_SECRET__{env_suffix(code)}"] = secret
        others = [arg for code, (pipeline, _, _) in channels.items() if code != DEFAULT_CHANNEL
                  for arg in ("--channel", f"{code}={pipeline}")]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            ["node", "dist/e2e/server.js", "--port", str(port), "--schema", schema, *(["--shared"] if shared else []),
             "--slow-payment-reads-ms", str(slow_payment_reads_ms),
             "--pipeline-channel", channels[DEFAULT_CHANNEL][0], "--ingress-url", ingress_url, *others,
             *(("--poll-interval-seconds", str(poll[0]), "--poll-pending-after-seconds", str(poll[1]))
               if poll else ())],
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
