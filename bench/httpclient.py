"""A minimal HTTP/1.1 keep-alive client for load generation.

httpx costs more CPU per request than the server under test spends on it,
and the generator shares a 2-core machine with the server: this client
writes one pre-built request and parses one ``Content-Length`` answer,
nothing else (no redirects, no chunked bodies, no TLS).
"""

from __future__ import annotations

import asyncio
import contextlib


class HttpError(Exception):
    """The answer was not a well-formed HTTP/1.1 response."""


class HttpConnection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        return self._reader, self._writer

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POSTs a JSON body; returns (status, response body).

        A kept-alive connection the server closed meanwhile (uvicorn drops
        idle ones after 5 s) is retried once on a new connection, as
        clients with connection pools do.
        """
        reused = self._writer is not None
        try:
            return await self._post(path, body)
        except HttpError:
            if not reused:
                raise
        return await self._post(path, body)

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        reader, writer = await self._open()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("ascii")
        try:
            writer.write(head + body)
            raw = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            await self.close()
            raise HttpError(f"connection lost: {exc}") from None
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            await self.close()
            raise HttpError(f"bad status line {lines[0]!r}")
        length = -1
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"content-length":
                length = int(value.strip())
            elif lowered == b"connection" and value.strip().lower() == b"close":
                close = True
        if length < 0:
            await self.close()
            raise HttpError("response without Content-Length")
        payload = await reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return int(parts[1]), payload

    async def close(self) -> None:
        """Closes the socket (the next request reconnects)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class HttpPool:
    """Idle keep-alive connections, opened on demand (open-loop senders)."""

    def __init__(self, host: str, port: int, *, limit: int = 512) -> None:
        self._host = host
        self._port = port
        self._idle: list[HttpConnection] = []
        self._open = 0
        self._limit = limit
        self._freed = asyncio.Condition()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POSTs on an idle connection (a new one if none is idle)."""
        conn = await self._take()
        try:
            return await conn.post(path, body)
        finally:
            self._idle.append(conn)
            async with self._freed:
                self._freed.notify()

    async def _take(self) -> HttpConnection:
        if self._idle:
            return self._idle.pop()
        if self._open < self._limit:
            self._open += 1
            return HttpConnection(self._host, self._port)
        async with self._freed:
            await self._freed.wait_for(lambda: bool(self._idle))
        return self._idle.pop()

    @property
    def opened(self) -> int:
        """Connections opened so far."""
        return self._open

    async def close(self) -> None:
        """Closes every idle connection."""
        for conn in self._idle:
            await conn.close()
        self._idle.clear()
