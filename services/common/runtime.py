"""Starting a service: config checked first, JSON logs, graceful stop on SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from services.common import config
from services.common.observability import setup_logging

# How much a background job lowers its CPU priority. The audit-anchoring job checks a minute of audit
# rows at once, about 0.45 s of one core at 300 payments/s: at the payment path's priority that burst
# stalled every hop of it for as long (bench/pipeline_bench.py, a p99 step at the anchor's second).
# Niced, it takes the CPU the payment path leaves (docs/cpu-per-payment.md). Only a job that holds no
# lock the payment path waits for may be niced: the retention job holds payments' locks while it
# scrubs a chunk, and niced it would hold them longer (a priority inversion), so it is not.
BACKGROUND_NICENESS = 10


class StartupRefused(Exception):
    """The service cannot start (e.g. the database schema is behind); the message is the one line to print."""


def run_service(name: str, settings: list[config.Setting], main: Callable[[Any, asyncio.Event], Awaitable[None]],
                settings_type: type | None = None, background: bool = False) -> None:
    """Loads config (one clear line and exit 2 on error), then runs main(cfg, stop) until stopped.
    With `settings_type` (a frozen dataclass, see config.load_into) main gets an instance of it;
    without, a dict keyed by variable name. A `background` job runs at a lower CPU priority
    (BACKGROUND_NICENESS), so that its bursts wait for the payment path rather than stall it."""
    try:
        log_level = config.load([config.LOG_LEVEL])["LOG_LEVEL"]
        cfg = config.load_into(settings_type, settings) if settings_type else config.load(settings)
    except config.ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(name, log_level)
    if background:
        _lower_priority(name)
    try:
        asyncio.run(_main_until_signalled(cfg, main))
    except StartupRefused as exc:
        print(f"{name}: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _lower_priority(name: str) -> None:
    try:
        os.nice(BACKGROUND_NICENESS)
    except OSError as exc:  # a runtime that forbids it: the job still runs, at the payment path's priority
        logging.getLogger(__name__).warning("%s: could not lower its CPU priority: %s", name, exc)


async def _main_until_signalled(cfg, main) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await main(cfg, stop)


def quiet_garbage_collector() -> None:
    """Fewer and shorter collector pauses once a service is up; call it after start-up.

    Measured with bench/ingress_bench.py and bench/gateway_bench.py: under CPython's defaults a full
    collection came every few thousand requests and stopped the loop for ~30 ms (it walks every
    object the imports made), and young collections ran every ~700 allocations. Start-up objects
    are frozen out of collection and young collections run less often; request objects are freed
    by reference counting, so few garbage cycles wait for the collector.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
