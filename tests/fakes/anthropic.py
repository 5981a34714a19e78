"""A loopback Anthropic Messages API (SSE) that the real ``claude`` CLI can talk to."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.base import Drop, FakeServer, Garbage, Reply, StreamError


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@dataclass
class FakeAnthropic(FakeServer):
    """``POST /v1/messages`` with ``stream: true``; every request body is kept in ``requests``."""

    def routes(self, app: web.Application) -> None:
        app.router.add_route("HEAD", "/", self._head)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count)
        app.router.add_route("*", "/{tail:.*}", self._other)

    async def _head(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _other(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=404)

    async def _count(self, request: web.Request) -> web.Response:
        return web.json_response({"input_tokens": 10})

    def error_body(self, status: int) -> dict[str, Any]:
        kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": f"fake {kind}"}}

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        behaviour = self.next_behaviour()
        early = await self.early_answer(behaviour)
        if early is not None:
            return early
        if not body.get("stream"):
            reply = behaviour if isinstance(behaviour, Reply) else Reply()
            return web.json_response(self._message(body, reply))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the CLI went away: fine
            await self._stream(request, response, body, behaviour)
        return response

    def _message(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": body.get("model", "claude-fake"), "stop_reason": "end_turn",
            "content": [{"type": "text", "text": reply.text}],
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens},
        }

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, body: dict[str, Any],
        behaviour: object,
    ) -> None:
        reply = behaviour if isinstance(behaviour, Reply) else Reply(text="")
        start = self._message(body, reply)
        start["content"] = []
        start["stop_reason"] = None
        start["usage"] = {"input_tokens": reply.input_tokens, "output_tokens": 1}
        await response.write(_sse("message_start", {"type": "message_start", "message": start}))
        await response.write(_sse("content_block_start", {
            "type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}))
        if isinstance(behaviour, Drop):
            await response.write(_sse("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": behaviour.text}}))
            assert request.transport is not None
            request.transport.close()
            return
        if isinstance(behaviour, Garbage):
            await response.write(f"event: content_block_delta\ndata: {behaviour.text}\n\n".encode())
            return
        if isinstance(behaviour, StreamError):
            await response.write(_sse("error", {"type": "error", "error": {
                "type": "api_error", "message": behaviour.message}}))
            return
        for piece in reply.pieces():
            if reply.chunk_delay_s:
                await asyncio.sleep(reply.chunk_delay_s)
            await response.write(_sse("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": piece}}))
        await response.write(_sse("content_block_stop", {"type": "content_block_stop",
                                                          "index": 0}))
        await response.write(_sse("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens}}))
        await response.write(_sse("message_stop", {"type": "message_stop"}))
