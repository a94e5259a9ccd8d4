"""A minimal HTTP/1.1 POST client for plain-http URLs, on keep-alive connections.

Why it exists: the sandbox must send thousands of callbacks a second from one core, and aiohttp's
client costs several times more CPU per request than the request itself. It does only what a
callback needs: POST to an http:// URL and report the status code. A response body is skipped when
framed by Content-Length (the connection is then reused); any other framing closes the connection.
https:// and anything unusual stay with aiohttp (see callbacks.CallbackSender).
"""
from __future__ import annotations

import asyncio
import re

# http://host[:port][/path][?query][#fragment]; no user info, no whitespace.
_PLAIN_HTTP_URL = re.compile(r"(?i)http://(?P<netloc>(?P<host>\[[0-9a-f:.]+\]|[^\s/?#:@\[\]]+)(?::(?P<port>\d{1,5}))?)"
                             r"(?P<target>[/?][^\s#]*)?(?:#\S*)?\Z")
MAX_HEAD_BYTES = 64 * 1024
IDLE_PER_HOST_MAX = 256


class HttpFailure(Exception):
    """The exchange failed before a status line arrived (refused, reset, malformed, timed out)."""


class ClosedBeforeAnswer(HttpFailure):
    """The peer closed the connection without answering."""


def build_post(url: str, headers: dict[str, str], body: bytes) -> tuple[str, int, bytes] | None:
    """(host, port, request bytes) for a plain-http URL, or None when this client cannot send it."""
    match = _PLAIN_HTTP_URL.match(url) if url.isascii() else None
    if match is None:
        return None
    port = int(match.group("port") or 80)
    if not 0 < port < 65536:
        return None
    target = match.group("target") or "/"
    if target.startswith("?"):
        target = "/" + target
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = (f"POST {target} HTTP/1.1\r\nHost: {match.group('netloc')}\r\nContent-Length: {len(body)}\r\n"
               f"{head}\r\n").encode("latin-1") + body
    return match.group("host").strip("[]"), port, request


class _Exchange(asyncio.Protocol):
    """One connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = False
        self.received_any = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._status = 0
        self._needed = -1  # bytes that make up the whole response, once the head is parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future[int]:
        self._waiter = asyncio.get_running_loop().create_future()
        self._buffer.clear()
        self._needed, self.reusable, self.received_any = -1, False, False
        assert self.transport is not None, "send() before the connection was made"
        self.transport.write(request)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self._buffer += data
        if self._waiter is None or self._waiter.done():
            self.reusable = False  # bytes nobody asked for: never reuse this connection
            return
        try:
            self._advance()
        except (ValueError, IndexError) as exc:
            self._fail(HttpFailure(f"malformed response: {exc}"))

    def _advance(self) -> None:
        if self._needed < 0:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise ValueError("response head too large")
                return
            if not self._read_head(bytes(self._buffer[:end]).decode("latin-1"), end + 4):
                del self._buffer[:end + 4]  # an interim 1xx answer: the real one follows
                return self._advance()
        if len(self._buffer) >= self._needed:
            self.reusable = self.reusable and len(self._buffer) == self._needed
            assert self._waiter is not None, "an answer nobody sent a request for"
            self._waiter.set_result(self._status)

    def _read_head(self, head: str, head_bytes: int) -> bool:
        status_line, *header_lines = head.split("\r\n")
        version, status = status_line.split(" ", 2)[:2]
        self._status = int(status)
        if 100 <= self._status < 200:
            return False
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        length = headers.get("content-length")
        self.reusable = (version == "HTTP/1.1" and length is not None and length.isdigit()
                         and headers.get("connection") != "close" and "transfer-encoding" not in headers)
        self._needed = head_bytes + (int(length) if self.reusable and length is not None else 0)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._fail(ClosedBeforeAnswer("connection closed before the answer"))

    def _fail(self, error: Exception) -> None:
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class RawHttpClient:
    """Keep-alive connections per (host, port). Concurrency is bounded by the callers."""

    def __init__(self, timeout_s: float):
        self._timeout_s = timeout_s
        self._idle: dict[tuple[str, int], list[_Exchange]] = {}

    async def post(self, host: str, port: int, request: bytes) -> int:
        key = (host, port)
        exchange = self._take_idle(key)
        if exchange is not None:
            try:
                return await self._exchange(key, exchange, request)
            except ClosedBeforeAnswer:
                if exchange.received_any:
                    raise
                # The server closed the idle connection as we reused it; nothing was answered,
                # so the request was not handled: send it once on a fresh connection.
        return await self._exchange(key, await self._connect(host, port), request)

    async def _exchange(self, key: tuple[str, int], exchange: _Exchange, request: bytes) -> int:
        try:
            async with asyncio.timeout(self._timeout_s):
                status = await exchange.send(request)
        except TimeoutError:
            exchange.close()
            raise HttpFailure("timed out") from None
        if exchange.reusable:
            idle = self._idle.setdefault(key, [])
            if len(idle) < IDLE_PER_HOST_MAX:
                idle.append(exchange)
                return status
        exchange.close()
        return status

    async def _connect(self, host: str, port: int) -> _Exchange:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                _, exchange = await loop.create_connection(_Exchange, host, port)
        except (OSError, TimeoutError) as exc:
            raise HttpFailure(f"connect failed: {type(exc).__name__}") from None
        return exchange

    def _take_idle(self, key: tuple[str, int]) -> _Exchange | None:
        idle = self._idle.get(key)
        while idle:
            exchange = idle.pop()
            if exchange.transport is not None and not exchange.transport.is_closing():
                return exchange
        return None

    def close(self) -> None:
        for idle in self._idle.values():
            for exchange in idle:
                exchange.close()
        self._idle.clear()
