"""`mpesa-pipeline payers export|erase`: a payer's own requests from a shell (README.md, "Payers' data:
access and erasure").

The commands log in as the privacy role (DATABASE_URL) and name the payer in their record by a keyed
pseudonym (PSEUDONYM_KEY_FILE). The number is read from --phone, or from stdin with `--phone -` (out
of the shell's history). Output is JSON. A refusal or an unreachable database is one line on stderr,
never a traceback; no line quotes the number. Exit status: 0 done, 1 refused or unreachable, 2 bad
usage or configuration.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from services.common import config
from services.common.text import untrusted
from services.operations.model import DeskError, InvalidInput, actor_of
from services.privacy.settings import PAYERS_SETTINGS, PayersSettings

EXIT_REFUSED, EXIT_USAGE = 1, 2
DATABASE_WAIT_S = 5.0
PHONE_READ_MAX = 64  # characters read from stdin for `--phone -`: a number, not a file


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `payers` to `mpesa-pipeline` (services/cli.py)."""
    payers = subparsers.add_parser(
        "payers", help="a payer's own requests: export what we hold about them, or erase it",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = payers.add_subparsers(dest="payers_command", required=True)
    export = sub.add_parser("export", help="everything we hold about one payer, as JSON (subject access)")
    _add_common(export)
    export.add_argument("--reason", help="why, in 1-500 characters (kept in the request's record)")
    export.add_argument("--output", type=Path, help="write the JSON to this file (0600) instead of stdout")
    export.set_defaults(func=_command("export"))
    erase = sub.add_parser("erase", help="erase one payer's data; the money records stay")
    _add_common(erase)
    erase.add_argument("--reason", required=True, help="why, in 1-500 characters (kept in the request's record)")
    erase.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    erase.set_defaults(func=_command("erase"), output=None)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phone", required=True, help="the payer's number in any form the ingress accepts "
                        "(07…, 2547…, +2547…), or - to read it from stdin")
    parser.add_argument("--channel", help="only this channel's payments (default: every channel)")
    parser.add_argument("--operator", help="who you are (default: your login name); recorded as '<operator> via cli'")


def _command(kind: str):
    def command(args: argparse.Namespace) -> int:
        cfg = config.load_into(PayersSettings, PAYERS_SETTINGS)
        logging.getLogger().addHandler(logging.NullHandler())  # the pool's own warnings would bury the one line
        return asyncio.run(_run(cfg, kind, args))
    return command


def _body(args: argparse.Namespace) -> dict[str, Any]:
    phone = sys.stdin.readline(PHONE_READ_MAX).strip() if args.phone == "-" else args.phone
    body = {"phone": phone, "operator": args.operator or getpass.getuser()}
    if args.channel is not None:
        body["channel"] = args.channel
    if args.reason is not None:
        body["reason"] = args.reason
    return body


async def _run(cfg: PayersSettings, kind: str, args: argparse.Namespace) -> int:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    from services.common.pseudonyms import Pseudonyms
    from services.privacy.payers import Payers, parse_request
    try:
        request, errors = parse_request(kind, _body(args))
        if request is None:
            raise InvalidInput(f"the {kind} request is not valid; nothing was done", errors)
        if kind == "erase" and not args.yes and not _confirmed(request.channel_id):
            _fail("not confirmed; nothing was erased")
            return EXIT_REFUSED
        pseudonyms = Pseudonyms.from_file(cfg.pseudonym_key_file)
    except DeskError as error:
        _fail(error.detail + "".join(f"; {field}: {message}" for field, message in error.errors.items()))
        return EXIT_USAGE
    except (OSError, ValueError) as error:
        _fail(f"cannot read the pseudonym key (PSEUDONYM_KEY_FILE): {error}")
        return EXIT_USAGE
    pool = AsyncConnectionPool(cfg.database_url, min_size=1, max_size=1, open=False)
    try:
        await pool.open(wait=True, timeout=DATABASE_WAIT_S)
        payers = Payers(pool, pseudonyms, cfg.kafka_topic_configs, cfg.kafka_topic_replication_factor)
        actor = actor_of(request.operator, "cli")
        answer = await (payers.export if kind == "export" else payers.erase)(request, actor)
    except psycopg.Error:
        _fail(f"cannot reach PostgreSQL at {config.mask_url(cfg.database_url)} (DATABASE_URL), or it refused; "
              "nothing was changed")
        return EXIT_REFUSED
    finally:
        await pool.close()
    _write(answer, args.output)
    if kind == "erase":
        print(f"mpesa-pipeline payers erase: {answer['message']} (request {answer['requestId']})", file=sys.stderr)
    return 0


def _confirmed(channel: str | None) -> bool:
    scope = f"channel {channel}" if channel else "every channel"
    print(f"Erase this payer's data on {scope}? It cannot be undone. Type 'erase' to go on: ", end="",
          file=sys.stderr, flush=True)
    return sys.stdin.readline(16).strip() == "erase"


def _write(answer: dict[str, Any], output: Path | None) -> None:
    text = json.dumps(answer, indent=2, default=str) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # personal data: the owner only
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _fail(message: str) -> None:
    print(f"mpesa-pipeline payers: {untrusted(message, 1000)}", file=sys.stderr)
