"""A loopback OpenAI-compatible server for benchmarks, run in its own process.

Model ``slow`` streams 30 chunks 0.1 s apart (to hold many streams open); anything else answers
at once, streamed or not as asked. A request with ``tools`` and a model named ``agent-N`` gets a
scripted agent turn: a call of its bash tool running ``true`` until the conversation holds N - 1
results, then the end (a plain answer; for mini-swe-agent's lowercase ``bash`` tool, its
submit command).
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


def _agent_turn(body: dict[str, object]) -> tuple[str | None, dict[str, object] | None]:
    """The next scripted turn: (final text, None) or (None, the tool call)."""
    turns = int(str(body.get("model", "agent-1")).rsplit("-", 1)[1])
    messages = body.get("messages")
    done = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "tool") \
        if isinstance(messages, list) else 0
    names = {t["function"]["name"] for t in body["tools"]}  # type: ignore[index, union-attr]
    tool = "Bash" if "Bash" in names else "bash"
    if done < turns - 1:
        return None, {"name": tool, "arguments": json.dumps({"command": "true"})}
    if tool == "Bash":
        return "done", None
    submit = {"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"}
    return None, {"name": tool, "arguments": json.dumps(submit)}


async def _agent(request: web.Request, body: dict[str, object]) -> web.StreamResponse:
    text, call = _agent_turn(body)
    calls = [] if call is None else [{"index": 0, "id": f"call_{time.monotonic_ns()}",
                                      "type": "function", "function": call}]
    usage = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
    reason = "stop" if call is None else "tool_calls"
    if not body.get("stream"):
        message = {"role": "assistant", "content": text, "tool_calls": calls or None}
        return web.json_response({"id": "chatcmpl-agent", "object": "chat.completion",
                                  "created": int(time.time()), "model": body.get("model"),
                                  "choices": [{"index": 0, "message": message,
                                               "finish_reason": reason}], "usage": usage})
    delta: dict[str, object] = {"role": "assistant", "content": text}
    if calls:
        delta["tool_calls"] = calls
    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    stop = {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}], "usage": usage}
    return web.Response(body=f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(stop)}\n\n"
                        "data: [DONE]\n\n".encode(), content_type="text/event-stream")


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body.get("tools") and str(body.get("model", "")).startswith("agent-"):
        return await _agent(request, body)
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
