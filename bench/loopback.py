"""A loopback OpenAI-compatible server for benchmarks, run in its own process.

Model ``slow`` streams 30 chunks 0.1 s apart (to hold many streams open); anything else answers
at once, streamed or not as asked.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import time

from aiohttp import web

_CHUNK = json.dumps({"choices": [{"index": 0, "delta": {"content": "ok"},
                                  "finish_reason": None}]})
_STOP = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
_FAST_STREAM = f"data: {_CHUNK}\n\ndata: {_STOP}\n\ndata: [DONE]\n\n".encode()
_JSON = json.dumps({"model": "bench", "choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.Response(body=_JSON, content_type="application/json")
    if body.get("model") != "slow":
        return web.Response(body=_FAST_STREAM, content_type="text/event-stream")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(30):
        await response.write(f"data: {_CHUNK}\n\n".encode())
        await asyncio.sleep(0.1)
    await response.write(f"data: {_STOP}\n\ndata: [DONE]\n\n".encode())
    return response


def _serve(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server() -> tuple[multiprocessing.Process, str]:
    """Start the server process; returns it and its ``…/v1`` endpoint once it accepts."""
    port = free_port()
    proc = multiprocessing.Process(target=_serve, args=(port,), daemon=True)
    proc.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/v1"
