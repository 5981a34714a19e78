"""corral.llm.Client against loopback fakes and the real llama.cpp server."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
import pytest

from corral.errors import LLMError, RateLimitError, StreamError
from corral.llm import ChatRequest, Client, Message
from corral.llm import client as client_module
from tests.fakes.base import Drop, Garbage, Hang, Reply, Status
from tests.fakes.base import StreamError as FakeStreamError
from tests.fakes.openai import BareStringError, FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
HELLO = ChatRequest([Message("user", "hello")])


class Sleeps:
    """An injected sleep: records the delays instead of waiting them out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


async def test_chat_posts_bearer_model_messages_and_json_format(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="world", input_tokens=4, output_tokens=7))
    async with Client(fake.endpoint, "m1", api_key="sk-secret") as client:
        reply = await client.chat(ChatRequest([Message("user", "hello")], response_json=True))
    sent = fake.requests[0]
    assert sent["headers"]["Authorization"] == "Bearer sk-secret"
    assert sent["body"]["model"] == "m1" and sent["body"]["stream"] is False
    assert sent["body"]["messages"] == [{"role": "user", "content": "hello"}]
    assert sent["body"]["response_format"] == {"type": "json_object"}
    assert (reply.content, reply.prompt_tokens, reply.output_tokens, reply.finish_reason) == (
        "world", 4, 7, "stop")


async def test_no_authorization_header_without_key(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    async with Client(fake.endpoint, "m") as client:
        await client.chat(HELLO)
    assert "Authorization" not in fake.requests[0]["headers"]


async def test_chat_stream_joins_deltas_and_reads_usage_chunk(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Reply(parts=("Hel", "lo, ", "world"), input_tokens=3, output_tokens=5))
    deltas: list[str] = []
    async with Client(fake.endpoint, "m") as client:
        reply = await client.chat_stream(HELLO, deltas.append)
    assert deltas == ["Hel", "lo, ", "world"]
    assert reply.content == "Hello, world"
    assert (reply.prompt_tokens, reply.output_tokens, reply.finish_reason) == (3, 5, "stop")
    assert fake.requests[0]["body"]["stream_options"] == {"include_usage": True}


async def test_429_with_retry_after_then_success(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Status(429, retry_after="1"), Reply(text="ok"))
    sleeps = Sleeps()
    async with Client(fake.endpoint, "m", sleep=sleeps) as client:
        reply = await client.chat(HELLO)
    assert len(fake.requests) == 2
    assert reply.content == "ok"
    assert sleeps.delays == [1.0]


async def test_429_error_says_rate_limit_and_retry_after(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Status(429, retry_after="30"))
    async with Client(fake.endpoint, "m", max_attempts=1) as client:
        with pytest.raises(RateLimitError) as caught:
            await client.chat(HELLO)
    assert "rate limit" in str(caught.value)
    assert "retry-after: 30" in str(caught.value)
    assert caught.value.retry_after_s == 30.0


async def test_http_date_retry_after_is_honoured(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    fake.push(Status(429, retry_after=when), Reply(text="ok"))
    sleeps = Sleeps()
    async with Client(fake.endpoint, "m", sleep=sleeps, max_retry_wait_s=60) as client:
        assert (await client.chat_stream(HELLO, lambda _t: None)).content == "ok"
    assert len(sleeps.delays) == 1 and 17 <= sleeps.delays[0] <= 20


async def test_long_retry_after_is_left_to_the_caller(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Status(429, retry_after="300"), Reply(text="never reached"))
    async with Client(fake.endpoint, "m", sleep=Sleeps()) as client:
        with pytest.raises(RateLimitError) as caught:
            await client.chat(HELLO)
    assert caught.value.retry_after_s == 300.0
    assert len(fake.requests) == 1


async def test_503_then_success_and_529_then_success(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Status(503), Status(529), Reply(text="fine"))
    sleeps = Sleeps()
    async with Client(fake.endpoint, "m", sleep=sleeps, rand=lambda: 0.0) as client:
        assert (await client.chat_stream(HELLO, lambda _t: None)).content == "fine"
    assert len(fake.requests) == 3
    assert sleeps.delays == [0.5, 1.0]  # exponential backoff when the server names no delay


async def test_400_is_not_retried(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Status(400, body={"error": {"message": "bad schema"}}))
    async with Client(fake.endpoint, "m", sleep=Sleeps()) as client:
        with pytest.raises(LLMError, match="bad schema") as caught:
            await client.chat(HELLO)
    assert caught.value.status == 400
    assert len(fake.requests) == 1


@pytest.mark.parametrize("behaviour, message", [
    (FakeStreamError(message="model exploded", text="par"), "model exploded"),
    (BareStringError(message="lm studio says no", text="par"), "lm studio says no"),
])
async def test_error_mid_stream_raises_with_server_message(
    fake_openai: MakeFake, behaviour: Any, message: str
) -> None:
    fake = await fake_openai()
    fake.push(behaviour)
    async with Client(fake.endpoint, "m") as client:
        with pytest.raises(StreamError, match=message) as caught:
            await client.chat_stream(HELLO, lambda _t: None)
    assert caught.value.partial_content == "par"
    assert len(fake.requests) == 1  # content had arrived: never replayed


async def test_drop_mid_stream_keeps_partial_content(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Drop(text="half an ans"))
    async with Client(fake.endpoint, "m") as client:
        with pytest.raises(StreamError) as caught:
            await client.chat_stream(HELLO, lambda _t: None)
    assert caught.value.partial_content == "half an ans"
    assert len(fake.requests) == 1


async def test_garbage_data_line_is_a_clear_error(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Garbage(text="{not json"))
    async with Client(fake.endpoint, "m") as client:
        with pytest.raises(StreamError, match="undecodable data line") as caught:
            await client.chat_stream(HELLO, lambda _t: None)
    assert not isinstance(caught.value.__cause__, json.JSONDecodeError)


async def test_a_line_over_the_limit_is_an_error_not_unbounded_memory(
    fake_openai: MakeFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MAX_LINE_BYTES", 64 * 1024)
    fake = await fake_openai()
    fake.push(Reply(parts=("ok ", "z" * 1_000_000)))
    async with Client(fake.endpoint, "m") as client:
        with pytest.raises(StreamError, match="oversized line") as caught:
            await client.chat_stream(HELLO, lambda _t: None)
    assert caught.value.partial_content == "ok "


async def test_a_character_split_across_deltas_comes_out_whole(fake_openai: MakeFake) -> None:
    fake = await fake_openai()  # its chunks escape non-ASCII as \u, as some servers do
    fake.push(Reply(parts=("smile \ud83d", "\ude00 and a stray \udc00.")))
    deltas: list[str] = []
    async with Client(fake.endpoint, "m") as client:
        answer = await client.chat_stream(HELLO, deltas.append)
    assert answer.content == "smile \U0001f600 and a stray \ufffd."
    assert answer.content.encode("utf-8")  # storable: SQLite would refuse a lone half
    assert deltas == ["smile \ud83d", "\ude00 and a stray \udc00."]


async def test_garbage_json_body_is_a_clear_error(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Garbage(text="<html>oops</html>"))
    async with Client(fake.endpoint, "m") as client:
        with pytest.raises(LLMError, match="undecodable reply"):
            await client.chat(HELLO)


async def test_hanging_server_fails_in_bounded_time(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Hang())
    started = time.monotonic()
    async with Client(fake.endpoint, "m", idle_timeout_s=0.3, max_attempts=1) as client:
        with pytest.raises(StreamError, match="stalled"):
            await client.chat_stream(HELLO, lambda _t: None)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "chat"])
async def test_the_clients_own_bound_holds_when_no_header_ever_comes(
    fake_openai: MakeFake, stream: bool
) -> None:
    fake = await fake_openai()
    fake.push(Hang())
    started = time.monotonic()
    async with Client(fake.endpoint, "m", timeout_s=0.5, idle_timeout_s=60,
                      max_attempts=1) as client:
        with pytest.raises(LLMError, match=r"within 0\.5s"):
            if stream:
                await client.chat_stream(HELLO, lambda _t: None)
            else:
                await client.chat(HELLO)
    assert time.monotonic() - started < 5


async def test_connection_refused_is_retried_then_reported() -> None:
    from tests.conftest import free_port

    sleeps = Sleeps()
    async with Client(f"http://127.0.0.1:{free_port()}/v1", "m", sleep=sleeps) as client:
        with pytest.raises(LLMError, match="cannot reach"):
            await client.chat(HELLO)
    assert len(sleeps.delays) == 2


async def test_json_schema_request_format(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    async with Client(fake.endpoint, "m") as client:
        await client.chat(ChatRequest([Message("user", "x")], json_schema=schema))
    fmt = fake.requests[0]["body"]["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"] == schema


def test_repr_hides_the_key() -> None:
    assert "sk-secret" not in repr(Client("http://x/v1", "m", api_key="sk-secret"))


@pytest.mark.real
async def test_real_llama_chat_and_stream(llama_server: str) -> None:
    async with Client(llama_server, "smollm2") as client:
        reply = await client.chat(ChatRequest([Message("user", "Say hi.")], max_tokens=16))
        deltas: list[str] = []
        streamed = await client.chat_stream(
            ChatRequest([Message("user", "Count to five.")], max_tokens=24), deltas.append
        )
    assert reply.content and reply.prompt_tokens > 0 and reply.output_tokens > 0
    assert len(deltas) > 1 and "".join(deltas) == streamed.content
    assert streamed.prompt_tokens > 0 and 0 < streamed.output_tokens <= 24
    assert streamed.finish_reason in ("stop", "length")


@pytest.mark.real
async def test_real_llama_json_schema_reply_validates(llama_server: str) -> None:
    schema = {
        "type": "object",
        "properties": {"agent_type": {"type": "string", "enum": ["claude", "local"]},
                       "reason": {"type": "string"}},
        "required": ["agent_type", "reason"],
        "additionalProperties": False,
    }
    async with Client(llama_server, "smollm2") as client:
        reply = await client.chat(ChatRequest(
            [Message("user", "Pick an agent for: fix a typo in README.")],
            json_schema=schema, max_tokens=80, temperature=0.0))
    jsonschema.validate(json.loads(reply.content), schema)


@pytest.mark.real
async def test_real_llama_serves_many_streams_in_a_row_on_one_client(llama_server: str) -> None:
    """llama.cpp closes a kept-alive connection after a streamed reply; no request is lost."""
    async with Client(llama_server, "smollm2", max_attempts=1) as client:
        for n in range(5):
            reply = await client.chat_stream(
                ChatRequest([Message("user", f"Say {n}.")], max_tokens=8), lambda _t: None)
            assert reply.finish_reason in ("stop", "length")
        assert (await client.chat(ChatRequest([Message("user", "Hi.")], max_tokens=4))).content


async def test_a_request_on_a_connection_the_server_dropped_is_sent_again_fresh() -> None:
    """A server that closes each connection after one answer, without saying so."""
    answered: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        answered.append(await reader.readexactly(length))
        body = json.dumps({"choices": [{"message": {"content": f"answer {len(answered)}"},
                                        "finish_reason": "stop"}]}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()  # no "Connection: close": the client thinks it may reuse it

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Client(f"http://127.0.0.1:{port}/v1", "m", max_attempts=1) as client:
            replies = [(await client.chat(HELLO)).content for _ in range(4)]
    finally:
        server.close()
        await server.wait_closed()
    assert replies == [f"answer {n}" for n in range(1, 5)] and len(answered) == 4
