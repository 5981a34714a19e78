"""``corral mcp``: the Model Context Protocol over stdio, so agents can hand work to corral.

A thin layer over the socket API, through the same client the CLI uses (``CORRAL_SOCKET`` is
honoured): every tool is one or two API calls, nothing is kept here. The tools' input schemas
are the API's own models (``server/schemas.py``); arguments are validated by them before any
call, and a bad argument, an unknown task or a daemon that is down comes back as a tool error
(``isError``) with the API's message — the server keeps answering. Built on the official SDK's
low-level server, which takes the schemas as they are.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral import __version__
from corral.render import render_log
from corral.server.client import ApiError, CorralClient, DaemonUnreachable
from corral.server.schemas import (
    MAX_WAIT_S,
    DiffQuery,
    ListQuery,
    ReplyCreate,
    TaskCreate,
    WaitQuery,
    validation_message,
)

LOG_LIMIT_CHARS = 100_000  # a log's end, for a model's context: the whole is in `corral logs`


class _TaskRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    task_id: int = Field(ge=1, description="The task's id.")


class _Reply(_TaskRef, ReplyCreate):
    """A follow-up in the task's conversation."""


class _Wait(_TaskRef, WaitQuery):
    """Block until the task is final or ``timeout_s`` runs out."""

    timeout_s: int = Field(default=60, ge=0, le=MAX_WAIT_S)


class _Diff(_TaskRef, DiffQuery):
    """The task's branch against where it started."""


class _Log(_TaskRef):
    execution: int | None = Field(default=None, ge=1, le=2**62,
                                  description="An execution's id (default: the latest).")
    raw: bool = Field(default=False, description="The envelope's JSON lines, not rendered text.")


class _List(ListQuery):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=200)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    model: type[BaseModel]
    call: Callable[[CorralClient, Any], Any]


def _query(args: BaseModel, *skip: str) -> dict[str, Any]:
    return {k: (str(v).lower() if isinstance(v, bool) else v)
            for k, v in args.model_dump(exclude={"task_id", *skip}).items() if v is not None}


def _log(client: CorralClient, args: _Log) -> str:
    lines = client.stream(f"/tasks/{args.task_id}/log",
                          query=_query(args, "raw"))
    if args.raw:
        text = b"".join(lines).decode("utf-8", "replace")
    else:
        out = io.StringIO()
        render_log(lines, out)
        text = out.getvalue()
    if len(text) > LOG_LIMIT_CHARS:
        text = f"[… the first {len(text) - LOG_LIMIT_CHARS} characters are left out]\n" \
               + text[-LOG_LIMIT_CHARS:]
    return text


TOOLS = [
    Tool("submit_task", "Queue a task for an AI coding agent; returns the task (its id, state)."
         " With a workdir in a git repository it runs in a worktree and branch of its own.",
         TaskCreate, lambda c, a: c.request("POST", "/tasks", a.model_dump(exclude_none=True))),
    Tool("list_tasks", "Tasks, newest first; filter by state, agent or time; page with before.",
         _List, lambda c, a: c.request("GET", "/tasks", query=_query(a))),
    Tool("get_task", "A task with its executions: state, summary, cost, tokens, changed files.",
         _TaskRef, lambda c, a: c.request("GET", f"/tasks/{a.task_id}")),
    Tool("get_log", "What the agent said and did in a task's execution (the latest by default).",
         _Log, _log),
    Tool("wait_task", "Wait until the task is final (or timeout_s passes); returns the task.",
         _Wait, lambda c, a: c.request("GET", f"/tasks/{a.task_id}/wait", query=_query(a))),
    Tool("cancel_task", "Cancel a queued or running task.",
         _TaskRef, lambda c, a: c.request("POST", f"/tasks/{a.task_id}/cancel")),
    Tool("reply_task", "A follow-up prompt in the same conversation and workspace.",
         _Reply, lambda c, a: c.request("POST", f"/tasks/{a.task_id}/reply",
                                        {"prompt": a.prompt})),
    Tool("task_diff", "The diff of the task's branch against its base (stat: the summary).",
         _Diff, lambda c, a: b"".join(c.stream(f"/tasks/{a.task_id}/diff",
                                               query=_query(a))).decode("utf-8", "replace")),
]
_BY_NAME = {tool.name: tool for tool in TOOLS}


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)],
                                is_error=True)


async def call_tool(client: CorralClient, name: str,
                    arguments: dict[str, Any] | None) -> types.CallToolResult:
    """One tool call; every failure is a tool error, never an exception out of the server."""
    tool = _BY_NAME.get(name)
    if tool is None:
        return _error(f"unknown tool {name!r}; the tools are {', '.join(_BY_NAME)}")
    try:
        args = tool.model.model_validate(arguments or {})
    except ValidationError as exc:
        return _error(f"bad arguments: {validation_message(exc)}")
    try:
        answer = await asyncio.to_thread(tool.call, client, args)
    except ApiError as exc:
        return _error(f"{exc.message} ({exc.code})")
    except DaemonUnreachable as exc:
        return _error(str(exc))
    if isinstance(answer, str):
        return types.CallToolResult(content=[types.TextContent(type="text", text=answer)])
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(answer, indent=1))],
        structured_content=answer)


def build_server(client: CorralClient) -> Server[Any]:
    async def list_tools(_ctx: Any, _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[
            types.Tool(name=t.name, description=t.description, input_schema=_schema(t.model))
            for t in TOOLS])

    async def on_call(_ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        return await call_tool(client, params.name, params.arguments)

    return Server("corral", version=__version__,
                  instructions="corral queues work for AI coding agents and runs it; submit a"
                  " task, wait for it, read its log and diff.",
                  on_list_tools=list_tools, on_call_tool=on_call)


async def serve_stdio(socket_path: str) -> None:
    """Serve MCP on stdin/stdout until the client closes it."""
    server = build_server(CorralClient(socket_path, timeout_s=MAX_WAIT_S + 30.0))
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())
