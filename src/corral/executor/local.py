"""LocalRunner: a thin adapter from ``llm.Client.chat_stream`` to the Runner protocol.

Deltas go to ``stdout.log`` as they arrive (one ``stream_event`` line each), then one consolidated
``assistant`` message and a ``result`` with usage. Local models are free: cost is 0, tokens count.
"""

from __future__ import annotations

import asyncio
import time

from corral.errors import LLMError, RateLimitError
from corral.executor.runner import RunRequest, RunResult, RunStatus, open_envelope
from corral.executor.streamjson import EnvelopeWriter, new_message_id, new_session_id, trim
from corral.llm.client import ChatRequest, ChatResponse, Client, Message


class LocalRunner:
    """Runs a task as one streamed chat completion on an OpenAI-compatible server."""

    name = "local"

    def __init__(
        self,
        client: Client,
        *,
        timeout_s: float = 600.0,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.max_tokens = max_tokens

    def unavailable_reason(self) -> str | None:
        return None

    async def run(self, request: RunRequest) -> RunResult:
        model = request.model or self.client.model
        timeout_s = request.timeout_s or self.timeout_s
        session_id = new_session_id()
        started = time.monotonic()
        writer = await open_envelope(request)
        with writer:
            writer.init(session_id=session_id, model=model,
                        cwd=str(request.workdir) if request.workdir else None,
                        source="local", endpoint=self.client.endpoint)
            turns = [m for asked, answered in request.history
                     for m in (Message("user", asked), Message("assistant", answered))]
            chat = ChatRequest(
                messages=[*turns, Message("user", request.prompt)],
                temperature=self.temperature, max_tokens=self.max_tokens,
            )
            try:
                async with asyncio.timeout(timeout_s):
                    response = await self.client.chat_stream(chat, writer.text_delta, model=model)
            except TimeoutError:
                return self._failed(writer, session_id, started, RunStatus.TIMED_OUT,
                                    f"local model timed out after {timeout_s:g}s")
            except RateLimitError as exc:
                result = self._failed(writer, session_id, started, RunStatus.RATE_LIMITED,
                                      exc.message)
                result.retry_after_s = exc.retry_after_s
                return result
            except LLMError as exc:
                result = self._failed(writer, session_id, started, RunStatus.FAILED, exc.message)
                result.retryable = exc.retryable or exc.status is None or exc.status >= 500
                return result
            except asyncio.CancelledError:
                self._failed(writer, session_id, started, RunStatus.FAILED, "cancelled")
                raise
            return self._succeeded(writer, session_id, started, response, model)

    def _succeeded(
        self, writer: EnvelopeWriter, session_id: str, started: float,
        response: ChatResponse, model: str,
    ) -> RunResult:
        usage = _usage(response)
        with writer.together():
            writer.assistant(message_id=new_message_id(),
                             model=model or response.model, session_id=session_id,
                             content=[{"type": "text", "text": response.content}], usage=usage)
            writer.result(is_error=False, result=response.content, session_id=session_id,
                          duration_ms=_ms(started), usage=usage, total_cost_usd=0.0,
                          stop_reason=response.finish_reason)
        return RunResult(
            status=RunStatus.SUCCEEDED, summary=trim(response.content), cost_usd=0.0,
            tokens_in=response.prompt_tokens, tokens_out=response.output_tokens,
            session_id=session_id, model=model or response.model, final_text=response.content,
        )

    def _failed(
        self, writer: EnvelopeWriter, session_id: str, started: float,
        status: RunStatus, error: str,
    ) -> RunResult:
        partial = writer.text  # what streamed before the failure is kept in the log
        writer.result(is_error=True, result=partial, session_id=session_id,
                      duration_ms=_ms(started), usage={}, total_cost_usd=0.0, error=error)
        return RunResult(status=status, summary=trim(partial), cost_usd=0.0,
                         session_id=session_id, error=error)


def _usage(response: ChatResponse) -> dict[str, int]:
    return {
        "input_tokens": max(response.prompt_tokens - response.cached_tokens, 0),
        "cache_read_input_tokens": response.cached_tokens,
        "output_tokens": response.output_tokens,
    }


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
