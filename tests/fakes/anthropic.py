"""A loopback Anthropic Messages API (SSE) that the real ``claude`` CLI can talk to.

Besides one script for every request, conversations can be scripted one by one: a request
whose first user message contains a conversation's marker gets that conversation's turn (the
number of assistant messages it carries so far), so several CLIs can run at once and a resumed
session continues where it was. A :class:`ToolUse` turn makes the real CLI run one of its own
tools (Write, Edit…) in its working dir, which the fake reads from the CLI's system prompt.
Requests without ``tools`` are the CLI's side calls (titles and the like): answered with text,
they count as no turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.base import Drop, FakeServer, Garbage, Reply, StreamError

# "Primary working directory: /path" in claude 2.1.3xx, "Working directory: /path" earlier.
_WORKING_DIR = re.compile(r"[Ww]orking directory: ([^\s\\\"]+)")


@dataclass
class ToolUse:
    """An agent turn calling one tool; ``make_input(cwd)`` builds its input."""

    name: str
    make_input: Callable[[str], dict[str, Any]]


@dataclass
class Conversation:
    """One scripted conversation: its turns, and every agent request it received."""

    turns: list[Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    cwds: list[str] = field(default_factory=list)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@dataclass
class FakeAnthropic(FakeServer):
    """``POST /v1/messages`` with ``stream: true``; every request body is kept in ``requests``."""

    conversations: dict[str, Conversation] = field(default_factory=dict)

    def converse(self, marker: str, *turns: Any) -> Conversation:
        """Script the conversation whose first prompt contains ``marker``."""
        conversation = Conversation(list(turns))
        self.conversations[marker] = conversation
        return conversation

    def _scripted(self, body: dict[str, Any]) -> tuple[Any, str] | None:
        messages = body.get("messages") or []
        first = next((m for m in messages if m.get("role") == "user"), None)
        if first is None or not body.get("tools"):
            return None
        text = _text_of(first.get("content"))
        for marker, conversation in self.conversations.items():
            if marker in text:
                turn = sum(1 for m in messages if m.get("role") == "assistant")
                found = _WORKING_DIR.search(json.dumps(body))
                cwd = found.group(1) if found else ""
                conversation.requests.append(body)
                conversation.cwds.append(cwd)
                return (conversation.turns[turn] if turn < len(conversation.turns)
                        else Reply(text="(no more turns scripted)")), cwd
        return None

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
        scripted = self._scripted(body)
        if scripted is not None:
            behaviour, cwd = scripted
            if isinstance(behaviour, ToolUse):
                return await self._tool_use(request, body, behaviour, cwd)
        elif self.conversations and not body.get("tools"):
            behaviour = Reply(text="side call")  # titles and the like: no turn of anyone's
        else:
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

    async def _tool_use(
        self, request: web.Request, body: dict[str, Any], tool: ToolUse, cwd: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        start = self._message(body, Reply(text=""))
        start.update(content=[], stop_reason=None, usage={"input_tokens": 20, "output_tokens": 1})
        tool_id = f"toolu_{uuid.uuid4().hex[:24]}"
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": tool_id, "name": tool.name, "input": {}}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(tool.make_input(cwd))}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 9}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        with contextlib.suppress(ConnectionResetError):
            for event, data in events:
                await response.write(_sse(event, data))
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
