"""A light HTTP/1.1 client for driving our servers from benchmarks on a small machine."""
from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlsplit

HEADERS = {"Content-Type": "application/json;charset=UTF-8", "BusinessShortCode": "174379"}  # as Daraja sends


class RawDriver:
    """Keep-alive HTTP/1.1 over plain asyncio streams with pre-encoded requests: a few tens of
    microseconds per callback, so that on a small machine the driver does not starve the
    servers it measures (an aiohttp client needs half a core or more at 1,000 requests/s)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._open: list[asyncio.StreamWriter] = []

    async def post(self, url: str, body: bytes) -> int:
        path = urlsplit(url).path
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
                f"{self.headers}\r\n").encode()
        reader, writer = self._idle.pop() if self._idle else await self._connect()
        writer.write(head + body)
        status_line, _, headers = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in headers.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        self._idle.append((reader, writer))
        return int(status_line.split(b" ", 2)[1])

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._open.append(writer)
        return reader, writer

    async def close(self) -> None:
        for writer in self._open:
            writer.close()


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time, driven from data_received.

    Callbacks instead of streams keep the driver's own CPU per request small, so that it does not
    take the machine's second core away from the ingress, Kafka and PostgreSQL.
    """

    def __init__(self, on_answer):
        self.on_answer = on_answer  # (connection, status, body) -> None
        self.transport: asyncio.Transport  # set by connection_made, before anything is sent
        self._buffer = b""
        self.sent_at = 0.0
        self.waiting = False  # a request sent and not answered yet

    @classmethod
    async def open(cls, port: int, on_answer) -> Connection:
        _, conn = await asyncio.get_running_loop().create_connection(lambda: cls(on_answer), "127.0.0.1", port)
        conn.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport), "a TCP connection"
        self.transport = transport

    def send(self, request: bytes, sent_at: float) -> None:
        self.sent_at = sent_at
        self.waiting = True
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self._buffer[:end]
        at = head.lower().find(b"content-length:")
        length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) if at >= 0 else 0
        if len(self._buffer) < end + 4 + length:
            return
        body = self._buffer[end + 4:end + 4 + length]
        self._buffer = self._buffer[end + 4 + length:]
        self.waiting = False
        self.on_answer(self, int(head[9:12]), body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting:  # the server closed it mid-request: answered with status 0, never reused
            self.waiting = False
            self.on_answer(self, 0, b"")

    def close(self) -> None:
        self.transport.close()
