"""How the client's requests travel: one aiohttp session by default, or a caller's httpx.AsyncClient.

Why aiohttp by default: measured on this project's 2-core machine, an STK push through httpx 0.28
costs 0.9-1.7 ms of CPU with its own pool (httpcore 1.0.9 scans every pooled connection, with a
poll() system call each, on every request, so the cost grows with the pool), and about 0.4 ms more
than aiohttp even when httpx runs on an aiohttp transport (cookie jar, header models). The client
must sustain 1,000 pushes/s with hundreds in flight; aiohttp's pool costs ~0.15 ms a request.

Both senders report failures as httpx exception types, the single vocabulary the client classifies
by whether the request can have been sent (client.transport_error).
"""
from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import httpx


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes


class AiohttpSender:
    def __init__(self, *, timeout: aiohttp.ClientTimeout, max_connections: int, keepalive_expiry_s: float = 5.0):
        self._timeout = timeout
        self._max_connections = max_connections
        self._keepalive_expiry_s = keepalive_expiry_s
        self._session: aiohttp.ClientSession | None = None

    @property
    def timeout(self) -> aiohttp.ClientTimeout:
        return self._timeout

    def _open_session(self) -> aiohttp.ClientSession:
        # Created on first use: a ClientSession belongs to the running event loop.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0,
                                             keepalive_timeout=self._keepalive_expiry_s, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        return self._session

    async def request(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> HttpAnswer:
        session = self._open_session()
        try:
            async with session.request(method, url, data=body, headers=headers, allow_redirects=False) as response:
                return HttpAnswer(response.status, await response.read())
        except aiohttp.ClientError as exc:
            raise as_httpx_error(exc) from None
        except TimeoutError:
            raise httpx.ReadTimeout("timed out waiting for the answer") from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class HttpxSender:
    """For callers that bring their own httpx.AsyncClient (e.g. one on httpx.MockTransport)."""

    def __init__(self, http: httpx.AsyncClient):
        self._http = http

    async def request(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> HttpAnswer:
        # Never follow a redirect with credentials attached: it means a wrong base URL.
        response = await self._http.request(method, url, content=body, headers=headers, follow_redirects=False)
        return HttpAnswer(response.status_code, response.content)

    async def aclose(self) -> None:
        """The caller owns its client and closes it."""


def as_httpx_error(exc: aiohttp.ClientError) -> httpx.TransportError:
    """The httpx exception telling the same story: not sent (connect, pool) or maybe sent (the rest)."""
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # connecting, or waiting for a pooled connection
        return httpx.ConnectTimeout(name)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(name)
    if isinstance(exc, aiohttp.ServerTimeoutError):  # sock_read: the request was written
        return httpx.ReadTimeout(name)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(name)
    if isinstance(exc, aiohttp.ClientConnectionResetError):
        return httpx.WriteError(name)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError)):
        return httpx.RemoteProtocolError(name)
    return httpx.ReadError(name)
