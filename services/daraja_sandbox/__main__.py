"""Runs the Daraja sandbox: `python -m services.daraja_sandbox [--host H] [--port P] [...]`.

The port comes from --port, else DARAJA_SANDBOX_PORT, else 8089. The admin API's bearer token
comes from DARAJA_SANDBOX_ADMIN_TOKEN; without it the admin API is closed.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from services.common import config
from services.common.observability import setup_logging
from services.daraja_sandbox.app import create_app
from services.daraja_sandbox.settings import (
    ADMIN_TOKEN_ENV,
    DEFAULT_PORT,
    DEMO_CONSUMER_KEY,
    PENDING_QUERY_STYLES,
    SANDBOX_SHORTCODE,
    AppConfig,
    SandboxEnvironment,
    SandboxSettings,
    environment_from,
)

log = logging.getLogger("services.daraja_sandbox")


def parse_args(argv: list[str], env: SandboxEnvironment) -> argparse.Namespace:
    defaults = SandboxSettings()
    parser = argparse.ArgumentParser(prog="python -m services.daraja_sandbox",
                                     description="Daraja (M-Pesa) sandbox simulator: OAuth, STK push, STK query.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=env.daraja_sandbox_port,
                        help=f"port (default: $DARAJA_SANDBOX_PORT, else {DEFAULT_PORT})")
    parser.add_argument("--latency-ms", type=int, default=defaults.latency_ms, help="delay before every answer")
    parser.add_argument("--callback-delay-ms", type=int, default=defaults.callback_delay_ms,
                        help="time from push to outcome and callback")
    parser.add_argument("--rate-limit", type=float, default=defaults.rate_limit_per_s,
                        help="push+query requests per second before 500.003.02 spike arrest (0 = off)")
    parser.add_argument("--rate-burst", type=int, default=defaults.rate_limit_burst, help="spike arrest burst size")
    parser.add_argument("--no-subscriber-lock", action="store_true", help="allow several open prompts per phone")
    parser.add_argument("--reject-localhost", action="store_true",
                        help="refuse CallBackURLs on host 'localhost', as real Daraja does")
    parser.add_argument("--token-ttl-s", type=int, default=defaults.token_ttl_s)
    parser.add_argument("--keep-previous-tokens", action="store_true",
                        help="a new token does not invalidate the app's previous one")
    parser.add_argument("--pending-query-style", choices=PENDING_QUERY_STYLES, default=defaults.pending_query_style)
    parser.add_argument("--callback-concurrency", type=int, default=defaults.callback_concurrency)
    parser.add_argument("--apps-file", type=Path, help="JSON list of apps to register at start")
    parser.add_argument("--no-demo-app", action="store_true", help=f"do not register {DEMO_CONSUMER_KEY}")
    parser.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        default=env.log_level.upper(), help="default: $LOG_LEVEL, else INFO")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> SandboxSettings:
    settings = SandboxSettings(
        latency_ms=args.latency_ms, callback_delay_ms=args.callback_delay_ms, rate_limit_per_s=args.rate_limit,
        rate_limit_burst=args.rate_burst, subscriber_lock=not args.no_subscriber_lock,
        reject_localhost=args.reject_localhost, token_ttl_s=args.token_ttl_s,
        invalidate_previous_tokens=not args.keep_previous_tokens, pending_query_style=args.pending_query_style,
        callback_concurrency=args.callback_concurrency)
    settings.check()
    return settings


def load_apps(path: Path | None) -> list[AppConfig]:
    if path is None:
        return []
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path} must hold a JSON list of apps")
    return [AppConfig.from_json(entry) for entry in entries]


def _fewer_gc_pauses() -> None:
    # Every push allocates a few hundred short-lived objects; with the default gen-0 threshold (700)
    # the cyclic collector runs several times per push batch. Measured: ~10% less CPU per push.
    gc.freeze()  # startup objects (modules, routes, apps) never need scanning again
    gc.set_threshold(50_000, 20, 20)


def main(argv: list[str] | None = None) -> None:
    try:
        env = environment_from(os.environ)
    except (config.ConfigError, ValueError) as exc:
        print(f"daraja sandbox: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    args = parse_args(sys.argv[1:] if argv is None else argv, env)
    setup_logging("daraja-sandbox", args.log_level.upper())
    admin_token = env.daraja_sandbox_admin_token
    try:
        app = create_app(settings_from(args), load_apps(args.apps_file), demo_app=not args.no_demo_app,
                         admin_token=admin_token)
    except (ValueError, TypeError, OSError) as exc:
        print(f"daraja sandbox: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if admin_token is None:
        log.warning("%s is unset: the admin API under /sandbox/ is closed (only /sandbox/health answers)",
                    ADMIN_TOKEN_ENV)
    log.info("daraja sandbox on http://%s:%d (shortcode %s%s)", args.host, args.port, SANDBOX_SHORTCODE,
             "" if args.no_demo_app else f", demo app {DEMO_CONSUMER_KEY}")
    _fewer_gc_pauses()
    # No access log: a line per request would cost more than the request itself.
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
