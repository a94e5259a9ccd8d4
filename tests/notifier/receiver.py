"""A real HTTP receiver for webhook tests: an aiohttp server on a loopback address, port 0 unless
given, answering with a handler the test chooses and recording every request it gets."""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: str
    peer_port: int


Handler = Callable[["Receiver", web.Request], Awaitable[web.StreamResponse]]


async def answer_204(_receiver: Receiver, _request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


@dataclass
class Receiver:
    handler: Handler = answer_204
    host: str = "127.0.0.1"
    port: int = 0
    ssl_context: ssl.SSLContext | None = None  # https when given
    received: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # set at stop: handlers that wait end
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}/hooks"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.received.append(Received(dict(request.headers), (await request.read()).decode(),
                                      peer[1] if peer else 0))
        return await self.handler(self, request)
