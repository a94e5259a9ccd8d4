"""JSON logs and the /metrics + /healthz endpoints every service serves."""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

# Extra attributes a log call may carry (logger.info("...", extra={"channel_id": ...})).
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


class Health:
    """Named liveness checks; /healthz answers 503 naming the ones that fail."""

    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], bool]] = {}

    def add(self, name: str, check: Callable[[], bool]) -> None:
        self._checks[name] = check

    def add_progress(self, name: str, stalled_for: Callable[[], float], limit_s: float) -> None:
        """Fails while `stalled_for()` (seconds without progress) is above `limit_s`: a consumer that
        has held the same batch that long is stuck, retrying a dependency that stays down or an event
        it cannot handle, and its partitions' later events wait behind it. 200 would hide that."""
        self.add(name, lambda: stalled_for() <= limit_s)

    def failing(self) -> list[str]:
        return [name for name, check in self._checks.items() if not check()]


def add_ops_routes(app: web.Application, health: Health) -> None:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        failing = health.failing()
        return web.json_response({"status": "fail" if failing else "ok", "failing": failing},
                                 status=503 if failing else 200)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)


async def serve_ops(health: Health, host: str, port: int) -> web.AppRunner:
    """For services without an HTTP API of their own: just /metrics and /healthz."""
    app = web.Application()
    add_ops_routes(app, health)
    return await serve(app, host, port)


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
