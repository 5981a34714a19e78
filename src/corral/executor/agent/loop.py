"""The local agent's loop: ask the model, run the tools it calls, send the results, repeat.

Each turn streams the model's reply (text deltas go to the envelope as they come), then runs
the calls in order and logs the turn exactly as ``claude -p --output-format stream-json
--verbose`` logs tool use: an ``assistant`` event with ``text`` and ``tool_use`` blocks, then a
``user`` event with one ``tool_result`` per call. It ends when the model answers without a
call, after ``max_turns``, after three malformed calls in a row, or when the task's timeout or
a cancel stops it (the runner's concern).

Two ways to ask for actions:

* ``tools`` — the server's native tool calling (OpenAI ``tools``), results as ``tool`` messages;
* ``schema`` — one action per turn as JSON constrained by a ``response_format`` schema that is
  the union of the tools' inputs and ``done``: llama.cpp turns it into a grammar, so even a
  135M model's every action is well formed.

``auto`` starts with ``tools`` and changes to ``schema`` for good when the server refuses tools
(HTTP 400 or 500 to the first request) or the model answers the first ``tools`` turn in prose.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from corral.errors import LLMError
from corral.executor.agent.tools import Toolbox, ToolOutcome, input_schemas, openai_tools
from corral.executor.streamjson import EnvelopeWriter, new_message_id
from corral.llm.client import ChatRequest, ChatResponse, Message
from corral.llm.toolcalls import ToolCall

MAX_MALFORMED_IN_A_ROW = 3
_REFUSED_TOOLS_STATUSES = (400, 500)  # llama.cpp without --jinja answers 500, others 400

SYSTEM_PROMPT = (
    "You are a coding agent. You work in the directory {cwd}, on the user's task, with tools:"
    " Read, Write, Edit, Bash, Glob and Grep. Paths are relative to that directory. Look before"
    " you change things, make the change, check it, and when the task is done answer with a"
    " short summary of what you did{done}."
)

Chat = Callable[[ChatRequest, Callable[[str], object]], Awaitable[ChatResponse]]


@dataclass(slots=True)
class Call:
    """One requested action: its id, tool, input (None when it was not a JSON object)."""

    id: str
    name: str
    input: dict[str, Any] | None
    problem: str | None = None


@dataclass(slots=True)
class AgentOutcome:
    final_text: str
    turns: int
    tokens_in: int = 0
    tokens_out: int = 0
    cached_tokens: int = 0
    error: str | None = None
    actions: str = "tools"
    notes: list[str] = field(default_factory=list)
    budget_reached: bool = False


class _ToolsWay:
    name = "tools"

    def request(self, messages: list[Message], base: ChatRequest) -> ChatRequest:
        return ChatRequest(messages, temperature=base.temperature, max_tokens=base.max_tokens,
                           tools=openai_tools())

    def calls(self, response: ChatResponse) -> tuple[list[Call], str | None]:
        return [_call(c) for c in response.tool_calls], None

    def assistant(self, response: ChatResponse, calls: list[Call]) -> Message:
        return Message("assistant", response.content or None, tool_calls=[
            ToolCall(c.id, c.name, json.dumps(c.input) if c.input is not None else "")
            for c in calls])

    def results(self, calls: list[Call], outcomes: list[ToolOutcome]) -> list[Message]:
        return [Message("tool", o.content, tool_call_id=c.id)
                for c, o in zip(calls, outcomes, strict=True)]


class _SchemaWay:
    name = "schema"

    def __init__(self) -> None:
        self.schema = action_schema()
        self._n = 0

    def request(self, messages: list[Message], base: ChatRequest) -> ChatRequest:
        return ChatRequest(messages, temperature=base.temperature, max_tokens=base.max_tokens,
                           json_schema=self.schema)

    def calls(self, response: ChatResponse) -> tuple[list[Call], str | None]:
        """One action from the reply's JSON; ``("done", answer)`` ends the run."""
        self._n += 1
        call_id = f"toolu_schema_{self._n}"
        try:
            action = json.loads(response.content)
        except ValueError:
            return [Call(call_id, "?", None, "the reply is not JSON: answer with one action"
                         ' as {"tool": …, "input": {…}}')], None
        if not isinstance(action, dict) or not isinstance(action.get("tool"), str):
            return [Call(call_id, "?", None, 'an action is {"tool": name, "input": {…}}')], None
        tool, given = action["tool"], action.get("input")
        if tool == "done":
            answer = given.get("answer") if isinstance(given, dict) else None
            return [], str(answer) if answer is not None else ""
        if not isinstance(given, dict):
            return [Call(call_id, tool, None, "the action's input must be an object")], None
        return [Call(call_id, tool, given)], None

    def assistant(self, response: ChatResponse, calls: list[Call]) -> Message:
        return Message("assistant", response.content)

    def results(self, calls: list[Call], outcomes: list[ToolOutcome]) -> list[Message]:
        return [Message("user", f"Result of {c.name}{' (an error)' if o.is_error else ''}:\n"
                        f"{o.content}") for c, o in zip(calls, outcomes, strict=True)]


def action_schema() -> dict[str, Any]:
    """One action: a tool and its input, or ``done`` with the final answer."""
    options = [{"type": "object", "properties": {"tool": {"const": name}, "input": schema},
                "required": ["tool", "input"]} for name, schema in input_schemas().items()]
    options.append({"type": "object", "properties": {
        "tool": {"const": "done"}, "input": {"type": "object", "properties": {
            "answer": {"type": "string"}}, "required": ["answer"]}},
        "required": ["tool", "input"]})
    return {"anyOf": options}


def _call(call: ToolCall) -> Call:
    try:
        parsed = json.loads(call.arguments) if call.arguments.strip() else {}
    except ValueError:
        return Call(call.id, call.name, None,
                    f"the arguments of {call.name or 'the call'} are not JSON: "
                    f"{call.arguments[:200]!r}")
    if not isinstance(parsed, dict):
        return Call(call.id, call.name, None, "the arguments must be a JSON object")
    return Call(call.id, call.name, parsed)


class AgentLoop:
    """One run of the local agent, logging into ``writer``."""

    def __init__(self, chat: Chat, toolbox: Toolbox, writer: EnvelopeWriter, *,
                 session_id: str, model: str | None, max_turns: int = 30,
                 actions: str = "auto", base: ChatRequest | None = None,
                 cost: Callable[[int, int, int], float] | None = None,
                 max_cost_usd: float | None = None) -> None:
        self.cost = cost
        self.max_cost_usd = max_cost_usd
        self.chat = chat
        self.toolbox = toolbox
        self.w = writer
        self.session_id = session_id
        self.model = model
        self.max_turns = max_turns
        self.auto = actions == "auto"
        self.way: _ToolsWay | _SchemaWay = _SchemaWay() if actions == "schema" else _ToolsWay()
        self.base = base or ChatRequest([])

    def _system(self) -> Message:
        done = (' (in schema mode: the action {"tool": "done", "input": {"answer": …}})'
                if self.way.name == "schema" else "")
        return Message("system", SYSTEM_PROMPT.format(cwd=self.toolbox.workspace, done=done))

    async def run(self, prompt: str, history: list[tuple[str, str]]) -> AgentOutcome:
        turns = [m for asked, answered in history
                 for m in (Message("user", asked), Message("assistant", answered))]
        messages = [self._system(), *turns, Message("user", prompt)]
        out = AgentOutcome("", 0, actions=self.way.name)
        malformed = 0
        while out.turns < self.max_turns:
            response = await self._ask(messages, out)
            if response is None:  # changed to schema mode: ask again from the start
                messages = [self._system(), *turns, Message("user", prompt)]
                continue
            out.turns += 1
            if self._over_budget(out):
                self._log_turn(response, [], response.content)
                return out
            calls, final = self.way.calls(response)
            if not calls and self._prose_first_turn(out, response, final):
                messages = [self._system(), *turns, Message("user", prompt)]
                continue
            out.final_text = final if final is not None else response.content
            self._log_turn(response, calls, out.final_text if not calls else "")
            if not calls:
                return out
            outcomes = [await self._run_call(c) for c in calls]
            self._log_results(calls, outcomes)
            messages += [self.way.assistant(response, calls), *self.way.results(calls, outcomes)]
            # Only calls that were malformed, every one of a turn, count towards giving up.
            bad = sum(1 for o in outcomes if o.malformed)
            malformed = malformed + bad if bad == len(calls) else 0
            if response.finish_reason == "length":
                messages.append(Message("user", "Your last reply was cut off at the token limit"
                                        " (finish_reason: length). Answer more briefly."))
            if malformed >= MAX_MALFORMED_IN_A_ROW:
                out.error = (f"the model made {malformed} malformed tool calls in a row;"
                             f" the last: {outcomes[-1].content[:300]}")
                return out
        out.error = f"the agent reached max_turns ({self.max_turns}) without finishing"
        return out

    def _over_budget(self, out: AgentOutcome) -> bool:
        if self.cost is None or self.max_cost_usd is None:
            return False
        spent = self.cost(out.tokens_in, out.tokens_out, out.cached_tokens)
        if spent < self.max_cost_usd:
            return False
        out.error = f"budget of ${self.max_cost_usd:g} reached (estimated ${spent:.4f})"
        out.budget_reached = True
        return True

    async def _ask(self, messages: list[Message], out: AgentOutcome) -> ChatResponse | None:
        request = self.way.request(messages, self.base)
        on_delta = self.w.text_delta if self.way.name == "tools" else _ignore
        try:
            response = await self.chat(request, on_delta)
        except LLMError as exc:
            if (self.auto and self.way.name == "tools" and out.turns == 0
                    and exc.status in _REFUSED_TOOLS_STATUSES):
                self._to_schema(out, f"the server refused tools (HTTP {exc.status})")
                return None
            raise
        out.tokens_in += response.prompt_tokens
        out.tokens_out += response.output_tokens
        out.cached_tokens += response.cached_tokens
        return response

    def _prose_first_turn(self, out: AgentOutcome, response: ChatResponse,
                          final: str | None) -> bool:
        if not (self.auto and self.way.name == "tools" and out.turns == 1 and final is None):
            return False
        self._log_turn(response, [], response.content)  # what the model said stays in the log
        self._to_schema(out, "the model answered its first tools turn in prose")
        out.turns = 0
        return True

    def _to_schema(self, out: AgentOutcome, why: str) -> None:
        self.way = _SchemaWay()
        out.actions = "schema"
        out.notes.append(f"actions: schema ({why})")
        self.w.event({"type": "system", "subtype": "local_agent", "actions": "schema",
                      "reason": why, "session_id": self.session_id})

    async def _run_call(self, call: Call) -> ToolOutcome:
        if call.problem is not None:
            return ToolOutcome(call.problem, is_error=True, malformed=True)
        assert call.input is not None
        return await self.toolbox.run(call.name, call.input)

    def _log_turn(self, response: ChatResponse, calls: list[Call], answer: str = "") -> None:
        """The turn as claude logs one: its text (in schema mode, the final answer), its calls."""
        content: list[dict[str, Any]] = []
        text = response.content if self.way.name == "tools" else answer
        if text:
            content.append({"type": "text", "text": text})
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.input or {}}
                    for c in calls]
        usage = {"input_tokens": max(response.prompt_tokens - response.cached_tokens, 0),
                 "cache_read_input_tokens": response.cached_tokens,
                 "output_tokens": response.output_tokens}
        self.w.assistant(message_id=new_message_id(), model=self.model or response.model,
                         content=content, usage=usage, session_id=self.session_id)

    def _log_results(self, calls: list[Call], outcomes: list[ToolOutcome]) -> None:
        self.w.event({"type": "user", "session_id": self.session_id, "message": {
            "role": "user", "content": [
                {"type": "tool_result", "tool_use_id": c.id, "content": o.content,
                 "is_error": o.is_error}
                for c, o in zip(calls, outcomes, strict=True)]}})


def _ignore(_text: str) -> None:
    return None
