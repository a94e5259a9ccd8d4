"""`mpesa-pipeline channels|keys|webhooks|vault|admin-token`: the onboarding operations from a shell.

The commands talk to PostgreSQL directly (DATABASE_URL), through the same operations as the admin
API, and print JSON. Secrets are never taken from the command line, where `ps` and shell history
would show them: credentials come from prompts, from a JSON object on stdin (--from-stdin), or
from MPESA_CONSUMER_KEY / MPESA_CONSUMER_SECRET / MPESA_PASSKEY.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import json
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.channels import settings as s
from services.channels.compliance import FLAGS
from services.channels.model import AGREEMENT_FIELDS, ENVIRONMENTS, LAWFUL_BASES, SHORTCODE_TYPES
from services.channels.webhook_model import DELIVERY_STATES
from services.common import config
from services.common.text import untrusted
from services.notifier.events import EVENT_TYPES
from services.notifier.settings import NOTIFIER_VAULT_KEY_FILE

if TYPE_CHECKING:
    from services.channels.repository import SealedTable

# Operators onboard as the onboarding role, as the onboarding API does (s.ONBOARDING_SETTINGS); the
# vault commands need the private key file, so they run where the STK worker runs (with --webhooks,
# where the notifier runs: its key file seals webhook signing secrets).
VAULT_SETTINGS = [s.VAULT_KEY_FILE, NOTIFIER_VAULT_KEY_FILE, config.database_url("onboarding")]


@dataclass(frozen=True)
class VaultSettings:
    vault_key_file: Path
    notifier_vault_key_file: Path
    database_url: str


CREDENTIAL_ENV = {"consumerKey": "MPESA_CONSUMER_KEY", "consumerSecret": "MPESA_CONSUMER_SECRET",
                  "passkey": "MPESA_PASSKEY"}


def yes_no(value: str) -> bool:
    """true/false for a boolean option (every success confirmed by an STK query before Settled)."""
    if value.lower() in ("true", "yes", "on"):
        return True
    if value.lower() in ("false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError("must be true or false")


def key_names(value: str) -> list[str]:
    """A comma-separated list of metadata key names ("cart,campaign"); "" for none."""
    return [name.strip() for name in value.split(",") if name.strip()]


_CHANNEL_OPTIONS: list[tuple[str, str, Callable[[str], Any]]] = [  # (option, API field, type)
    ("--name", "displayName", str), ("--shortcode-type", "shortcodeType", str),
    ("--shortcode", "businessShortcode", str), ("--till-number", "tillNumber", str),
    ("--environment", "environment", str), ("--consent-reference", "consentReference", str),
    ("--consent-date", "consentDate", str), ("--agreement-reference", "agreementReference", str),
    ("--agreement-version", "agreementVersion", str), ("--agreement-signed-on", "agreementSignedOn", str),
    ("--lawful-basis", "lawfulBasis", str), ("--max-amount", "maxAmount", int),
    ("--pushes-per-second", "pushesPerSecond", float),
    ("--confirm-success-by-query", "confirmSuccessByQuery", yes_no),
    ("--payer-data-retention-days", "payerDataRetentionDays", int),
    ("--analytics-metadata-keys", "analyticsMetadataKeys", key_names),
]
_CLEARABLE = {"till-number": ["tillNumber"], "consent": ["consentReference", "consentDate"],
              "agreement": list(AGREEMENT_FIELDS),
              "max-amount": ["maxAmount"], "pushes-per-second": ["pushesPerSecond"],
              "payer-data-retention-days": ["payerDataRetentionDays"]}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the commands to `mpesa-pipeline` (services/cli.py)."""
    _register_channels(subparsers)
    _register_keys(subparsers)
    _register_webhooks(subparsers)
    _register_vault(subparsers)
    subparsers.add_parser("admin-token", help="generate an admin token for the onboarding API",
                          description="Prints a new random admin token and the ADMIN_TOKEN_SHA256 value to "
                                      "configure; the token is not stored anywhere.").set_defaults(func=cmd_admin_token)


def _register_channels(subparsers) -> None:
    channels = subparsers.add_parser("channels", help="create, change, list, suspend and resume channels; "
                                                      "set and rotate their Daraja credentials",
                                     description="Channels are the merchants we act for. Output is JSON.")
    sub = channels.add_subparsers(dest="channels_command", required=True)
    create = sub.add_parser("create", help="create a channel (status onboarding)")
    create.add_argument("channel_id")
    _add_channel_options(create)
    create.set_defaults(func=_onboarding_command(lambda o, a, actor: o.create_channel(_channel_body(a), actor)))
    update = sub.add_parser("update", help="change some fields of a channel")
    update.add_argument("channel_id")
    _add_channel_options(update)
    update.add_argument("--clear", action="append", choices=sorted(_CLEARABLE), default=[],
                        help="remove an optional field (repeatable)")
    update.set_defaults(func=_onboarding_command(
        lambda o, a, actor: o.update_channel(a.channel_id, _channel_body(a), actor)))
    sub.add_parser("list", help="list channels (credentials as fingerprints only)").set_defaults(
        func=_onboarding_command(lambda o, a, actor: o.channels()))
    for name, help_text, operation in [
        ("show", "show one channel", lambda o, a, actor: o.channel(a.channel_id)),
        ("suspend", "stop new payments for a channel", lambda o, a, actor: o.suspend(a.channel_id, actor)),
        ("resume", "activate a channel (first time, or after a suspension); needs consent, the processing "
                   "agreement and credentials",
         lambda o, a, actor: o.resume(a.channel_id, actor)),
    ]:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("channel_id")
        command.set_defaults(func=_onboarding_command(operation))
    report = sub.add_parser("compliance", help="per channel: agreement, consent, credential age, retention, last "
                                               "erasure, and what is missing",
                            description="Flags: " + ", ".join(FLAGS) + ". Exit status 0 even when flags are raised: "
                                        "`activeFlagged` lists the active channels that have one.")
    report.add_argument("--json", action="store_true", help="the report as JSON instead of a table")
    report.set_defaults(func=_onboarding_command(_compliance))
    for name, method, help_text in [
        ("set-credentials", "set_credentials", "set a channel's first Daraja credentials"),
        ("rotate-credentials", "rotate_credentials", "new version of a channel's Daraja credentials (the older "
                                                     "stay readable for payments in flight)"),
    ]:
        command = sub.add_parser(name, help=help_text,
                                 description="Credentials are read from a JSON object on stdin (--from-stdin: "
                                             '{"consumerKey", "consumerSecret", "passkey"}), else from '
                                             "MPESA_CONSUMER_KEY, MPESA_CONSUMER_SECRET and MPESA_PASSKEY, else "
                                             "from prompts. Never from the command line.")
        command.add_argument("channel_id")
        command.add_argument("--validate", action="store_true",
                             help="obtain a Daraja OAuth token with them first; store nothing if refused")
        command.add_argument("--from-stdin", action="store_true", help="read the credentials as JSON from stdin")
        command.set_defaults(func=_onboarding_command(
            lambda o, a, actor, method=method: getattr(o, method)(a.channel_id, _credentials_body(a), actor)))


def _register_keys(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="issue, revoke and list upstream API keys",
                                 description="Upstream API keys authenticate callers of the ingress; each is scoped "
                                             "to channels and stored hashed.")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    issue = sub.add_parser("issue", help="issue a key (printed once; store it then)")
    issue.add_argument("--label", required=True, help="who the key is for")
    issue.add_argument("--channel", dest="channels", action="append", required=True,
                       help="a channel the key may act for (repeatable)")
    issue.set_defaults(func=_onboarding_command(lambda o, a, actor: _issue(o, a, actor)))
    revoke = sub.add_parser("revoke", help="revoke a key by its key id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_onboarding_command(lambda o, a, actor: o.revoke_api_key(a.key_id, actor)))
    sub.add_parser("list", help="list keys (never the keys themselves)").set_defaults(
        func=_onboarding_command(lambda o, a, actor: o.api_keys()))


def _register_webhooks(subparsers) -> None:
    hooks = subparsers.add_parser("webhooks", help="a channel's webhook endpoints: add, change, disable, delete, "
                                                   "rotate their signing secrets; the delivery log and redelivery",
                                  description="Status webhooks (docs/webhooks.md, \"Managing endpoints\"). A signing "
                                              "secret is printed once, when it is made (add, rotate-secret). Output "
                                              "is JSON.")
    sub = hooks.add_subparsers(dest="webhooks_command", required=True)
    add = sub.add_parser("add", help="add an endpoint to a channel (its signing secret is printed once)")
    add.add_argument("channel_id")
    add.add_argument("--url", required=True, help="https URL of the receiver (http only to loopback)")
    _add_endpoint_options(add)
    add.set_defaults(func=_webhooks_command(_add_endpoint))
    listing = sub.add_parser("list", help="a channel's endpoints (secrets as version and fingerprint only)")
    listing.add_argument("channel_id")
    listing.add_argument("--all", action="store_true", help="deleted endpoints too")
    listing.set_defaults(func=_webhooks_command(lambda w, a, actor: w.endpoints(a.channel_id, include_deleted=a.all)))
    update = sub.add_parser("update", help="change an endpoint's URL, event types or description")
    update.add_argument("endpoint_id")
    update.add_argument("--url", help="new https URL of the receiver")
    _add_endpoint_options(update)
    update.add_argument("--clear-description", action="store_true", help="remove the description")
    update.set_defaults(func=_webhooks_command(
        lambda w, a, actor: w.update_endpoint(a.endpoint_id, _endpoint_body(a), actor)))
    disable = sub.add_parser("disable", help="stop delivering to an endpoint")
    disable.add_argument("endpoint_id")
    disable.add_argument("--reason", required=True, help="why (kept on the endpoint and in the audit)")
    disable.set_defaults(func=_webhooks_command(
        lambda w, a, actor: w.disable(a.endpoint_id, {"reason": a.reason}, actor)))
    for name, help_text, operation in [
        ("show", "one endpoint", lambda w, a, actor: w.endpoint(a.endpoint_id)),
        ("enable", "deliver to it again (clears the reason and the failure run)",
         lambda w, a, actor: w.enable(a.endpoint_id, actor)),
        ("delete", "delete for good (pending deliveries cancelled; the log is kept)",
         lambda w, a, actor: w.delete(a.endpoint_id, actor)),
    ]:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("endpoint_id")
        command.set_defaults(func=_webhooks_command(operation))
    rotate = sub.add_parser("rotate-secret", help="a new signing secret (printed once); the previous one keeps "
                                                  "signing for the overlap")
    rotate.add_argument("endpoint_id")
    rotate.add_argument("--overlap", type=int, dest="overlap_seconds",
                        help="seconds the previous secret keeps signing (default a day, at most 7 days; 0 = none)")
    rotate.set_defaults(func=_webhooks_command(_rotate_secret))
    deliveries = sub.add_parser("deliveries", help="an endpoint's delivery log, newest first")
    deliveries.add_argument("endpoint_id")
    deliveries.add_argument("--state", choices=DELIVERY_STATES, help="only deliveries in this state")
    deliveries.add_argument("--since", help="events that occurred at or after this time (ISO 8601 with offset)")
    deliveries.add_argument("--cursor", help="the nextCursor of the previous page")
    deliveries.add_argument("--limit", help="deliveries per page (default 50, at most 200)")
    deliveries.set_defaults(func=_webhooks_command(lambda w, a, actor: w.deliveries(a.endpoint_id, {
        name: getattr(a, name) for name in ("state", "since", "cursor", "limit") if getattr(a, name) is not None})))
    attempts = sub.add_parser("attempts", help="one delivery with its body and every attempt "
                                               "(time, HTTP status, latency, error)")
    attempts.add_argument("delivery_id")
    attempts.set_defaults(func=_webhooks_command(lambda w, a, actor: w.delivery(a.delivery_id)))
    redeliver = sub.add_parser("redeliver", help="send again: one delivery, one event, or every event since a time",
                               description="`redeliver --delivery ID`, `redeliver ENDPOINT --event-id ID` or "
                                           "`redeliver ENDPOINT --since TIME [--until TIME]`. The same webhook-id is "
                                           "sent, so a receiver that had it already can tell.")
    redeliver.add_argument("endpoint_id", nargs="?")
    which = redeliver.add_mutually_exclusive_group(required=True)
    which.add_argument("--delivery", dest="delivery_id", help="a delivery id (from `webhooks deliveries`)")
    which.add_argument("--event-id", help="a status event's id (the webhook-id a receiver saw)")
    which.add_argument("--since", help="every event that occurred at or after this time (ISO 8601 with offset)")
    redeliver.add_argument("--until", help="with --since: only events before this time")
    redeliver.set_defaults(func=_webhooks_command(_redeliver))


def _add_endpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--event", dest="event_types", action="append", choices=EVENT_TYPES,
                        help="an event type to deliver (repeatable; default every type)")
    parser.add_argument("--description", help="what the endpoint is for (at most 200 characters)")


def _endpoint_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.url is not None:
        body["url"] = args.url
    if args.event_types is not None:
        body["eventTypes"] = args.event_types
    if args.description is not None:
        body["description"] = args.description
    if getattr(args, "clear_description", False):
        body["description"] = None
    return body


async def _add_endpoint(webhooks, args: argparse.Namespace, actor: str) -> dict[str, Any]:
    record, secret = await webhooks.add_endpoint(args.channel_id, _endpoint_body(args), actor)
    print("the signing secret is shown once: give it to the receiver now", file=sys.stderr)
    return {**record.view(), "secret": secret}


async def _rotate_secret(webhooks, args: argparse.Namespace, actor: str) -> dict[str, Any]:
    body = {} if args.overlap_seconds is None else {"overlapSeconds": args.overlap_seconds}
    record, secret = await webhooks.rotate_secret(args.endpoint_id, body, actor)
    print("the new signing secret is shown once: give it to the receiver now", file=sys.stderr)
    return {**record.view(), "secret": secret}


async def _redeliver(webhooks, args: argparse.Namespace, actor: str) -> dict[str, Any]:
    if args.delivery_id is not None:
        if args.endpoint_id is not None or args.until is not None:
            raise _UsageError("--delivery takes no endpoint id and no --until")
        return await webhooks.redeliver_delivery(args.delivery_id, actor)
    if args.endpoint_id is None:
        raise _UsageError("name the endpoint: redeliver ENDPOINT --event-id ID | --since TIME")
    body = {"eventId": args.event_id} if args.event_id is not None else {"since": args.since}
    if args.until is not None:
        body["until"] = args.until
    return await webhooks.redeliver(args.endpoint_id, body, actor)


def _register_vault(subparsers) -> None:
    vault = subparsers.add_parser("vault", help="the key-encryption key: create, inspect, rotate",
                                  description="Run these where the key file lives: the STK worker's host for "
                                              "channel credentials, the notifier's with --webhooks.")
    sub = vault.add_subparsers(dest="vault_command", required=True)
    for name, help_text, func in [
        ("init", "create the key file (mode 0600) and its public .pub.json if missing", cmd_vault_init),
        ("status", "the key file's keys and how many credential versions (or webhook secrets) each wraps",
         cmd_vault_status),
        ("rotate-kek", "new key-encryption key; re-wrap every data key under it", cmd_vault_rotate),
        ("retire-old", "re-wrap what is still under older keys, then drop the keys no row uses (no new key)",
         cmd_vault_retire_old),
    ]:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--key-file", type=Path, help="default: $VAULT_KEY_FILE, else .local/vault/kek.json; "
                                                           "with --webhooks $NOTIFIER_VAULT_KEY_FILE, else "
                                                           ".local/vault/webhooks-kek.json")
        command.add_argument("--webhooks", action="store_true",
                             help="the notifier's key file and the webhook signing secrets it seals, "
                                  "instead of the STK worker's and the channel credentials")
        command.set_defaults(func=func)
        if name == "rotate-kek":
            command.add_argument("--retire-old", action="store_true",
                                 help="then drop old keys from the key file if no row uses them any more")


# Options with a fixed set of values: argparse refuses others and the help lists them.
_CHANNEL_CHOICES = {"shortcodeType": SHORTCODE_TYPES, "environment": ENVIRONMENTS, "lawfulBasis": LAWFUL_BASES}
_CHANNEL_METAVARS = {"confirmSuccessByQuery": "{true,false}", "analyticsMetadataKeys": "KEY[,KEY...]"}


def _add_channel_options(parser: argparse.ArgumentParser) -> None:
    for option, field, kind in _CHANNEL_OPTIONS:
        parser.add_argument(option, dest=field, type=kind, choices=_CHANNEL_CHOICES.get(field),
                            metavar=_CHANNEL_METAVARS.get(field), help=f"API field {field}")


def _channel_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"channelId": args.channel_id}
    body.update({field: getattr(args, field) for _, field, _ in _CHANNEL_OPTIONS if getattr(args, field) is not None})
    for name in getattr(args, "clear", []):
        body.update({field: None for field in _CLEARABLE[name]})
    return body


def _credentials_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.from_stdin:
        try:
            body = json.loads(sys.stdin.read())
        except ValueError:
            raise _UsageError("stdin is not a JSON object with consumerKey, consumerSecret and passkey") from None
    elif all(os.environ.get(env) for env in CREDENTIAL_ENV.values()):
        body = {field: os.environ[env] for field, env in CREDENTIAL_ENV.items()}
    elif sys.stdin.isatty():
        body = {field: getpass.getpass(f"{field}: ") for field in CREDENTIAL_ENV}
    else:
        raise _UsageError("no credentials: use --from-stdin, set " + ", ".join(CREDENTIAL_ENV.values())
                          + ", or run in a terminal to be prompted")
    if not isinstance(body, dict):
        raise _UsageError("stdin must hold a JSON object")
    return {**body, "validate": args.validate}


_COMPLIANCE_COLUMNS = [("channel", "channelId"), ("status", "status"), ("agreement", "agreementReference"),
                       ("version", "agreementVersion"), ("signed", "agreementSignedOn"), ("basis", "lawfulBasis"),
                       ("consent", "consentReference"), ("cred. age (d)", "credentialsAgeDays"),
                       ("retention (d)", "payerDataRetentionDays"), ("last erasure", "lastErasureAt"),
                       ("flags", "flags")]


async def _compliance(onboarding, args: argparse.Namespace, actor: str) -> Any:
    report = await onboarding.compliance()
    if args.json:
        return report
    print(compliance_table(report))
    return _PRINTED


def compliance_table(report: dict[str, Any]) -> str:
    """The report as aligned columns; '-' for nothing recorded, 'default' for the default retention.
    Text that merchants' paperwork supplied is escaped: a bidi override must not reorder a terminal."""
    def cell(channel: dict[str, Any], field: str) -> str:
        value = channel[field]
        if field == "flags":
            return ",".join(value) or "ok"
        if value is None:
            return "default" if field == "payerDataRetentionDays" else "-"
        return str(value)[:19] if field == "lastErasureAt" else untrusted(str(value), 128)
    rows = [[title for title, _ in _COMPLIANCE_COLUMNS]]
    rows += [[cell(channel, field) for _, field in _COMPLIANCE_COLUMNS] for channel in report["channels"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COMPLIANCE_COLUMNS))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    flagged = report["activeFlagged"]
    lines.append(f"active channels with a flag: {', '.join(flagged) if flagged else 'none'}")
    return "\n".join(lines)


async def _issue(onboarding, args: argparse.Namespace, actor: str) -> dict[str, Any]:
    view, api_key = await onboarding.issue_api_key({"label": args.label, "channelIds": args.channels}, actor)
    print("the API key is shown once: store it now", file=sys.stderr)
    return {**view, "apiKey": api_key}


class _UsageError(Exception):
    pass


_PRINTED = object()  # what an operation returns when it printed its own output


def _actor() -> str:
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


def _onboarding_command(operation: Callable[..., Awaitable[Any]]) -> Callable[[argparse.Namespace], int]:
    """Wraps an Onboarding call: config, a pool, errors as one clear message and exit status 1."""
    def command(args: argparse.Namespace) -> int:
        cfg = config.load_into(s.OnboardingSettings, s.ONBOARDING_SETTINGS)
        return asyncio.run(_run_onboarding(cfg, operation, args, _onboarding))
    return command


def _webhooks_command(operation: Callable[..., Awaitable[Any]]) -> Callable[[argparse.Namespace], int]:
    """As _onboarding_command, for a WebhookManagement call."""
    def command(args: argparse.Namespace) -> int:
        cfg = config.load_into(s.OnboardingSettings, s.ONBOARDING_SETTINGS)
        return asyncio.run(_run_onboarding(cfg, operation, args, _webhooks))
    return command


def _onboarding(pool, cfg: s.OnboardingSettings) -> Any:
    from services.channels.onboarding import Onboarding, daraja_credential_check
    from services.daraja.client import DarajaTimeouts
    timeouts = DarajaTimeouts(connect_s=cfg.daraja_connect_timeout_s, read_s=cfg.daraja_read_timeout_s)
    return Onboarding(pool, public_key_file=cfg.vault_public_key_file,
                      credential_check=daraja_credential_check(cfg.daraja_base_url, timeouts))


def _webhooks(pool, cfg: s.OnboardingSettings) -> Any:
    from services.channels.webhooks import WebhookManagement
    from services.notifier.destinations import DestinationPolicy
    return WebhookManagement(pool, public_key_file=cfg.webhook_vault_public_key_file,
                             policy=DestinationPolicy(cfg.webhook_allowed_networks))


async def _run_onboarding(cfg: s.OnboardingSettings, operation, args: argparse.Namespace, build) -> int:
    from services.channels.onboarding import OnboardingError
    from services.common.db import open_pool
    pool = await open_pool(cfg.database_url, min_size=1, max_size=2)
    try:
        result = await operation(build(pool, cfg), args, _actor())
    except OnboardingError as error:
        _print_error(error.detail, error.errors)
        return 1
    except _UsageError as error:
        _print_error(str(error), {})
        return 2
    finally:
        await pool.close()
    if result is not _PRINTED:
        print(json.dumps(_plain(result), indent=2))
    return 0


def _plain(result: Any) -> Any:
    if isinstance(result, list):
        return [_plain(item) for item in result]
    return result.view() if hasattr(result, "view") else result


def _print_error(detail: str, errors: dict[str, str]) -> None:
    print(f"mpesa-pipeline: {detail}", file=sys.stderr)
    for field, message in errors.items():
        print(f"  {field}: {message}", file=sys.stderr)


def cmd_admin_token(_: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(32)
    print(f"ADMIN_TOKEN={token}")
    print(f"ADMIN_TOKEN_SHA256={hashlib.sha256(token.encode()).hexdigest()}")
    print("give the onboarding API ADMIN_TOKEN_SHA256 and keep the token with its callers", file=sys.stderr)
    return 0


def _vault_target(args: argparse.Namespace) -> tuple[Path, SealedTable, str]:
    """(the key file, the table it seals, the database URL): --key-file (when given) in place of
    VAULT_KEY_FILE, or of NOTIFIER_VAULT_KEY_FILE with --webhooks."""
    from services.channels.repository import CREDENTIALS, WEBHOOK_SECRETS
    cfg = config.load_into(VaultSettings, VAULT_SETTINGS)
    if args.webhooks:
        return args.key_file or cfg.notifier_vault_key_file, WEBHOOK_SECRETS, cfg.database_url
    return args.key_file or cfg.vault_key_file, CREDENTIALS, cfg.database_url


# How a report names a row's owner, per sealed table.
_OWNER_FIELD = {"channel_credentials": "channelId", "webhook_secrets": "endpointId"}


def cmd_vault_init(args: argparse.Namespace) -> int:
    from services.channels.vault import LocalKeyFileProvider, VaultError, public_key_path
    path, _, _ = _vault_target(args)
    existed = path.exists()
    try:
        provider = LocalKeyFileProvider.open(path, create=True)
    except VaultError as exc:
        _print_error(str(exc), {})
        return 1
    print(json.dumps({"keyFile": str(path), "publicKeyFile": str(public_key_path(path)), "created": not existed,
                      "activeKeyId": provider.key_id, "keyIds": list(provider.key_ids)}, indent=2))
    return 0


def cmd_vault_status(args: argparse.Namespace) -> int:
    return asyncio.run(_vault_status(*_vault_target(args)))


async def _vault_status(path: Path, table: SealedTable, database_url: str) -> int:
    from services.channels import repository as repo
    from services.channels.vault import LocalKeyFileProvider, VaultError
    from services.common.db import open_pool
    try:
        provider = LocalKeyFileProvider.open(path)
    except VaultError as exc:
        _print_error(str(exc), {})
        return 1
    pool = await open_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.connection() as conn:
            usage = await repo.rows_per_kek(conn, table=table)
    finally:
        await pool.close()
    unheld = {k: n for k, n in usage.items() if k not in provider.key_ids}
    print(json.dumps({"keyFile": str(path), "table": table.name, "activeKeyId": provider.key_id,
                      "versionsPerKey": {k: usage.get(k, 0) for k in provider.key_ids},
                      "versionsUnderKeysNotHeld": unheld}, indent=2))
    return 1 if unheld else 0


def cmd_vault_rotate(args: argparse.Namespace) -> int:
    return asyncio.run(_vault_rotate(*_vault_target(args), args.retire_old))


def cmd_vault_retire_old(args: argparse.Namespace) -> int:
    return asyncio.run(_vault_rotate(*_vault_target(args), retire_old=True, new_key=False))


async def _vault_rotate(path: Path, table: SealedTable, database_url: str, retire_old: bool, *,
                        new_key: bool = True) -> int:
    from services.channels.rotation import retire_old_keys, rotate_kek
    from services.channels.vault import LocalKeyFileProvider, VaultError
    from services.common.db import open_pool
    try:
        provider = LocalKeyFileProvider.open(path)
    except VaultError as exc:
        _print_error(str(exc), {})
        return 1
    pool = await open_pool(database_url, min_size=1, max_size=2)
    try:
        if new_key:
            report = await rotate_kek(pool, provider, _actor(), retire_old=retire_old, table=table)
        else:
            report = await retire_old_keys(pool, provider, _actor(), table=table)
    finally:
        await pool.close()
    owner = _OWNER_FIELD[table.name]
    print(json.dumps({"table": table.name, "activeKeyId": report.active_key_id, "rewrapped": len(report.rewrapped),
                      "failed": [{owner: o, "version": v, "reason": r} for o, v, r in report.failed],
                      "versionsUnderKeysNotHeld": report.unheld, "retiredKeyIds": report.retired}, indent=2))
    return 0 if report.complete else 1
