"""The `mpesa-pipeline` command: operate the pipeline (migrations, running the stack, ...)."""
from __future__ import annotations

import argparse
import asyncio
import sys

from services.channels.cli import register as register_channels
from services.common import config

STACK = [
    ("daraja-sandbox", "services.daraja_sandbox"),
    ("ledger", "services.ledger"),
    ("stk-worker", "services.stk_worker"),
    ("webhook-gateway", "services.webhook_consumer"),
    ("ingress", "services.ingress"),
    ("onboarding-api", "services.channels"),
]


INFRA_LOGS = [("kafka", ".local/kafka/kafka.log"), ("postgresql", ".local/pg/postgres.log")]


def cmd_migrate(_: argparse.Namespace) -> int:
    from services.common.db import migrate
    cfg = config.load([config.DATABASE_URL])
    applied = migrate(cfg["DATABASE_URL"])
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    import psycopg
    from services.ledger.store import verify_audit

    async def verify() -> tuple[int, str | None]:
        async with await psycopg.AsyncConnection.connect(config.load([config.DATABASE_URL])["DATABASE_URL"]) as conn:
            return await verify_audit(conn, args.from_seq)

    count, problem = asyncio.run(verify())
    if problem:
        print(f"audit trail BROKEN after {count} rows: {problem}")
        return 1
    print(f"audit trail intact: {count} rows verified")
    return 0


def cmd_run(_: argparse.Namespace) -> int:
    from services.channels.settings import VAULT_KEY_FILE
    from services.devstack import kafka_logins, prepare
    from services.supervisor import supervise
    cfg = config.load([config.DATABASE_URL, VAULT_KEY_FILE])
    env, banner = prepare(cfg["DATABASE_URL"], cfg["VAULT_KEY_FILE"])
    print(banner, flush=True)
    logs = [(name, ["tail", "-n", "0", "-F", path]) for name, path in INFRA_LOGS]
    services = [(name, [sys.executable, "-m", module]) for name, module in STACK]
    return asyncio.run(supervise(logs + services, env, kafka_logins([name for name, _ in STACK])))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpesa-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("run", help="run every service in the foreground (Ctrl-C stops all)").set_defaults(func=cmd_run)
    register_channels(sub)
    audit = sub.add_parser("audit", help="the ledger's hash-chained audit trail").add_subparsers(dest="audit", required=True)
    verify = audit.add_parser("verify", help="recompute the hash chain; exit 1 if any row was edited or removed")
    verify.add_argument("--from", dest="from_seq", type=int, default=1,
                        help="start at this row, trusting the one before it (a checkpoint already verified)")
    verify.set_defaults(func=cmd_audit_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config.ConfigError as exc:
        print(f"mpesa-pipeline: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
