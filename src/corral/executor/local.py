"""LocalRunner: a local model (any OpenAI-compatible server) as a text answer or as an agent.

Without a working dir (or with ``[local_agent] mode = "text"``) a task is one streamed chat
completion: deltas go to ``stdout.log`` as they arrive (one ``stream_event`` line each), then one
consolidated ``assistant`` message and a ``result`` with usage. With a working dir it runs the
agent loop (:mod:`corral.executor.agent.loop`) there, with Claude Code's tools, logged in the
same envelope. Local models are free: cost is 0, tokens count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from corral.config import Price
from corral.errors import LLMError, RateLimitError
from corral.executor.agent.loop import AgentLoop, AgentOutcome
from corral.executor.agent.tools import BashLimits, Toolbox
from corral.executor.runner import RunRequest, RunResult, RunStatus, open_envelope
from corral.executor.streamjson import EnvelopeWriter, new_message_id, new_session_id, trim
from corral.llm.client import ChatRequest, ChatResponse, Client, Message

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """How a local task with a working dir runs as an agent ([local_agent])."""

    mode: str = "auto"  # auto | agent | text
    actions: str = "auto"  # auto | tools | schema
    max_turns: int = 30
    bash: BashLimits = field(default_factory=BashLimits)
    sandbox_binary: str | None = None  # bubblewrap, when the sandbox is on and works here
    sandbox: str = "none"  # what `corral agents` says is in force
    sandbox_missing: str | None = None  # set when the sandbox is required and cannot run


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
        agent: AgentOptions | None = None,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        self.client = client
        # A price for the model makes its runs cost something (reported as an estimate).
        self.prices = dict(prices or {})
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.agent = agent or AgentOptions()

    def unavailable_reason(self) -> str | None:
        return None

    def details(self) -> dict[str, object]:
        """What `corral agents` shows of this runner beyond its slots."""
        return {"agent_mode": self.agent.mode, "actions": self.agent.actions,
                "sandbox": self.agent.sandbox}

    def _cost(self, model: str) -> float | None:
        """Free, unless [prices] names the model: then None, and the pool estimates it."""
        return None if model in self.prices else 0.0

    def _as_agent(self, request: RunRequest) -> bool:
        return self.agent.mode == "agent" or (
            self.agent.mode == "auto" and request.workdir is not None)

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
            if self._as_agent(request):
                return await self._run_agent(request, writer, session_id, started, model,
                                             timeout_s)
            turns = [m for asked, answered in request.history
                     for m in (Message("user", asked), Message("assistant", answered))]
            chat = ChatRequest(
                messages=[*turns, Message("user", request.prompt)],
                temperature=self.temperature, max_tokens=self.max_tokens,
            )
            response = await self._bounded(
                self.client.chat_stream(chat, writer.text_delta, model=model), "local model",
                writer, session_id, started, timeout_s)
            if isinstance(response, RunResult):
                return response
            return self._succeeded(writer, session_id, started, response, model)

    async def _bounded(self, work: Awaitable[T], what: str, writer: EnvelopeWriter,
                       session_id: str, started: float, timeout_s: float) -> T | RunResult:
        """``work`` within the run's timeout; how it failed, if it did, as the run's result."""
        try:
            async with asyncio.timeout(timeout_s):
                return await work
        except TimeoutError:
            return self._failed(writer, session_id, started, RunStatus.TIMED_OUT,
                                f"{what} timed out after {timeout_s:g}s")
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

    async def _run_agent(
        self, request: RunRequest, writer: EnvelopeWriter, session_id: str, started: float,
        model: str, timeout_s: float,
    ) -> RunResult:
        opts = self.agent
        if request.workdir is None:
            return self._failed(writer, session_id, started, RunStatus.FAILED,
                                "[local_agent] mode is agent, but the task has no working dir")
        if opts.sandbox_missing is not None:
            return self._failed(writer, session_id, started, RunStatus.FAILED,
                                f"[local_agent] sandbox is required, but {opts.sandbox_missing}")
        writer.event({"type": "system", "subtype": "local_agent", "actions": opts.actions,
                      "sandbox": opts.sandbox, "session_id": session_id})
        toolbox = Toolbox(request.workdir, limits=opts.bash, sandbox_binary=opts.sandbox_binary)
        price = self.prices.get(model)
        loop = AgentLoop(
            lambda chat, on_delta: self.client.chat_stream(chat, on_delta, model=model),
            toolbox, writer, session_id=session_id, model=model, max_turns=opts.max_turns,
            actions=opts.actions,
            base=ChatRequest([], temperature=self.temperature, max_tokens=self.max_tokens),
            cost=None if price is None else price.cost_usd, max_cost_usd=request.max_cost_usd)
        outcome = await self._bounded(loop.run(request.prompt, request.history), "local agent",
                                      writer, session_id, started, timeout_s)
        if isinstance(outcome, RunResult):
            return outcome
        return self._agent_result(writer, session_id, started, outcome, model)

    def _agent_result(self, writer: EnvelopeWriter, session_id: str, started: float,
                      outcome: AgentOutcome, model: str) -> RunResult:
        usage = {"input_tokens": max(outcome.tokens_in - outcome.cached_tokens, 0),
                 "cache_read_input_tokens": outcome.cached_tokens,
                 "output_tokens": outcome.tokens_out}
        failed = outcome.error is not None
        writer.result(is_error=failed, result=outcome.final_text, session_id=session_id,
                      duration_ms=_ms(started), usage=usage, total_cost_usd=0.0,
                      num_turns=outcome.turns, error=outcome.error, actions=outcome.actions)
        return RunResult(
            status=RunStatus.FAILED if failed else RunStatus.SUCCEEDED,
            summary=trim(outcome.final_text), cost_usd=self._cost(model),
            tokens_in=outcome.tokens_in,
            tokens_out=outcome.tokens_out, session_id=session_id, model=model,
            final_text=outcome.final_text, error=outcome.error, actions=outcome.actions,
            budget_reached=outcome.budget_reached)

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
            status=RunStatus.SUCCEEDED, summary=trim(response.content), cost_usd=self._cost(model),
            tokens_in=response.prompt_tokens, tokens_out=response.output_tokens,
            session_id=session_id, model=model or response.model, final_text=response.content,
            actions="text",
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
