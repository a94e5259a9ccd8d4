"""A light HTTP/1.1 client for driving our servers from benchmarks on a small machine."""
from __future__ import annotations

import asyncio
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
