"""The lean HTTP/1.1 client against raw loopback servers that answer byte for byte as scripted."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from corral.llm.leanhttp import Endpoint, HttpConnectionError, Pool

# Reads one request (head and Content-Length body) and answers it; returns False to hang up.
Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawServer:
    """Counts connections and requests; each connection serves requests until told to stop."""

    answer: Answer
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                if not await self.answer(reader, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def pool(self) -> Pool:
        return Pool(Endpoint.parse(f"http://127.0.0.1:{self.port}/v1/chat/completions"))


MakeRaw = Callable[[Answer], Awaitable[RawServer]]


@pytest.fixture
async def raw_server() -> AsyncIterator[MakeRaw]:
    servers: list[asyncio.Server] = []
    raws: list[RawServer] = []

    async def make(answer: Answer) -> RawServer:
        raw = RawServer(answer)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        raws.append(raw)
        raw.port = server.sockets[0].getsockname()[1]
        return raw

    yield make
    # Each handler ends once its client hangs up, which every test's pool does on leaving.
    handlers = [t for raw in raws for t in raw.handlers]
    if handlers:
        await asyncio.wait(handlers, timeout=5)
    for server in servers:
        server.close()
        await server.wait_closed()


def replies(*raw: bytes, keep_open: bool = True) -> Answer:
    """Answer the n-th request with ``raw[n]`` (the last one repeats)."""
    count = 0

    async def answer(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        nonlocal count
        writer.write(raw[min(count, len(raw) - 1)])
        count += 1
        return keep_open

    return answer


async def body_of(pool: Pool, *, idle_s: float = 5.0) -> tuple[int, bytes]:
    resp = await pool.post(b'{"x":1}', {"Content-Type": "application/json"},
                           connect_timeout_s=5, idle_timeout_s=idle_s)
    out = b""
    while (piece := await resp.next_chunk()) is not None:
        out += piece
    return resp.status, out


SIZED = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3;ext=1\r\ndat\r\n7\r\na: done\r\n0\r\nX-Trailer: t\r\n\r\n")


async def test_sized_and_chunked_bodies_share_one_kept_alive_connection(
    raw_server: MakeRaw,
) -> None:
    raw = await raw_server(replies(SIZED, CHUNKED, SIZED))
    async with raw.pool as pool:
        assert await body_of(pool) == (200, b"hello")
        assert await body_of(pool) == (200, b"data: done")
        assert await body_of(pool) == (200, b"hello")
    assert raw.connections == 1 and len(raw.requests) == 3
    first = raw.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{raw.port}".encode() in first and first.endswith(b'{"x":1}')
    assert b"Content-Length: 7" in first


async def test_body_until_close_and_http_1_0_are_not_reused(raw_server: MakeRaw) -> None:
    raw = await raw_server(replies(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", keep_open=False))
    async with raw.pool as pool:
        assert await body_of(pool) == (200, b"until the end")
        assert await body_of(pool) == (200, b"until the end")
    assert raw.connections == 2


async def test_a_kept_alive_connection_that_dies_unanswered_is_retried_once(
    raw_server: MakeRaw,
) -> None:
    seen = 0

    async def drop_the_second(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        nonlocal seen
        seen += 1
        if seen == 2:
            return False  # hang up on the reused connection without a byte of answer
        writer.write(SIZED)
        return True

    raw = await raw_server(drop_the_second)
    async with raw.pool as pool:
        assert await body_of(pool) == (200, b"hello")
        assert await body_of(pool) == (200, b"hello")
    assert raw.connections == 2 and len(raw.requests) == 3


async def test_a_fresh_connection_closed_unanswered_is_an_error(raw_server: MakeRaw) -> None:
    async def hang_up(_r: asyncio.StreamReader, _w: asyncio.StreamWriter) -> bool:
        return False

    raw = await raw_server(hang_up)
    async with raw.pool as pool:
        with pytest.raises(HttpConnectionError, match="closed the connection unanswered"):
            await body_of(pool)
    assert raw.connections == 1


async def test_releasing_early_keeps_the_connection_only_if_the_end_is_buffered(
    raw_server: MakeRaw,
) -> None:
    async def slow_tail(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhead\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        return True

    raw = await raw_server(replies(CHUNKED))
    async with raw.pool as pool:
        resp = await pool.post(b"", {}, connect_timeout_s=5, idle_timeout_s=5)
        assert await resp.next_chunk() == b"data: done"
        resp.release()  # the terminator came in the same read: the connection is reusable
        assert await body_of(pool) == (200, b"data: done")
    assert raw.connections == 1

    raw = await raw_server(slow_tail)
    async with raw.pool as pool:
        resp = await pool.post(b"", {}, connect_timeout_s=5, idle_timeout_s=5)
        assert await resp.next_chunk() == b"head"
        resp.release()  # the end has not arrived: this connection cannot be reused
        assert (await body_of(pool))[1] == b"head"
    assert raw.connections == 2


@pytest.mark.parametrize(("reply", "message"), [
    (b"SMTP ready\r\n\r\n", "not an HTTP/1.1 response"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", "the body ended early"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000, "headers are too long"),
])
async def test_broken_responses_are_clear_errors(
    raw_server: MakeRaw, reply: bytes, message: str
) -> None:
    raw = await raw_server(replies(reply, keep_open=False))
    async with raw.pool as pool:
        with pytest.raises(HttpConnectionError, match=message):
            await body_of(pool)


async def test_a_silent_server_times_out_and_a_closed_port_refuses(
    raw_server: MakeRaw,
) -> None:
    async def silent(reader: asyncio.StreamReader, _w: asyncio.StreamWriter) -> bool:
        await reader.read()  # never answers
        return False

    raw = await raw_server(silent)
    async with raw.pool as pool:
        with pytest.raises(TimeoutError):
            await body_of(pool, idle_s=0.2)
    async with Pool(Endpoint.parse("http://127.0.0.1:9/")) as refused:  # discard port
        with pytest.raises(HttpConnectionError):
            await body_of(refused)


async def test_a_connect_that_hangs_is_a_connection_error_not_a_stall() -> None:
    # A listening socket that never accepts: once its queue is full, Linux drops new SYNs,
    # so a connect hangs the way one to a dead host does.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            async with Pool(Endpoint.parse(f"http://127.0.0.1:{port}/")) as pool:
                with pytest.raises(HttpConnectionError, match=r"connecting timed out after 0\.3s"):
                    await pool.post(b"", {}, connect_timeout_s=0.3, idle_timeout_s=5)
        finally:
            for filler in fillers:
                filler.close()


def test_endpoint_parsing() -> None:
    assert Endpoint.parse("http://h:8080/v1/x?q=1") == Endpoint("h", 8080, "/v1/x?q=1")
    assert Endpoint.parse("http://[::1]/").authority == "[::1]"
    with pytest.raises(ValueError, match="plain http"):
        Endpoint.parse("https://h/v1")
