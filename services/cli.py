"""The `mpesa-pipeline` command: operate the pipeline (migrations, running the stack, ...)."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from services.channels.cli import register as register_channels
from services.channels.settings import VAULT_KEY_FILE
from services.common import config
from services.ledger.anchors import KEY_FILE, PUBLIC_KEY_FILE
from services.notifier.settings import NOTIFIER_VAULT_KEY_FILE
from services.operations.cli import register as register_payments
from services.operations.statement import register as register_reports
from services.privacy.cli import register as register_payers

INFRA_LOGS = [("kafka", ".local/kafka/kafka.log"), ("postgresql", ".local/pg/postgres.log")]

# Each command's settings, read once when it runs (config.load_into).
MIGRATE_SETTINGS = [config.DATABASE_URL]  # the schema's owner
AUDIT_VERIFY_SETTINGS = [config.database_url("auditor"), PUBLIC_KEY_FILE]
ANCHOR_KEY_SETTINGS = [KEY_FILE]
# `run` migrates as the owner (DATABASE_URL), then hands each service a URL of its own role.
RUN_SETTINGS = [config.DATABASE_URL, VAULT_KEY_FILE, KEY_FILE, NOTIFIER_VAULT_KEY_FILE]


@dataclass(frozen=True)
class MigrateSettings:
    database_url: str


@dataclass(frozen=True)
class AuditVerifySettings:
    database_url: str
    audit_anchor_public_key_file: Path


@dataclass(frozen=True)
class AnchorKeySettings:
    audit_anchor_key_file: Path


@dataclass(frozen=True)
class RunSettings:
    database_url: str
    vault_key_file: Path
    audit_anchor_key_file: Path
    notifier_vault_key_file: Path


def cmd_migrate(_: argparse.Namespace) -> int:
    import psycopg

    from services.common.db import migrate
    cfg = config.load_into(MigrateSettings, MIGRATE_SETTINGS)
    try:
        applied = migrate(cfg.database_url)
    except psycopg.Error as exc:  # e.g. a service's role, which may not create tables
        print(f"mpesa-pipeline migrate: {str(exc).strip().splitlines()[0]} (migrations run as the schema's owner)",
              file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    import psycopg

    from services.common.db import DatabaseUnreachable
    from services.ledger.anchors import load_public_keys, verify_anchors
    from services.ledger.store import verify_audit
    cfg = config.load_into(AuditVerifySettings, AUDIT_VERIFY_SETTINGS)
    path = cfg.audit_anchor_public_key_file
    keys = load_public_keys(path) if path.exists() else {}

    async def verify():
        try:
            conn = await psycopg.AsyncConnection.connect(cfg.database_url, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise DatabaseUnreachable(cfg.database_url, exc) from None
        async with conn:
            # One snapshot: the rows walked and the anchors checked are the same trail.
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            async with conn.transaction():
                count, problem = await verify_audit(conn, args.from_seq)
                return count, problem, None if problem else await verify_anchors(conn, keys)

    count, problem, anchors = asyncio.run(verify())
    problem = problem or anchors.problem
    if problem and not keys and not path.exists():
        problem += f" (no public key file at {path}: set AUDIT_ANCHOR_PUBLIC_KEY_FILE)"
    if problem:
        print(f"audit trail BROKEN after {count} rows: {problem}")
        return 1
    newest = anchors.newest
    print(f"audit trail intact: {count} rows verified; " + (
        f"{anchors.checked} anchors verified, the newest at row {newest.audit_seq} ({newest.anchored_at.isoformat()})"
        if newest else "no anchor yet"))
    return 0


def cmd_anchor_key(_: argparse.Namespace) -> int:
    from services.ledger.anchors import create_key, public_key_path
    path = config.load_into(AnchorKeySettings, ANCHOR_KEY_SETTINGS).audit_anchor_key_file
    if not create_key(path):
        print(f"mpesa-pipeline audit anchor-key: {path} exists; a key is never overwritten", file=sys.stderr)
        return 1
    print(f"made {path} (private, 0600: only where the anchoring job runs) and {public_key_path(path)} "
          "(public: where `audit verify` runs)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from services.devstack import drop_admin_login, prepare, stack_processes
    from services.supervisor import supervise
    cfg = config.load_into(RunSettings, RUN_SETTINGS)
    env, banner = prepare(cfg.database_url, cfg.vault_key_file, cfg.audit_anchor_key_file,
                          cfg.notifier_vault_key_file)
    print(banner, flush=True)
    # Migrated as the schema's owner (prepare); each service logs in as its own role and none
    # inherits the owner's URL.
    os.environ.pop("DATABASE_URL", None)
    drop_admin_login(os.environ)
    processes = stack_processes(cfg.database_url, instances(args))
    logs = [(name, ["tail", "-n", "0", "-F", path]) for name, path in INFRA_LOGS]
    own_env = {p.name: p.env for p in processes}
    return asyncio.run(supervise(logs + [(p.name, p.argv) for p in processes], env, own_env))


def instances(args: argparse.Namespace) -> dict[str, int]:
    from services.devstack import scale_of
    return scale_of(args)


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError("must be 1 to 16")
    return value


def version() -> str:
    """The installed package's version ("unknown" in a checkout never installed)."""
    try:
        return metadata.version("mpesa-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpesa-pipeline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations (as the schema's owner: DATABASE_URL)"
                   ).set_defaults(func=cmd_migrate)
    run = sub.add_parser("run", help="run every service in the foreground (Ctrl-C stops all)")
    for option, what in (("--workers", "STK workers"), ("--gateways", "webhook gateways"), ("--ledgers", "ledgers")):
        how = ("they share the callback port (SO_REUSEPORT)" if option == "--gateways"
               else "Kafka's consumer group spreads the partitions across them")
        run.add_argument(option, type=_positive, default=1, help=f"processes of {what} (default 1): {how}")
    run.set_defaults(func=cmd_run)
    register_channels(sub)
    register_payments(sub)
    register_reports(sub)
    register_payers(sub)
    audit = sub.add_parser("audit", help="the ledger's hash-chained audit trail").add_subparsers(dest="audit",
                                                                                                 required=True)
    verify = audit.add_parser("verify", help="recompute the hash chain and check its signed anchors; exit 1 if "
                              "any row was edited or removed")
    verify.add_argument("--from", dest="from_seq", type=int, default=1,
                        help="start at this row, trusting the one before it (a checkpoint already verified)")
    verify.set_defaults(func=cmd_audit_verify)
    audit.add_parser("anchor-key", help="make the Ed25519 key pair that signs the chain's anchors "
                     "(AUDIT_ANCHOR_KEY_FILE)").set_defaults(func=cmd_anchor_key)
    _name_commands(parser)
    return parser


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Gives every command its full name ("mpesa-pipeline channels list"), for its error lines."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        parser.set_defaults(command_name=parser.prog)
    for action in subcommands:
        for child in action.choices.values():
            _name_commands(child)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = getattr(args, "command_name", "mpesa-pipeline")
    try:
        return args.func(args)
    except config.ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        line = unreachable_line(exc)
        if line is None:
            raise  # a bug: its traceback is what helps
        print(f"{name}: {line}", file=sys.stderr)  # one line, no traceback: what did not answer, where, why
        return 1


def unreachable_line(exc: Exception) -> str | None:
    """What a command says when PostgreSQL or Kafka does not answer (None for any other error):
    PostgreSQL's host, port and reason (never its user or password), or Kafka's reason."""
    import psycopg
    from confluent_kafka import KafkaException

    from services.common.db import DatabaseUnreachable, reason_of
    from services.common.kafka import PublishError
    if isinstance(exc, DatabaseUnreachable):
        return str(exc)
    if isinstance(exc, psycopg.OperationalError):  # the connection was lost while the command ran
        return f"lost the connection to PostgreSQL ({reason_of(exc)})"
    if isinstance(exc, (PublishError, KafkaException)):
        return f"cannot reach Kafka ({reason_of(exc)})"
    return None


if __name__ == "__main__":
    sys.exit(main())
