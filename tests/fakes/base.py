"""What every fake server shares: a script of behaviours, a request log, a loopback site."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web


@dataclass
class Reply:
    """A normal streamed answer, split into ``chunks`` pieces."""

    text: str = "Hello from the fake server."
    input_tokens: int = 12
    output_tokens: int = 7
    chunks: int = 3
    chunk_delay_s: float = 0.0
    parts: tuple[str, ...] = ()  # exact pieces to stream, overriding ``chunks``

    def pieces(self) -> list[str]:
        return list(self.parts) if self.parts else FakeServer.split(self.text, self.chunks)


@dataclass
class Status:
    """An HTTP error status, e.g. 429 with Retry-After, 503, 529 overloaded, 500."""

    status: int
    retry_after: str | None = None
    body: dict[str, Any] | str | None = None


@dataclass
class Garbage:
    """A 200 whose stream carries a line that is not valid JSON."""

    text: str = "this is not json {"


@dataclass
class Drop:
    """Stream part of an answer, then cut the connection."""

    text: str = "partial answ"


@dataclass
class Hang:
    """Accept the request, then send nothing until the test ends."""


@dataclass
class StreamError:
    """An error event in the middle of the stream."""

    message: str = "the model crashed"
    text: str = "partial "


Behaviour = Reply | Status | Garbage | Drop | Hang | StreamError


@dataclass
class FakeServer:
    """Base class: subclasses add routes and speak their protocol."""

    default: Any = field(default_factory=Reply)
    script: deque[Any] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, *behaviours: Any) -> Self:
        self.script.extend(behaviours)
        return self

    def next_behaviour(self) -> Any:
        return self.script.popleft() if self.script else self.default

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self, host: str = "127.0.0.1") -> Self:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        self.url = f"http://{'localhost' if host == '127.0.0.1' else host}:{port}"
        self.port = port
        return self

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def hang(self) -> None:
        await self._release.wait()

    async def early_answer(self, behaviour: Any) -> web.Response | None:
        """The answer for behaviours that never start a stream (an error status, a hang)."""
        if isinstance(behaviour, Status):
            return await self.status_response(behaviour)
        if isinstance(behaviour, Hang):
            await self.hang()
            return web.Response(status=503)
        return None

    async def status_response(self, behaviour: Status) -> web.Response:
        headers = {"retry-after": behaviour.retry_after} if behaviour.retry_after else {}
        body = behaviour.body if behaviour.body is not None else self.error_body(behaviour.status)
        if isinstance(body, str):
            return web.Response(status=behaviour.status, text=body, headers=headers)
        return web.json_response(body, status=behaviour.status, headers=headers)

    def error_body(self, status: int) -> dict[str, Any]:
        return {"error": {"message": f"fake error {status}", "code": status}}

    @staticmethod
    def split(text: str, chunks: int) -> list[str]:
        if chunks <= 1 or len(text) < chunks:
            return [text]
        size = -(-len(text) // chunks)
        return [text[i : i + size] for i in range(0, len(text), size)]
