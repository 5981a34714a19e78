"""A small HTTP/1.1 client for the daemon's hot path: streamed completions over plain ``http://``.

Every local task is one streamed POST to a model server on the same machine, and aiohttp's
general-purpose client (cookies, redirects, tracing, proxies) costs more CPU per request than
the rest of the task's bookkeeping together. This client does only what that request needs:
keep-alive connections, ``Content-Length``, ``chunked`` and read-until-close bodies, and
bounded reads. It never follows redirects, sends no ``Accept-Encoding`` (so bodies arrive
uncompressed) and speaks no TLS: ``https://`` endpoints go through aiohttp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self, cast
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
_PAUSE_AT_BYTES = 256 * 1024


class HttpConnectionError(Exception):
    """The connection failed, closed or sent something that is not HTTP/1.1."""


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


@dataclass(slots=True)
class Endpoint:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not a plain http:// URL: {url!r}")
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        return cls(parts.hostname, parts.port or 80, path)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"


class _Conn(asyncio.Protocol):
    """Buffers what the socket delivers; one reader waits on it at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()
        if len(self.buffer) > _PAUSE_AT_BYTES and self.transport is not None:
            self.transport.pause_reading()  # the reader is behind: let TCP push back

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def fill(self, idle_timeout_s: float) -> None:
        """Wait until more bytes arrive or the peer closes; TimeoutError after the idle time."""
        if self.eof:
            raise HttpConnectionError("connection closed by the server")
        if self.transport is not None:
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        # A bare timer rather than asyncio.timeout(): this runs once per network read.
        timer = loop.call_later(idle_timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self, n: int) -> bytes:
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    @property
    def reusable(self) -> bool:
        return not self.eof and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Body:
    """Body framing as a state machine over the connection's buffer, so it never waits."""

    __slots__ = ("chunked", "done", "left", "state", "until_close")

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        self.until_close = not self.chunked and "content-length" not in headers
        self.left = 0 if self.chunked or self.until_close else _content_length(headers)
        self.state = "size" if self.chunked else "data"
        self.done = not self.chunked and not self.until_close and self.left == 0

    def parse(self, buf: bytearray) -> bytes:
        """Take what ``buf`` holds of the body; sets ``done`` once the body is complete."""
        if self.until_close:
            data = bytes(buf)
            buf.clear()
            return data
        if not self.chunked:
            data = bytes(buf[: self.left])
            del buf[: self.left]
            self.left -= len(data)
            self.done = self.left == 0
            return data
        out = bytearray()
        while not self.done and self._chunk_step(buf, out):
            pass
        return bytes(out)

    def _chunk_step(self, buf: bytearray, out: bytearray) -> bool:
        if self.state == "data":
            take = min(self.left, len(buf))
            out += buf[:take]
            del buf[:take]
            self.left -= take
            if self.left:
                return False
            self.state = "crlf"
            return True
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise HttpConnectionError("chunk header line too long")
            return False
        line = bytes(buf[:end])
        del buf[: end + 2]
        if self.state == "crlf":
            if line:
                raise HttpConnectionError("chunk not followed by CRLF")
            self.state = "size"
        elif self.state == "size":
            try:
                self.left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HttpConnectionError(f"bad chunk size line {line[:40]!r}") from None
            self.state = "data" if self.left else "trailer"
        elif not line:  # the blank line after the trailers
            self.done = True
        return True


class Response:
    """Status and headers of a response; the body is read with :meth:`next_chunk`."""

    __slots__ = ("_body", "_conn", "_idle_timeout_s", "_pool", "_released", "headers", "status")

    def __init__(
        self, status: int, headers: dict[str, str], conn: _Conn, pool: Pool, idle_s: float
    ) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._pool = pool
        self._idle_timeout_s = idle_s
        self._body = _Body(headers)
        self._released = False

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as it arrives, de-chunked; None at its end."""
        conn, body = self._conn, self._body
        while True:
            data = body.parse(conn.buffer) if conn.buffer else b""
            if data:
                return data
            if body.done:
                self.release()
                return None
            if conn.eof:
                if body.until_close and conn.error is None:
                    body.done = True
                    self.release()
                    return None
                self.release()
                raise HttpConnectionError(f"the body ended early: {conn.error or 'closed'}")
            try:
                await conn.fill(self._idle_timeout_s)
            except HttpConnectionError:
                continue  # closed: the next pass reports it

    async def read(self, limit: int) -> bytes:
        """At most ``limit`` bytes of the body; the connection is kept only if it was all read."""
        out = bytearray()
        while len(out) < limit and (piece := await self.next_chunk()) is not None:
            out += piece
        self.release()
        return bytes(out[:limit])

    def release(self) -> None:
        """Done with this response: the connection is reused if its body is complete.

        What is already buffered counts, so a stream whose end arrived with its last event
        keeps its connection without waiting for anything more.
        """
        if self._released:
            return
        self._released = True
        body, conn = self._body, self._conn
        try:
            if not body.done and conn.buffer and not body.until_close:
                body.parse(conn.buffer)
        except HttpConnectionError:
            body.done = False
        keep = body.done and not body.until_close and (
            self.headers.get("connection", "").lower() != "close")
        self._pool.put_back(conn, keep=keep)


def _content_length(headers: Mapping[str, str]) -> int:
    try:
        length = int(headers["content-length"])
    except ValueError:
        raise HttpConnectionError("bad Content-Length") from None
    if length < 0:
        raise HttpConnectionError("bad Content-Length")
    return length


class Pool:
    """Keep-alive connections to one ``host:port``; ``async with`` closes them."""

    def __init__(self, endpoint: Endpoint, *, max_idle: int = 64) -> None:
        self.endpoint = endpoint
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def put_back(self, conn: _Conn, *, keep: bool) -> None:
        if keep and conn.reusable and not conn.buffer and not self._closed and (
            len(self._idle) < self._max_idle
        ):
            self._idle.append(conn)
        else:
            conn.close()

    async def _connect(self, timeout_s: float) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            _, conn = await loop.create_connection(_Conn, self.endpoint.host, self.endpoint.port)
        return conn

    async def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float,
        idle_timeout_s: float,
    ) -> Response:
        """Send a POST and read the status line and headers.

        A kept-alive connection that the server closes just as the request goes out (its idle
        timeout racing our reuse) ends before any byte of a response; the request is then sent
        once more on a new connection, as HTTP clients commonly do. A new connection that ends
        that way is an error.
        """
        if self._closed:
            raise HttpConnectionError("client is closed")
        head = self._head(body, headers)
        while self._idle:
            conn = self._idle.pop()
            if not conn.reusable:
                conn.close()
                continue
            try:
                return await self._exchange(conn, head, body, idle_timeout_s)
            except _StaleConnection:
                conn.close()
        try:
            conn = await self._connect(connect_timeout_s)
        except TimeoutError:
            message = f"connecting timed out after {connect_timeout_s:g}s"
            raise HttpConnectionError(message) from None
        except OSError as exc:
            raise HttpConnectionError(str(exc) or type(exc).__name__) from exc
        try:
            return await self._exchange(conn, head, body, idle_timeout_s)
        except _StaleConnection:
            conn.close()
            raise HttpConnectionError("the server closed the connection unanswered") from None

    def _head(self, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = [f"POST {self.endpoint.path} HTTP/1.1", f"Host: {self.endpoint.authority}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _exchange(self, conn: _Conn, head: bytes, body: bytes, idle_s: float) -> Response:
        assert conn.transport is not None
        conn.transport.write(head + body)
        try:
            while (end := conn.buffer.find(b"\r\n\r\n")) < 0:
                if len(conn.buffer) > MAX_HEAD_BYTES:
                    raise HttpConnectionError("response headers are too long")
                try:
                    await conn.fill(idle_s)
                except HttpConnectionError:
                    if not conn.buffer:
                        raise _StaleConnection from None
                    raise HttpConnectionError("connection closed inside the headers") from None
            status, headers = _parse_head(conn.take(end + 4))
            if status in (204, 304) or status < 200:
                headers["content-length"] = "0"
            return Response(status, headers, conn, self, idle_s)
        except BaseException:
            conn.close()
            raise


class _StaleConnection(Exception):
    """A connection closed before any byte of the response: the request was never seen."""


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpConnectionError(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpConnectionError(f"bad header line {line[:80]!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if parts[0] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    return int(parts[1]), headers
