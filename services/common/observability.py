"""JSON logs and the /metrics, /healthz (alive) and /readyz (ready) endpoints every service serves."""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import metadata

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from psycopg_pool import AsyncConnectionPool

# Extra attributes a log call may carry (logger.info("...", extra={"channel_id": ...})).
log = logging.getLogger(__name__)

CONTEXT_FIELDS = ("channel_id", "payment_id", "event_id", "topic", "error_code")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: getattr(record, k) for k in CONTEXT_FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests served", ["route", "method", "status"])
HTTP_SECONDS = Histogram("http_request_seconds", "HTTP request latency", ["route"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 2.5))


@web.middleware
async def http_metrics(request: web.Request, handler):
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
        HTTP_SECONDS.labels(route).observe(time.perf_counter() - started)


BUILD_INFO = Gauge("mpesa_pipeline_build_info", "Always 1; its labels say which release of the code and which "
                   "Python runs the process", ["version", "python"])
READY = Gauge("pipeline_ready", "1 while a readiness check of the process passes, 0 while it fails (its name is "
              "the one /readyz gives); alert when a check stays 0", ["check"])

Check = Callable[[], bool | Awaitable[bool]]


def record_build_info() -> None:
    """The release (the installed package's version) and Python of this process, as build_info."""
    try:
        release = metadata.version("mpesa-pipeline")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        release = "unknown"
    BUILD_INFO.labels(release, platform.python_version()).set(1)


class Health:
    """The process's readiness checks, by name. /healthz says the process is alive (its event loop
    answers): always 200 while it can answer at all. /readyz says whether the dependencies it needs
    now answer: 503 naming the checks that fail. docs/health.md says which check belongs where."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        """`check` returns whether the dependency answers now; it must be cheap (/readyz and /metrics
        are scraped every few seconds), or cached like DatabaseCheck. One that raises counts as failing."""
        self._checks[name] = check

    def add_progress(self, name: str, stalled_for: Callable[[], float], limit_s: float) -> None:
        """Fails while `stalled_for()` (seconds without progress) is above `limit_s`: a consumer that
        has held the same batch that long is stuck, retrying a dependency that stays down or an event
        it cannot handle, and its partitions' later events wait behind it. 200 would hide that."""
        self.add(name, lambda: stalled_for() <= limit_s)

    async def failing(self) -> list[str]:
        """The names of the checks failing now; pipeline_ready follows every evaluation."""
        failing = []
        for name, check in self._checks.items():
            ok = await _passes(check)
            READY.labels(name).set(1 if ok else 0)
            if not ok:
                failing.append(name)
        return failing


async def _passes(check: Check) -> bool:
    try:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        return bool(result)
    except Exception as exc:  # a check that cannot tell is not a pass; said once per scrape at most
        log.warning("readiness check raised %s: %s", type(exc).__name__, exc)
        return False


class DatabaseCheck:
    """Whether the pool hands out a connection that answers SELECT 1 within `timeout_s`. The answer
    is kept for `cache_s`, and scrapes arriving meanwhile share one probe: /readyz stays one query
    per couple of seconds however often it is called, and never queues behind a busy pool for long."""

    def __init__(self, pool: AsyncConnectionPool, *, timeout_s: float = 1.0, cache_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self._pool = pool
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._clock = clock
        self._answer: tuple[float, bool] | None = None
        self._probe: asyncio.Task[bool] | None = None

    async def __call__(self) -> bool:
        if self._answer is not None and self._clock() - self._answer[0] < self._cache_s:
            return self._answer[1]
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._probe_once())
        probe = self._probe
        try:
            return await asyncio.shield(probe)
        finally:
            if self._probe is probe and probe.done():
                self._probe = None

    async def _probe_once(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._pool.connection(timeout=self._timeout_s) as conn:
                    await conn.execute("SELECT 1")
            ok = True
        except Exception as exc:  # unreachable, refused, pool exhausted, timed out: not ready
            log.info("database readiness probe failed: %s: %s", type(exc).__name__, str(exc).strip()[:200])
            ok = False
        self._answer = (self._clock(), ok)
        return ok


def add_ops_routes(app: web.Application, health: Health) -> None:
    record_build_info()

    async def metrics(_: web.Request) -> web.Response:
        await health.failing()  # pipeline_ready is fresh in every scrape, whether /readyz is called or not
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        # Alive: this answer needs the event loop to run this handler, nothing else. A dependency
        # down is /readyz's business; restarting the process would not bring it back.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        failing = await health.failing()
        return web.json_response({"status": "fail" if failing else "ok", "failing": failing},
                                 status=503 if failing else 200)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


async def serve_ops(health: Health, host: str, port: int) -> web.AppRunner:
    """For services without an HTTP API of their own: just /metrics, /healthz and /readyz."""
    app = web.Application()
    add_ops_routes(app, health)
    return await serve(app, host, port)


async def serve(app: web.Application, host: str, port: int, *, reuse_port: bool = False) -> web.AppRunner:
    """reuse_port: SO_REUSEPORT, so that several processes on this host listen on the same port and the
    kernel spreads the connections across them (Linux: processes of the same user only)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    return runner
