"""``Client``: chat and streamed chat over ``{endpoint}/chat/completions``.

The workhorse under LocalRunner and the classifier. It only speaks HTTP: callers that need a
cheap answer (the classifier) use it directly rather than queueing through the pool, which is
what keeps classification from waiting on a worker slot held by the task being classified.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiohttp
from yarl import URL

from corral.errors import LLMError, RateLimitError, StreamError
from corral.llm.toolcalls import ToolCall, ToolCallAssembler
from corral.retry import (
    RATE_LIMIT_STATUSES,
    RETRYABLE_STATUSES,
    Sleep,
    parse_retry_after,
    run_with_backoff,
)

# One SSE line may be this long; a longer one is an error rather than unbounded memory.
MAX_LINE_BYTES = 8 * 1024 * 1024
_ERROR_BODY_LIMIT = 500
_ERROR_READ_BYTES = 64 * 1024


@dataclass(slots=True)
class Message:
    """A chat message; an assistant's may carry ``tool_calls``, a ``tool`` one answers one."""

    role: str
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(slots=True)
class ChatRequest:
    messages: list[Message]
    response_json: bool = False
    json_schema: dict[str, Any] | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    # OpenAI's `tools` (function definitions) and `tool_choice`.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None


@dataclass(slots=True)
class ChatResponse:
    content: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    model: str | None = None
    cached_tokens: int = 0
    tool_calls: list[ToolCall] = field(default_factory=list)


class Client:
    """A chat client for one OpenAI-compatible endpoint (base URL including ``/v1``).

    ``timeout_s`` bounds a whole call, from connecting to the last byte (None: no bound of its
    own, the caller's timeout is the one); ``idle_timeout_s`` bounds each wait for the server's
    next bytes, headers included, and ``connect_timeout_s`` the connect.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float | None = None,
        session: aiohttp.ClientSession | None = None,
        *,
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 120.0,
        max_attempts: int = 3,
        max_retry_wait_s: float = 10.0,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self._api_key = api_key
        self._url = URL(self.url)
        self._request_headers = self._headers()
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s, sock_connect=connect_timeout_s, sock_read=idle_timeout_s
        )
        self._idle_timeout_s = idle_timeout_s
        self._session = session
        self._owns_session = session is None
        self._fresh: aiohttp.ClientSession | None = None
        self._max_attempts = max_attempts
        # A longer Retry-After is not waited out here: the pool cools the agent down instead
        # of holding a worker slot.
        self._max_retry_wait_s = max_retry_wait_s
        self._sleep = sleep
        self._rand = rand

    def __repr__(self) -> str:  # never show the key
        return f"Client(endpoint={self.endpoint!r}, model={self.model!r})"

    async def __aenter__(self) -> Self:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None if self._owns_session else self._session
        if self._fresh is not None:
            await self._fresh.close()
            self._fresh = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No cookies: a model server sets none worth keeping, and the jar costs per request.
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
            self._owns_session = True
        return self._session

    def _fresh_session(self) -> aiohttp.ClientSession:
        """A session whose every request opens a new connection (for the one retry below)."""
        if self._fresh is None or self._fresh.closed:
            self._fresh = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                cookie_jar=aiohttp.DummyCookieJar())
        return self._fresh

    @property
    def url(self) -> str:
        return f"{self.endpoint}/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _body(self, request: ChatRequest, *, stream: bool, model: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model or self.model,
            "messages": [m.to_openai() for m in request.messages],
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "strict": True, "schema": request.json_schema},
            }
        elif request.response_json:
            body["response_format"] = {"type": "json_object"}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.tools:
            body["tools"] = request.tools
            if request.tool_choice:
                body["tool_choice"] = request.tool_choice
        return body

    async def chat(self, request: ChatRequest, *, model: str | None = None) -> ChatResponse:
        """One non-streaming completion, retried on 429/502/503/504/529 and connection errors."""
        body = json.dumps(self._body(request, stream=False, model=model)).encode()
        return await self._with_retries(lambda _n: self._chat_once(body))

    async def chat_stream(
        self,
        request: ChatRequest,
        on_delta: Callable[[str], object],
        *,
        model: str | None = None,
    ) -> ChatResponse:
        """Stream a completion, calling ``on_delta(text)`` per content delta, in order.

        Retries happen only before the first delta: a stream that has delivered content is never
        replayed, since the caller has already acted on it.
        """
        body = json.dumps(self._body(request, stream=True, model=model)).encode()
        return await self._with_retries(lambda _n: self._stream_once(body, on_delta))

    async def _with_retries(self, attempt: Callable[[int], Any]) -> ChatResponse:
        result: ChatResponse = await run_with_backoff(
            attempt,
            attempts=self._max_attempts,
            should_retry=lambda exc: isinstance(exc, LLMError) and exc.retryable,
            retry_after=lambda exc: exc.retry_after_s if isinstance(exc, LLMError) else None,
            max_wait_s=self._max_retry_wait_s,
            sleep=self._sleep,
            rand=self._rand,
        )
        return result

    async def _post(self, body: bytes) -> aiohttp.ClientResponse:
        """Send the request and read the response head; the caller releases the response.

        A server may close a kept-alive connection between requests (the llama.cpp server does
        after a streamed reply); the next request on it fails before any byte of a response
        comes back. Such a request is sent once more, on a new connection: it cannot have been
        acted on.
        """
        try:
            return await self._ensure_session().post(
                self._url, data=body, headers=self._request_headers, timeout=self._timeout)
        except aiohttp.ClientConnectorError:
            raise  # no connection was made at all: not a stale one
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return await self._fresh_session().post(
                self._url, data=body, headers=self._request_headers, timeout=self._timeout)

    async def _chat_once(self, body: bytes) -> ChatResponse:
        try:
            resp = await self._post(body)
            async with resp:
                if resp.status != 200:
                    raise await self._status_error(resp)
                raw = await resp.read()
        except aiohttp.ConnectionTimeoutError as exc:
            raise self._connection_error(exc, delivered=False) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise LLMError(f"{self.url} sent nothing for {self._idle_timeout_s:g}s") from exc
        except TimeoutError as exc:  # the client's own bound on the whole call
            raise LLMError(f"{self.url} did not answer within {self._timeout_s:g}s") from exc
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc, delivered=False) from exc
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
            calls = ToolCallAssembler()
            calls.feed(choice["message"].get("tool_calls"))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise LLMError(f"{self.url} returned an undecodable reply: {_snippet(raw)}") from None
        usage = data.get("usage") or {}
        return ChatResponse(
            tool_calls=calls.calls,
            content=content,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason"),
            model=data.get("model"),
            cached_tokens=_cached(usage),
        )

    async def _stream_once(
        self, body: bytes, on_delta: Callable[[str], object]
    ) -> ChatResponse:
        state = _StreamState()
        try:
            resp = await self._post(body)
            async with resp:
                if resp.status != 200:
                    raise await self._status_error(resp)
                # Whole chunks, split here: one await per network read, not one per line.
                lines = _LineSplitter()
                async for chunk in resp.content.iter_any():
                    if lines.feed(chunk, state, on_delta):
                        break
                else:
                    lines.end(state, on_delta)
        except aiohttp.ConnectionTimeoutError as exc:
            raise self._connection_error(exc, delivered=False) from exc
        except aiohttp.ServerTimeoutError as exc:  # the per-read idle bound
            raise self._stalled(state) from exc
        except TimeoutError as exc:  # the client's own bound on the whole call
            raise StreamError(f"{self.url} did not finish within {self._timeout_s:g}s",
                              partial_content=state.text()) from exc
        except aiohttp.ClientError as exc:
            raise self._connection_error(
                exc, delivered=state.delivered, partial=state.text()
            ) from exc
        except ValueError as exc:  # a line longer than the limit
            raise self._oversized(state, exc) from None
        return state.finish(self.url)

    def _stalled(self, state: _StreamState) -> StreamError:
        return StreamError(
            f"{self.url} sent nothing for {self._idle_timeout_s:g}s (stream stalled)",
            partial_content=state.text(),
        )

    def _oversized(self, state: _StreamState, exc: ValueError) -> StreamError:
        return StreamError(f"{self.url} sent an oversized line: {exc}",
                           partial_content=state.text())

    def _scrub(self, text: str) -> str:
        """Never let the key into an error (some servers and proxies echo request headers)."""
        return text.replace(self._api_key, "***") if self._api_key else text

    async def _status_error(self, resp: aiohttp.ClientResponse) -> LLMError:
        text = self._scrub(await _safe_text(resp))
        status = resp.status
        retry_after_s = parse_retry_after(resp.headers)
        detail = _error_message(text)
        suffix = f"; retry-after: {retry_after_s:g}" if retry_after_s is not None else ""
        if status in RATE_LIMIT_STATUSES:
            kind = "rate limit" if status == 429 else "overloaded (rate limit)"
            return RateLimitError(
                f"{kind}: HTTP {status} from {self.url}: {detail}{suffix}",
                status=status,
                retry_after_s=retry_after_s,
                retryable=True,
            )
        return LLMError(
            f"HTTP {status} from {self.url}: {detail}{suffix}",
            status=status,
            retry_after_s=retry_after_s,
            retryable=status in RETRYABLE_STATUSES,
        )

    def _connection_error(
        self, exc: aiohttp.ClientError, *, delivered: bool, partial: str = ""
    ) -> LLMError:
        reason = self._scrub(str(exc) or type(exc).__name__)
        if delivered:
            return StreamError(
                f"stream from {self.url} broke after content arrived: {reason}",
                partial_content=partial,
            )
        return LLMError(f"cannot reach {self.url}: {reason}", retryable=True,
                        partial_content=partial)


class _LineSplitter:
    """Cuts network chunks into SSE lines, holding a partial line until its end arrives."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes, state: _StreamState, on_delta: Callable[[str], object]) -> bool:
        """Feed each complete line to ``state``; True once the stream said ``[DONE]``."""
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        if any(state.feed(line, on_delta) for line in lines):
            return True
        if len(self.pending) > MAX_LINE_BYTES:
            raise ValueError(f"a line is longer than {MAX_LINE_BYTES} bytes")
        return False

    def end(self, state: _StreamState, on_delta: Callable[[str], object]) -> None:
        state.feed(self.pending, on_delta)


class _StreamState:
    """Parses SSE lines of a chat-completions stream; the hot loop of streaming."""

    __slots__ = ("calls", "chunks", "delivered", "done", "finish_reason", "model", "usage")

    def __init__(self) -> None:
        self.calls: ToolCallAssembler | None = None  # made at the first tool-call fragment
        self.chunks: list[str] = []
        self.delivered = False
        self.done = False
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.usage: dict[str, Any] = {}

    def text(self) -> str:
        return _whole_characters("".join(self.chunks))

    def feed(self, line: bytes, on_delta: Callable[[str], object]) -> bool:
        """Handle one line; True once ``[DONE]`` arrives."""
        if not line.startswith(b"data:"):
            return False  # blank lines, ": comments", "event:" and "id:" fields
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return True
        if not payload:
            return False
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise StreamError(
                f"undecodable data line in stream: {_snippet(payload)}",
                partial_content=self.text(),
            ) from None
        if not isinstance(chunk, dict):
            raise StreamError(f"unexpected data line in stream: {_snippet(payload)}",
                              partial_content=self.text())
        if "error" in chunk:
            raise StreamError(f"server error mid-stream: {_error_text(chunk['error'])}",
                              partial_content=self.text())
        if self.model is None:
            self.model = chunk.get("model")
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        for choice in chunk.get("choices") or ():
            self._choice(choice, on_delta)
        return False

    def _choice(self, choice: dict[str, Any], on_delta: Callable[[str], object]) -> None:
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if content:
            self.chunks.append(content)
            self.delivered = True
            on_delta(content)
        fragments = delta.get("tool_calls")
        if fragments:
            if self.calls is None:
                self.calls = ToolCallAssembler()
            self.calls.feed(fragments)
            self.delivered = True
        reason = choice.get("finish_reason")
        if reason:
            self.finish_reason = reason

    def finish(self, url: str) -> ChatResponse:
        if not self.done and self.finish_reason is None:
            raise StreamError(
                f"stream from {url} ended before it finished (no finish_reason, no [DONE])",
                partial_content=self.text(),
            )
        usage = self.usage
        return ChatResponse(
            content=self.text(),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=self.finish_reason,
            model=self.model,
            cached_tokens=_cached(usage),
            tool_calls=[] if self.calls is None else self.calls.calls,
        )


def _whole_characters(text: str) -> str:
    """Join surrogate halves that arrived in separate chunks; replace any left alone.

    A server that escapes non-ASCII may split an emoji's UTF-16 pair across two deltas. Each
    half alone is not text, and SQLite would refuse to store it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _cached(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


async def _safe_text(resp: aiohttp.ClientResponse) -> str:
    try:
        raw = await resp.content.read(_ERROR_READ_BYTES)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    return raw.decode("utf-8", "replace")


def _error_text(err: object) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err.get("type") or json.dumps(err))
    return str(err)


def _error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return _snippet(body) or "(empty body)"
    if isinstance(data, dict) and "error" in data:
        return _error_text(data["error"])
    return _snippet(body)


def _snippet(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.strip()
    return text if len(text) <= _ERROR_BODY_LIMIT else text[:_ERROR_BODY_LIMIT] + "…"
