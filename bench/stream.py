"""Deltas per second through ``corral.llm.Client.chat_stream`` vs the official ``openai`` SDK.

A loopback server (in its own process, so it does not share the client's event loop) streams
N one-token chunks as fast as it can; both clients read the same stream in the same run.

    .venv/bin/python -m bench.stream [--chunks 200000] [--rounds 3]

Needs the bench extra: ``.venv/bin/pip install -e '.[bench]'``. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import time

from aiohttp import web


def _payload(chunks: int) -> bytes:
    line = "data: " + json.dumps({
        "id": "c", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {"content": "tok"}, "finish_reason": None}]},
        separators=(",", ":")) + "\n\n"
    end = "data: " + json.dumps({
        "id": "c", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        separators=(",", ":")) + "\n\n"
    usage = "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m",
                                   "choices": [], "usage": {"prompt_tokens": 1,
                                                            "completion_tokens": chunks}})
    return (line * chunks + end + usage + "\n\ndata: [DONE]\n\n").encode()


def _serve(port: int, chunks: int) -> None:
    body = _payload(chunks)

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        view = memoryview(body)
        for start in range(0, len(body), 64 * 1024):
            await response.write(view[start:start + 64 * 1024].tobytes())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _corral(endpoint: str) -> int:
    from corral.llm import ChatRequest, Client, Message

    count = 0

    def on_delta(_text: str) -> None:
        nonlocal count
        count += 1

    async with Client(endpoint, "m") as client:
        await client.chat_stream(ChatRequest([Message("user", "go")]), on_delta)
    return count


async def _openai(endpoint: str) -> int:
    import openai

    count = 0
    async with openai.AsyncOpenAI(base_url=endpoint, api_key="x") as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "go"}], stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                count += 1
    return count


async def _wait_up(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def main(chunks: int, rounds: int) -> None:
    port = _free_port()
    server = multiprocessing.Process(target=_serve, args=(port, chunks), daemon=True)
    server.start()
    try:
        await _wait_up(port)
        endpoint = f"http://127.0.0.1:{port}/v1"
        best: dict[str, float] = {}
        for _ in range(rounds):
            for name, fn in (("corral", _corral), ("openai-sdk", _openai)):
                started = time.perf_counter()
                count = await fn(endpoint)
                rate = count / (time.perf_counter() - started)
                assert count == chunks, f"{name} saw {count} deltas, expected {chunks}"
                best[name] = max(best.get(name, 0.0), rate)
        print(f"chunks per stream: {chunks}, best of {rounds} rounds")
        for name, rate in best.items():
            print(f"  {name:<11} {rate:>12,.0f} deltas/s")
        print(f"  ratio corral / openai-sdk: {best['corral'] / best['openai-sdk']:.2f}x")
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.chunks, args.rounds))
