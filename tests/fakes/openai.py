"""A loopback OpenAI-compatible chat server (``/v1/chat/completions``, JSON and SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.base import Drop, FakeServer, Garbage, Reply, StreamError


@dataclass
class BareStringError(StreamError):
    """LM Studio style: ``data: {"error": "text"}`` mid-stream."""


@dataclass
class ToolCalls:
    """A turn that calls tools, streamed the way a given server family does it.

    ``fragments``: llama.cpp and vLLM (id and name first, arguments in pieces per index);
    ``whole``: Ollama (each call whole in one chunk); ``index0``: whole calls all at index 0;
    ``empty_ids``: fragments with empty ids. ``calls`` are (name, arguments) where the
    arguments are a dict or, to be malformed, a raw string.
    """

    calls: list[tuple[str, dict[str, Any] | str]]
    dialect: str = "fragments"
    text: str = ""
    finish_reason: str = "tool_calls"


@dataclass
class EchoAuth:
    """A hostile 401 that echoes the caller's Authorization header in its message."""


@dataclass
class FakeOpenAI(FakeServer):
    """Every request is kept in ``requests`` with its ``headers`` and JSON ``body``."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)

    @property
    def endpoint(self) -> str:
        return f"{self.url}/v1"

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "fake-model", "object": "model"}]})

    in_flight: int = 0
    max_in_flight: int = 0

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        behaviour = self.next_behaviour()
        if isinstance(behaviour, EchoAuth):
            echoed = request.headers.get("Authorization")
            return web.json_response({"error": {"message": f"bad key {echoed}"}}, status=401)
        early = await self.early_answer(behaviour)
        if early is not None:
            return early
        reply = behaviour if isinstance(behaviour, Reply) else Reply(text="")
        if not body.get("stream"):
            if isinstance(behaviour, Garbage):
                return web.Response(text=behaviour.text, content_type="application/json")
            return web.json_response(self._completion(body, reply))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the client went away: fine
            await self._stream(request, response, body, behaviour, reply)
        return response

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
            "model": body.get("model") or "fake-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply.text}}],
            "usage": {"prompt_tokens": reply.input_tokens,
                      "completion_tokens": reply.output_tokens,
                      "total_tokens": reply.input_tokens + reply.output_tokens},
        }

    async def _tool_calls(
        self, response: web.StreamResponse, model: str, turn: ToolCalls
    ) -> None:
        if turn.text:
            await response.write(self._chunk(model, {"content": turn.text}))
        for index, (name, arguments) in enumerate(turn.calls):
            raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
            call_id = "" if turn.dialect == "empty_ids" else f"call_{uuid.uuid4().hex[:8]}"
            if turn.dialect in ("fragments", "empty_ids"):
                first = {"index": index, "id": call_id, "type": "function",
                         "function": {"name": name, "arguments": ""}}
                await response.write(self._chunk(model, {"tool_calls": [first]}))
                third = max(len(raw) // 3, 1)
                for piece in (raw[:third], raw[third:2 * third], raw[2 * third:]):
                    if piece:
                        await response.write(self._chunk(model, {"tool_calls": [
                            {"index": index, "function": {"arguments": piece}}]}))
            else:
                whole = {"index": 0 if turn.dialect == "index0" else index, "id": call_id,
                         "type": "function", "function": {"name": name, "arguments": raw}}
                await response.write(self._chunk(model, {"tool_calls": [whole]}))
        await response.write(self._chunk(model, {}, turn.finish_reason))
        usage = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                 "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 10}}
        await response.write(f"data: {json.dumps(usage)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")

    @staticmethod
    def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
        data = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(data)}\n\n".encode()

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, body: dict[str, Any],
        behaviour: object, reply: Reply,
    ) -> None:
        model = body.get("model") or "fake-model"
        await response.write(b": keep-alive comment\n\n")
        await response.write(self._chunk(model, {"role": "assistant", "content": ""}))
        if isinstance(behaviour, ToolCalls):
            await self._tool_calls(response, model, behaviour)
            return
        if isinstance(behaviour, Drop):
            await response.write(self._chunk(model, {"content": behaviour.text}))
            assert request.transport is not None
            request.transport.close()
            return
        if isinstance(behaviour, Garbage):
            await response.write(f"data: {behaviour.text}\n\n".encode())
            return
        if isinstance(behaviour, BareStringError):
            await response.write(self._chunk(model, {"content": behaviour.text}))
            await response.write(f"data: {json.dumps({'error': behaviour.message})}\n\n".encode())
            return
        if isinstance(behaviour, StreamError):
            await response.write(self._chunk(model, {"content": behaviour.text}))
            error = {"error": {"message": behaviour.message, "type": "server_error"}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
            return
        for piece in reply.pieces():
            if reply.chunk_delay_s:
                await asyncio.sleep(reply.chunk_delay_s)
            await response.write(self._chunk(model, {"content": piece}))
        await response.write(self._chunk(model, {}, "stop"))
        usage: dict[str, Any] = {
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
            "choices": [], "usage": {"prompt_tokens": reply.input_tokens,
                                     "completion_tokens": reply.output_tokens}}
        await response.write(f"data: {json.dumps(usage)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
