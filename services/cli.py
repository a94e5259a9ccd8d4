"""The `mpesa-pipeline` command: operate the pipeline (migrations, running the stack, ...)."""
from __future__ import annotations

import argparse
import asyncio
import sys

from services.common import config

STACK = [
    ("ledger", "services.ledger"),
    ("ingress", "services.ingress"),
]


def cmd_migrate(_: argparse.Namespace) -> int:
    from services.common.db import migrate
    cfg = config.load([config.DATABASE_URL])
    applied = migrate(cfg["DATABASE_URL"])
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


def cmd_run(_: argparse.Namespace) -> int:
    from services.supervisor import supervise
    return asyncio.run(supervise([(name, [sys.executable, "-m", module]) for name, module in STACK]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpesa-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("run", help="run every service in the foreground (Ctrl-C stops all)").set_defaults(func=cmd_run)
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
