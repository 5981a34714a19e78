"""Classifier: decides which registered agent should run a task that did not name one.

It asks an LLM through ``llm.Client.chat`` *directly*, never through the pool: a classification
that waited for a worker slot could wait forever behind the very task it is classifying. With no
local model it asks the Gemini CLI as a subprocess, and when everything fails it falls back to
the configured default agent. Every decision carries the reason it was made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral.errors import LLMError
from corral.executor.proc import kill_group, resolve_binary
from corral.llm.client import ChatRequest, Client, Message

log = logging.getLogger(__name__)

AGENT_DESCRIPTIONS = {
    "claude": "Claude Code: best for changing code across files, refactoring, debugging and "
    "running tools in a repository. Costs money.",
    "gemini": "Gemini CLI: good for reading large code bases, research, explanations and "
    "summaries over many files. Costs money.",
    "codex": "Codex CLI: changes code, runs commands and tests in a repository; strong at "
    "focused implementation work. Costs money.",
    "local": "A local model: free. Answers in text without a working dir; with one it is a "
    "coding agent that reads, edits and runs commands in the task's workspace. Best for small, "
    "well-described changes.",
}
_MODEL_HINTS = {"claude": ("claude", "sonnet", "opus", "haiku"), "gemini": ("gemini",),
                "codex": ("gpt", "codex", "o3", "o4")}
_REASON_CHARS = 300


@dataclass(frozen=True, slots=True)
class Decision:
    agent: str
    model: str | None
    reason: str


class Classifier:
    """Picks an agent among ``registered`` for a prompt, within ``timeout_s``."""

    def __init__(
        self,
        *,
        registered: Sequence[str],
        default_agent: str,
        timeout_s: float = 30.0,
        enabled: bool = True,
        client: Client | None = None,
        gemini_binary: str | None = None,
        gemini_model: str | None = None,
        gemini_env: Mapping[str, str] | None = None,
        descriptions: Mapping[str, str] | None = None,
    ) -> None:
        if not registered:
            raise ValueError("the classifier needs at least one registered agent")
        self.registered = list(registered)
        # What the model is told about each agent: the built-in texts, then those of [agents].
        self.descriptions = {**AGENT_DESCRIPTIONS, **(descriptions or {})}
        self.default_agent = default_agent if default_agent in registered else self.registered[0]
        self.timeout_s = timeout_s
        self.enabled = enabled
        self.client = client
        self.gemini_binary = gemini_binary
        self.gemini_model = gemini_model
        self.gemini_env = dict(os.environ if gemini_env is None else gemini_env)

    def _fallback(self, why: str) -> Decision:
        return Decision(self.default_agent, None, f"default agent {self.default_agent}: {why}")

    async def classify(self, prompt: str) -> Decision:
        if not self.enabled:
            return self._fallback("classifier disabled")
        if len(self.registered) == 1:
            return Decision(self.registered[0], None, "the only registered agent")
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.client is not None:
                    raw = await self._ask_llm(prompt)
                    source = "local model"
                elif self.gemini_binary is not None:
                    raw = await self._ask_gemini(prompt)
                    source = "gemini CLI"
                else:
                    return self._fallback("no classifier model configured")
        except TimeoutError:
            return self._fallback(f"classifier timed out after {self.timeout_s:g}s")
        except (LLMError, OSError, ValueError) as exc:
            return self._fallback(f"classifier failed: {str(exc)[:_REASON_CHARS]}")
        return self._validate(raw, source)

    def _messages(self, prompt: str) -> list[Message]:
        agents = "\n".join(f"- {a}: {self.descriptions.get(a) or a}" for a in self.registered)
        system = (
            "You route coding tasks to agents. Agents:\n" + agents + "\n"
            'Answer only with JSON: {"agent_type": one of the agent names, "model": "" or a '
            'model name, "reason": one short sentence}.'
        )
        return [Message("system", system), Message("user", f"Task:\n{prompt[:4000]}")]

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "agent_type": {"type": "string", "enum": self.registered},
                "model": {"type": "string"},
                "reason": {"type": "string"},
            },
            "required": ["agent_type", "model", "reason"],
            "additionalProperties": False,
        }

    async def _ask_llm(self, prompt: str) -> str:
        assert self.client is not None
        request = ChatRequest(self._messages(prompt), json_schema=self.schema(),
                              temperature=0.0, max_tokens=200)
        try:
            return (await self.client.chat(request)).content
        except LLMError as exc:
            if exc.status not in (400, 422):
                raise
        # Some servers (LM Studio and others) reject json_schema; json_object is widely served.
        request = ChatRequest(self._messages(prompt), response_json=True,
                              temperature=0.0, max_tokens=200)
        return (await self.client.chat(request)).content

    async def _ask_gemini(self, prompt: str) -> str:
        assert self.gemini_binary is not None
        binary = resolve_binary(self.gemini_binary, self.gemini_env)
        if binary is None:
            raise OSError(f"{self.gemini_binary} not found on PATH")
        text = "\n".join(m.content or "" for m in self._messages(prompt))
        # The question goes on stdin, as the runner sends prompts: no argv length limit, and
        # never visible in `ps`. The CLI puts stdin before -p's (empty) value.
        argv = [binary, "-p", "", "--output-format", "json", "--skip-trust"]
        if self.gemini_model:
            argv += ["-m", self.gemini_model]
        proc = await asyncio.create_subprocess_exec(
            *argv, env=self.gemini_env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            out, _ = await proc.communicate(text.encode("utf-8", "surrogateescape"))
        finally:
            if proc.returncode is None:  # timed out: end the CLI and everything it started
                kill_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        if proc.returncode != 0:
            raise OSError(f"gemini exited with code {proc.returncode}")
        data = json.loads(out.decode("utf-8", "replace"))
        response = data.get("response") if isinstance(data, dict) else None
        if not isinstance(response, str):
            raise ValueError("gemini's JSON output has no response")
        return response

    def _validate(self, raw: str, source: str) -> Decision:
        answer = _first_json_object(raw)
        if answer is None:
            return self._fallback(f"{source} answered something that is not JSON: {raw[:80]!r}")
        agent = answer.get("agent_type")
        if not isinstance(agent, str) or agent not in self.registered:
            return self._fallback(f"{source} chose {agent!r}, which is not a registered agent")
        reason = answer.get("reason")
        reason_text = reason.strip()[:_REASON_CHARS] if isinstance(reason, str) else ""
        model = answer.get("model")
        hints = _MODEL_HINTS.get(agent, ())
        chosen_model = (
            model.strip() if isinstance(model, str) and any(h in model.lower() for h in hints)
            else None
        )
        return Decision(agent, chosen_model, f"{source}: {reason_text or 'no reason given'}")


def _first_json_object(text: str) -> dict[str, Any] | None:
    text = text.strip()
    start = text.find("{")
    while start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None
