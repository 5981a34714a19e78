"""A loopback Gemini API (``streamGenerateContent`` SSE) that the real ``gemini`` CLI uses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.base import Drop, FakeServer, Garbage, Reply, StreamError


@dataclass
class FakeGemini(FakeServer):
    """``POST /v1beta/models/{model}:streamGenerateContent`` and ``:generateContent``."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{call}", self._call)
        app.router.add_route("*", "/{tail:.*}", self._other)

    async def _other(self, request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": 404, "message": "not here"}}, status=404)

    def error_body(self, status: int) -> dict[str, Any]:
        kind = {429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}.get(status, "INTERNAL")
        return {"error": {"code": status, "message": f"fake {kind}", "status": kind}}

    @staticmethod
    def chunk(text: str, reply: Reply, *, final: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"},
                                     "index": 0}
        if final:
            candidate["finishReason"] = "STOP"
        return {"candidates": [candidate], "usageMetadata": {
            "promptTokenCount": reply.input_tokens, "candidatesTokenCount": reply.output_tokens,
            "totalTokenCount": reply.input_tokens + reply.output_tokens}}

    async def _call(self, request: web.Request) -> web.StreamResponse:
        call = request.match_info["call"]
        body = await request.json()
        self.requests.append({"call": call, **body})
        behaviour = self.next_behaviour()
        early = await self.early_answer(behaviour)
        if early is not None:
            return early
        reply = behaviour if isinstance(behaviour, Reply) else Reply(text="")
        if not call.endswith(":streamGenerateContent"):
            return web.json_response(self.chunk(reply.text, reply, final=True))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if isinstance(behaviour, Drop | StreamError):
            await response.write(
                f"data: {json.dumps(self.chunk(behaviour.text, reply, final=False))}\n\n".encode()
            )
            assert request.transport is not None
            request.transport.close()
            return response
        if isinstance(behaviour, Garbage):
            await response.write(f"data: {behaviour.text}\n\n".encode())
            return response
        pieces = reply.pieces()
        for i, piece in enumerate(pieces):
            chunk = self.chunk(piece, reply, final=i == len(pieces) - 1)
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        return response
