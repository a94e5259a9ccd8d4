"""`mpesa-pipeline payments list|show|query|resolve`: the review desk from a shell.

The commands read PostgreSQL as the onboarding role (DATABASE_URL) and send instructions to the
ledger over Kafka (the onboarding-api principal's login, KAFKA_CLIENT_*), through the same desk as
the admin API. Output is a table, or JSON with --json. A refusal or an unreachable database is one
line on stderr, never a traceback. Exit status: 0 done, 1 refused, 2 bad usage or configuration,
3 sent but not applied by the ledger yet.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from services.common import config
from services.common.payment import PaymentState
from services.common.text import untrusted
from services.operations.model import OPERATOR, OUTCOMES, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX
from services.operations.settings import PAYMENTS_SETTINGS, PaymentsSettings

FORMATS = ("table", "json")
EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_YET = 1, 2, 3
DATABASE_WAIT_S = 5.0
# Options of `payments list` and the search parameter each fills (services/operations/model.py).
_SEARCH_OPTIONS = [("--channel", "channel", "a channel id"),
                   ("--state", "state", "one of " + ", ".join(s.value for s in PaymentState)),
                   ("--from", "from", "requested at or after this RFC 3339 time (with its offset)"),
                   ("--to", "to", "requested before this RFC 3339 time (with its offset)"),
                   ("--order-reference", "orderReference", "the merchant's order reference, exactly"),
                   ("--receipt", "receipt", "an M-Pesa receipt: the payment's own, a late one, or a candidate"),
                   ("--checkout-request-id", "checkoutRequestId", "Daraja's CheckoutRequestID (own or candidate)"),
                   ("--phone", "phone", "the payer's number in any form the ingress accepts (07…, 2547…, "
                                        "+2547…), or - to read it from stdin (out of the shell's history); "
                                        "shown masked only"),
                   ("--cursor", "cursor", "the next-page cursor a previous list printed"),
                   ("--limit", "limit", f"payments per page (default {PAGE_SIZE_DEFAULT}, at most {PAGE_SIZE_MAX})")]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `payments` to `mpesa-pipeline` (services/cli.py)."""
    payments = subparsers.add_parser(
        "payments", help="the review desk: find payments, show one with its trail, query or resolve one",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = payments.add_subparsers(dest="payments_command", required=True)
    listing = sub.add_parser("list", help="search payments, newest first")
    for option, parameter, help_text in _SEARCH_OPTIONS:
        listing.add_argument(option, dest=_dest(parameter), metavar=option[2:].upper().replace("-", "_"),
                             help=help_text)
    _add_format(listing)
    listing.set_defaults(func=_command(_list))
    show = sub.add_parser("show", help="one payment: its fields, history, audit entries and raw callbacks")
    show.add_argument("payment_id")
    _add_format(show)
    show.set_defaults(func=_command(_show))
    query = sub.add_parser("query", help="ask the ledger for an STK query of an open or Review payment now")
    query.add_argument("payment_id")
    _add_instruction_options(query)
    query.set_defaults(func=_command(_query))
    resolve = sub.add_parser("resolve", help="settle or cancel a payment in Review (the ledger decides)")
    resolve.add_argument("payment_id")
    resolve.add_argument("--outcome", required=True, choices=sorted(OUTCOMES),
                         help="Settled (needs --receipt) or Cancelled")
    resolve.add_argument("--receipt", help="Settled only: the M-Pesa receipt proving the money moved")
    _add_instruction_options(resolve)
    resolve.set_defaults(func=_command(_resolve))


def _dest(parameter: str) -> str:
    return "search_" + parameter


def _add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table", help="output: table (default) or json")
    parser.add_argument("--json", dest="format", action="store_const", const="json", help="the same as --format json")


def _add_instruction_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", required=True, help="why, in 1-500 characters (kept in the audit trail)")
    parser.add_argument("--operator", help="who you are (default: your login name); recorded as '<operator> via cli'")
    _add_format(parser)


class _UsageError(Exception):
    pass


def _command(operation: Callable[[Any, argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        cfg = config.load_into(PaymentsSettings, PAYMENTS_SETTINGS)
        # The libraries' own warnings (the pool retrying a refused connection, librdkafka's lines) would
        # print before, and bury, the one line this command says about the same failure.
        logging.getLogger().addHandler(logging.NullHandler())
        return asyncio.run(_run(cfg, operation, args))
    return command


async def _run(cfg: PaymentsSettings, operation, args: argparse.Namespace) -> int:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    from services.operations.desk import KafkaCommands, ReviewDesk
    from services.operations.model import DeskError
    pool = AsyncConnectionPool(cfg.database_url, min_size=1, max_size=2, open=False)
    commands = KafkaCommands(cfg.kafka_bootstrap_servers, cfg.schema_registry_url)
    try:
        await pool.open(wait=True, timeout=DATABASE_WAIT_S)
        return await operation(ReviewDesk(pool, commands, verdict_wait_s=cfg.operator_verdict_wait_s), args)
    except psycopg.Error:
        _fail(f"cannot reach PostgreSQL at {config.mask_url(cfg.database_url)} (DATABASE_URL)")
        return EXIT_REFUSED
    except DeskError as error:
        _fail(error.detail + "".join(f"; {field}: {message}" for field, message in error.errors.items()))
        return EXIT_USAGE if error.status == 400 else EXIT_REFUSED
    except _UsageError as error:
        _fail(str(error))
        return EXIT_USAGE
    finally:
        await commands.close()
        await pool.close()


def _fail(message: str) -> None:
    print(f"mpesa-pipeline payments: {untrusted(message, 1000)}", file=sys.stderr)


async def _list(desk, args: argparse.Namespace) -> int:
    from services.operations.model import InvalidInput, parse_search
    query = {parameter: value for _, parameter, _ in _SEARCH_OPTIONS
             if (value := getattr(args, _dest(parameter))) is not None}
    if query.get("phone") == "-":
        query["phone"] = sys.stdin.readline(64).strip()
    search, errors = parse_search(query)
    if search is None:
        raise InvalidInput("the search is not valid", errors)
    page = await desk.search(search)
    if args.format == "json":
        _print_json(page)
        return 0
    _print_table(["paymentId", "channelId", "state", "amount", "phone", "orderReference", "mpesaReceipt",
                  "requestedAt"], page["payments"])
    if page["nextCursor"]:
        print(f"next page: --cursor {page['nextCursor']}")
    return 0


async def _show(desk, args: argparse.Namespace) -> int:
    from services.ingress.upstream import PAYMENT_ID
    from services.operations.model import NotFound
    if not PAYMENT_ID.fullmatch(args.payment_id):
        raise NotFound("no such payment")
    shown = await desk.payment(args.payment_id)
    if args.format == "json":
        _print_json(shown)
        return 0
    for name, value in shown.items():
        if not isinstance(value, list):
            print(f"{name:28} {_cell(value)}")
    print("\nhistory")
    _print_table(["at", "previous", "state", "reason"], shown["history"])
    print("\naudit" + (" (the newest entries only)" if shown["auditTruncated"] else ""))
    _print_table(["seq", "at", "fact", "verdict", "fromState", "toState", "actor", "detail"], shown["audit"])
    print(f"\ncallbacks ({shown['callbacksTotal']}; bodies with --json)")
    _print_table(["receivedAt", "verdict", "eventId"], shown["callbacks"])
    return 0


async def _query(desk, args: argparse.Namespace) -> int:
    from services.operations.model import parse_query_instruction
    return await _instruct(desk, args, parse_query_instruction, {"reason": args.reason})


async def _resolve(desk, args: argparse.Namespace) -> int:
    from services.operations.model import parse_resolution
    body = {"outcome": args.outcome, "reason": args.reason}
    if args.receipt is not None:
        body["mpesaReceipt"] = args.receipt
    return await _instruct(desk, args, parse_resolution, body)


async def _instruct(desk, args: argparse.Namespace, parse, body: dict[str, Any]) -> int:
    from services.ingress.upstream import PAYMENT_ID
    from services.operations.model import InvalidInput, NotFound, actor_of
    operator = args.operator or _login_name()
    instruction, errors = parse({**body, "operator": operator})
    if instruction is None:
        raise InvalidInput("the instruction is not valid; nothing was sent to the ledger", errors)
    if not PAYMENT_ID.fullmatch(args.payment_id):
        raise NotFound("no such payment")
    outcome = await desk.instruct(args.payment_id, instruction, actor_of(operator, "cli"))
    if args.format == "json":
        _print_json(outcome.view())
    elif outcome.status == "applied":
        state = outcome.payment["state"] if outcome.payment else "?"
        print(f"applied by the ledger (instruction {outcome.event_id}); the payment is now {state}")
    elif outcome.status == "rejected":
        _fail(f"the ledger refused instruction {outcome.event_id}: {outcome.detail}")
    else:
        print(f"sent (instruction {outcome.event_id}): accepted, the ledger has not applied it yet; "
              "`payments show` tells when it has")
    return {"applied": 0, "rejected": EXIT_REFUSED, "accepted": EXIT_NOT_YET}[outcome.status]


def _login_name() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        raise _UsageError("say who you are with --operator (no login name found)") from None
    if not OPERATOR.fullmatch(name):
        raise _UsageError("your login name cannot be recorded as it is: say who you are with --operator")
    return name


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        value = json.dumps(value, ensure_ascii=False)
    return untrusted(str(value), 80)  # foreign text: nothing may break the terminal or the table


def _print_table(columns: list[str], rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    for line in [columns, *cells]:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())
