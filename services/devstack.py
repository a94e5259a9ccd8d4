"""`make run` conveniences for a developer machine: migrations, local secrets, the audit anchor key
and a demo channel.

Only `mpesa-pipeline run` uses this. Secrets it creates live in .local/secrets/ (mode 0600); a
production deployment passes its own through the environment instead.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from services.channels import settings as admin_settings
from services.channels.onboarding import Conflict, Onboarding
from services.channels.vault import LocalKeyFileProvider, public_key_path
from services.common import config, pseudonyms
from services.common.db import migrate, open_pool
from services.common.topics import ACCESS
from services.daraja_sandbox.settings import DEMO_CONSUMER_KEY, DEMO_CONSUMER_SECRET, SANDBOX_PASSKEY
from services.ingress import bootstrap as ingress
from services.ledger import anchors, settings as ledger
from services.ledger.anchors import create_key
from services.notifier import settings as notifier
from services.privacy import settings as privacy
from services.stk_worker import bootstrap as stk_worker
from services.webhook_consumer import settings as gateway

SECRETS = Path(".local/secrets")
KAFKA_CA = Path(".local/kafka/tls/ca.crt")  # made by infra/kafka.sh, as are the principals' passwords
PSEUDONYM_KEY = SECRETS / "pseudonym.key"  # services/common/pseudonyms.py
DEMO_CHANNEL = "demo"
# The login role of each service of `mpesa-pipeline run` (made by infra/postgres.sh).
SERVICE_ROLES = {"ledger": "ledger", "stk-worker": "stk_worker", "ingress": "ingress", "onboarding-api": "onboarding",
                 "audit-anchor": "auditor", "notifier": "notifier", "privacy": "privacy"}
# The demo's webhook receivers run on this machine: loopback is allowed as a destination here only.
DEV_WEBHOOK_NETWORKS = "127.0.0.0/8,::1/128"

# Where each service of `mpesa-pipeline run` serves /metrics: its settings, and the names of its address
# and port among them (infra/prometheus.sh scrapes these). The Daraja sandbox, a stand-in for
# Safaricom, has none.
METRICS_ENDPOINTS = {
    "ingress": (ingress.SETTINGS, "INGRESS_HOST", "INGRESS_PORT"),
    "webhook-gateway": (gateway.SETTINGS, "WEBHOOK_HOST", "WEBHOOK_PORT"),
    "onboarding-api": (admin_settings.API_SETTINGS, "ADMIN_HOST", "ADMIN_PORT"),
    "ledger": (ledger.SETTINGS, "METRICS_HOST", "LEDGER_METRICS_PORT"),
    "stk-worker": (stk_worker.SETTINGS, "METRICS_HOST", "STK_WORKER_METRICS_PORT"),
    "audit-anchor": (anchors.SETTINGS, "METRICS_HOST", "AUDIT_ANCHOR_METRICS_PORT"),
    "notifier": (notifier.NOTIFIER_SETTINGS, "METRICS_HOST", "NOTIFIER_METRICS_PORT"),
    "privacy": (privacy.SETTINGS, "METRICS_HOST", "PRIVACY_METRICS_PORT"),
}
# Several gateways share the one callback port Daraja knows (SO_REUSEPORT: the kernel spreads the
# connections), so a scrape there reaches any of them: each also serves /metrics on a port of its own.
OWN_METRICS_PORT = {"webhook-gateway": gateway.METRICS_PORT.env}
WILDCARDS = {"", "0.0.0.0", "::"}  # listening on every address: scraped on loopback


def metrics_targets(environ: Mapping[str, str] | None = None,
                    instances: Mapping[str, int] | None = None) -> dict[str, list[str]]:
    """host:port of each process's /metrics, `instances[service]` of each scalable service (default 1),
    from the same variables (and defaults) the processes read."""
    environ = os.environ if environ is None else environ
    targets = {}
    for service, (settings, host_env, port_env) in METRICS_ENDPOINTS.items():
        count = instance_count(service, instances)
        targets[service] = [_target(settings, host_env, port_env, service,
                                    {**environ, **instance_ports(service, n, count, environ)})
                            for n in range(1, count + 1)]
    return targets


def _target(settings: list[config.Setting], host_env: str, port_env: str, service: str,
            environ: Mapping[str, str]) -> str:
    own = OWN_METRICS_PORT.get(service)
    if own and environ.get(own):
        port_env = own
    values = config.load([s for s in settings if s.env in (host_env, port_env)], environ)
    host = values[host_env].strip("[]")
    host = "127.0.0.1" if host in WILDCARDS else host
    return f"[{host}]:{values[port_env]}" if ":" in host else f"{host}:{values[port_env]}"


# Every service of `mpesa-pipeline run` and its module, in start order.
STACK = [
    ("daraja-sandbox", "services.daraja_sandbox"),
    ("ledger", "services.ledger"),
    ("stk-worker", "services.stk_worker"),
    ("webhook-gateway", "services.webhook_consumer"),
    ("ingress", "services.ingress"),
    ("onboarding-api", "services.channels"),
    ("audit-anchor", "services.ledger.anchors"),
    ("notifier", "services.notifier"),
    ("privacy", "services.privacy"),
]
# Services that may run as several processes, sharing their consumer groups' partitions.
SCALABLE = ("stk-worker", "webhook-gateway", "ledger")


@dataclass(frozen=True)
class StackProcess:
    name: str  # the service's name, or "<service>-<n>" for the n-th of several
    service: str
    argv: list[str]
    env: dict[str, str]  # its own variables (Kafka login, database role, ports), over the shared ones


def stack_processes(database_url: str, instances: Mapping[str, int] | None = None) -> list[StackProcess]:
    """The processes of `mpesa-pipeline run` (and of bench/pipeline_bench.py), `instances[service]` of
    each scalable one (default 1). database_url: the migration role's; each process gets its own role's."""
    urls = service_database_urls(database_url)
    logins = kafka_logins([name for name, _ in STACK])
    privacy = privacy_database_urls(database_url)
    processes = []
    for service, module in STACK:
        count = instance_count(service, instances)
        own = {**logins.get(service, {}), **({"DATABASE_URL": urls[service]} if service in urls else {}),
               **privacy.get(service, {})}
        for n in range(1, count + 1):
            name = service if count == 1 else f"{service}-{n}"
            processes.append(StackProcess(name, service, [sys.executable, "-m", module],
                                          {**own, **instance_ports(service, n, count)}))
    return processes


def instance_count(service: str, instances: Mapping[str, int] | None) -> int:
    return (instances or {}).get(service, 1) if service in SCALABLE else 1


def instance_ports(service: str, n: int, count: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ports of the n-th of `count` processes of a service. One alone keeps the configured ports.
    Of several, the n-th serves its metrics on the first's port + 100 × (n - 1) (9102, 9202, …), clear
    of the other services' ports; the gateways all take callbacks on WEBHOOK_PORT (the one address
    Daraja calls back) with SO_REUSEPORT, and each serves /metrics, /healthz and /readyz on a port
    of its own too: WEBHOOK_METRICS_PORT + 100 × (n - 1), or WEBHOOK_PORT + 100 × n (8181, 8281, …)."""
    if count == 1 or service not in METRICS_ENDPOINTS:
        return {}
    settings, _, port_env = METRICS_ENDPOINTS[service]
    if service in OWN_METRICS_PORT:
        own = OWN_METRICS_PORT[service]
        values = config.load([s for s in settings if s.env in (port_env, own)], environ)
        first = values[own] if values[own] is not None else values[port_env] + 100
        return {gateway.REUSE_PORT.env: "true", own: str(first + 100 * (n - 1))}
    first = config.load([s for s in settings if s.env == port_env], environ)[port_env]
    return {port_env: str(int(first) + 100 * (n - 1))}


def role_url(database_url: str, role: str) -> str:
    """The same database as `role`; no password in it (libpq takes it from PGPASSFILE)."""
    parts = urlsplit(database_url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


def service_database_urls(database_url: str) -> dict[str, str]:
    return {service: role_url(database_url, role) for service, role in SERVICE_ROLES.items()}


def privacy_database_urls(database_url: str) -> dict[str, dict[str, str]]:
    """The onboarding API serves a payer's export and erasure on a second pool as the privacy role."""
    return {"onboarding-api": {"PRIVACY_DATABASE_URL": role_url(database_url, "privacy")}}


def local_secret(name: str, make=lambda: secrets.token_urlsafe(32)) -> str:
    """Reads .local/secrets/<name>, creating it (0600) on first use."""
    path = SECRETS / name
    if not path.exists():
        SECRETS.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(make())
    return path.read_text().strip()


def dev_environment() -> dict[str, str]:
    """Secrets, the sandbox environment and the Kafka login (TLS, SCRAM) the services need, unless the
    environment already gives them."""
    env = {"WEBHOOK_TOKEN_SECRETS": local_secret("webhook-token-secret"), "ADMIN_TOKEN": local_secret("admin-token"),
           "DARAJA_SANDBOX_ADMIN_TOKEN": local_secret("daraja-sandbox-admin-token"), "MPESA_ENVIRONMENT": "sandbox",
           "KAFKA_CLIENT_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_CLIENT_SASL_MECHANISM": "SCRAM-SHA-512",
           "KAFKA_CLIENT_SSL_CA_LOCATION": str(KAFKA_CA.resolve()), "WEBHOOK_ALLOWED_NETWORKS": DEV_WEBHOOK_NETWORKS,
           "PSEUDONYM_KEY_FILE": str(PSEUDONYM_KEY.resolve())}
    if os.environ.get("KAFKA_PORT"):  # infra/kafka.sh started the broker there
        env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{os.environ['KAFKA_PORT']}"
    if os.environ.get("SCHEMA_REGISTRY_PORT"):  # infra/registry.sh started the registry there
        env["SCHEMA_REGISTRY_URL"] = f"http://127.0.0.1:{os.environ['SCHEMA_REGISTRY_PORT']}/apis/ccompat/v7"
    return {k: v for k, v in env.items() if not os.environ.get(k)}


ADMIN_LOGIN = ("KAFKA_CLIENT_SASL_USERNAME", "KAFKA_CLIENT_SASL_PASSWORD_FILE")
ADMIN_PRINCIPAL = "admin"  # infra/kafka.sh's, whose login infra/up.sh prints for tests and tools


def drop_admin_login(environ: MutableMapping[str, str]) -> None:
    """`make run` sources infra/up.sh's lines, which log in as the admin principal: no service may
    inherit that login (least privilege, docs/kafka-security.md), so it leaves the environment."""
    if environ.get(ADMIN_LOGIN[0]) == ADMIN_PRINCIPAL:
        for name in ADMIN_LOGIN:
            environ.pop(name, None)


def kafka_logins(services: list[str]) -> dict[str, dict[str, str]]:
    """Each service that has a Kafka principal logs in as it, with the password infra/kafka.sh made
    for it; nobody gets another's, and none the admin's. An operator's own login in the environment
    (another than the admin's, which drop_admin_login removed) wins."""
    if os.environ.get(ADMIN_LOGIN[0]) not in (None, "", ADMIN_PRINCIPAL):
        return {}
    return {name: {"KAFKA_CLIENT_SASL_USERNAME": name,
                   "KAFKA_CLIENT_SASL_PASSWORD_FILE": str((SECRETS / f"kafka-{name}.password").resolve())}
            for name in services if name in ACCESS}


# The demo merchant's processing agreement: a stand-in, so that the demo channel can be active.
DEMO_AGREEMENT = {"agreementReference": "DEMO-DPA", "agreementVersion": "1", "agreementSignedOn": "2026-01-01",
                  "lawfulBasis": "contract"}


async def onboard_sandbox_channel(onboarding: Onboarding, channel_id: str, display_name: str, actor: str) -> None:
    """An active channel on the Daraja sandbox's demo app (shortcode 174379); Conflict if it exists."""
    await onboarding.create_channel({
        "channelId": channel_id, "displayName": display_name, "shortcodeType": "paybill",
        "businessShortcode": "174379", "environment": "sandbox", "consentReference": "DEMO",
        "consentDate": "2026-01-01", **DEMO_AGREEMENT}, actor)
    await onboarding.set_credentials(channel_id, {
        "consumerKey": DEMO_CONSUMER_KEY, "consumerSecret": DEMO_CONSUMER_SECRET, "passkey": SANDBOX_PASSKEY}, actor)
    await onboarding.resume(channel_id, actor)


async def ensure_demo_channel(database_url: str, key_file: Path) -> None:
    """A channel on the Daraja sandbox's demo app, and an API key for it (kept in .local/secrets)."""
    LocalKeyFileProvider.open(key_file, create=True)
    pool = await open_pool(database_url, max_size=2)
    try:
        onboarding = Onboarding(pool, public_key_file=public_key_path(key_file))
        try:
            await onboard_sandbox_channel(onboarding, DEMO_CHANNEL, "Demo shop (Daraja sandbox)", "make-run")
        except Conflict:  # made by an earlier run, perhaps before agreements were recorded
            if (await onboarding.channel(DEMO_CHANNEL)).channel.missing_agreement_fields:
                await onboarding.update_channel(DEMO_CHANNEL, DEMO_AGREEMENT, "make-run")
        if not (SECRETS / "demo-api-key").exists():
            _, key = await onboarding.issue_api_key({"label": "make run demo", "channelIds": [DEMO_CHANNEL]},
                                                    "make-run")
            local_secret("demo-api-key", make=lambda: key)
    finally:
        await pool.close()


def demo_banner() -> str:
    """How to try it; the key stays in its file (0600), never in the console log."""
    return f"""
  Demo channel '{DEMO_CHANNEL}' is ready on the Daraja sandbox. Try:

  KEY=$(cat {SECRETS}/demo-api-key)
  curl -s -XPOST localhost:8080/api/payments -H 'Content-Type: application/json' \\
    -H "Authorization: Bearer $KEY" -H "Idempotency-Key: $(uuidgen || date +%s%N)" \\
    -d '{{"channelId":"{DEMO_CHANNEL}","amount":10,"phone":"0712345678","accountReference":"INV42"}}'
  curl -s localhost:8080/api/payments/<paymentId> -H "Authorization: Bearer $KEY"

  The sandbox's admin API (scenarios, push log) wants its own token:
  curl -s localhost:8089/sandbox/pushes -H "Authorization: Bearer $(cat {SECRETS}/daraja-sandbox-admin-token)"
"""


def prepare(database_url: str, key_file: Path, anchor_key_file: Path,
            webhooks_key_file: Path) -> tuple[dict[str, str], str]:
    """database_url: the migration role's; the demo channel is made as the onboarding role.
    key_file: the vault's; anchor_key_file: the audit anchors' signing key, made if missing;
    webhooks_key_file: the notifier's vault key (webhook signing secrets), made if missing."""
    env = dev_environment()
    migrate(database_url)
    create_key(anchor_key_file)  # no-op once it exists
    pseudonyms.create_key(Path(env.get("PSEUDONYM_KEY_FILE") or os.environ["PSEUDONYM_KEY_FILE"]))
    LocalKeyFileProvider.open(webhooks_key_file, create=True)
    asyncio.run(ensure_demo_channel(role_url(database_url, SERVICE_ROLES["onboarding-api"]), key_file))
    return env, demo_banner()


# `mpesa-pipeline run`'s options for the processes of each scalable service.
SCALE_OPTIONS = {"--workers": "stk-worker", "--gateways": "webhook-gateway", "--ledgers": "ledger"}


def scale_of(args: argparse.Namespace) -> dict[str, int]:
    return {service: getattr(args, option.lstrip("-")) for option, service in SCALE_OPTIONS.items()}


def _main(argv: list[str]) -> int:
    """infra/prometheus.sh: `python -m services.devstack metrics-targets [--workers N ...]` prints one
    "service host:port" line per process."""
    parser = argparse.ArgumentParser(prog="python -m services.devstack")
    parser.add_argument("command", choices=["metrics-targets"])
    for option in SCALE_OPTIONS:
        parser.add_argument(option, type=int, default=1)
    args = parser.parse_args(argv)
    try:
        targets = metrics_targets(instances=scale_of(args))
    except config.ConfigError as exc:
        print(f"metrics-targets: {exc}", file=sys.stderr)
        return 1
    for service, addresses in targets.items():
        for address in addresses:
            print(service, address)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
