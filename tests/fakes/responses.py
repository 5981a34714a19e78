"""A loopback OpenAI Responses API (``POST /v1/responses``, SSE) that the real ``codex`` talks to.

Written from the documented event shapes: ``response.created``, ``response.output_item.added``,
``response.output_text.delta``, ``response.output_item.done`` (a ``message`` or a
``function_call``), and ``response.completed`` with usage — or ``response.failed``.
Scripted per turn like the other fakes; :class:`Shell` asks codex to run a command with its
``exec_command`` tool (codex runs it and sends its output in the next request).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer, Reply


@dataclass
class Shell:
    """A turn that calls codex's shell tool with ``cmd``."""

    cmd: str
    input_tokens: int = 40
    output_tokens: int = 8


@dataclass
class Failed:
    """A ``response.failed`` event with this error code (``rate_limit_exceeded``…)."""

    code: str = "server_error"
    message: str = "the model failed"


def _sse(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


@dataclass
class FakeResponses(FakeServer):
    """Every request body is kept in ``requests``."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_route("*", "/{tail:.*}", self._other)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def _other(self, request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "not here"}}, status=404)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        behaviour = self.next_behaviour()
        early = await self.early_answer(behaviour)
        if early is not None:
            return early
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            await self._stream(response, body, behaviour)
        return response

    async def _stream(self, response: web.StreamResponse, body: dict[str, Any],
                      behaviour: Any) -> None:
        rid = f"resp_{uuid.uuid4().hex[:16]}"
        base: dict[str, Any] = {"id": rid, "object": "response", "model": body.get("model"),
                                "status": "in_progress", "output": []}
        await response.write(_sse({"type": "response.created", "response": base}))
        if isinstance(behaviour, Failed):
            failed = {**base, "status": "failed",
                      "error": {"code": behaviour.code, "message": behaviour.message}}
            await response.write(_sse({"type": "response.failed", "response": failed}))
            return
        if isinstance(behaviour, Shell):
            item: dict[str, Any] = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:12]}",
                    "call_id": f"call_{uuid.uuid4().hex[:12]}", "name": "exec_command",
                    "arguments": json.dumps({"cmd": behaviour.cmd}), "status": "completed"}
            usage = (behaviour.input_tokens, behaviour.output_tokens)
        else:
            reply = behaviour if isinstance(behaviour, Reply) else Reply()
            item = {"type": "message", "id": f"msg_{uuid.uuid4().hex[:12]}", "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "".join(reply.pieces()),
                                 "annotations": []}]}
            await response.write(_sse({"type": "response.output_item.added", "output_index": 0,
                                       "item": {**item, "content": [], "status": "in_progress"}}))
            for piece in reply.pieces():
                await response.write(_sse({"type": "response.output_text.delta",
                                           "item_id": item["id"], "output_index": 0,
                                           "content_index": 0, "delta": piece}))
            usage = (reply.input_tokens, reply.output_tokens)
        await response.write(_sse({"type": "response.output_item.done", "output_index": 0,
                                   "item": item}))
        done = {**base, "status": "completed", "output": [item], "usage": {
            "input_tokens": usage[0], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage[1], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage[0] + usage[1]}}
        await response.write(_sse({"type": "response.completed", "response": done}))
