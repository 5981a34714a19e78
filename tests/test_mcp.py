"""``corral mcp`` with the SDK's own stdio client, and with the real claude CLI as its client."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from corral.config import LocalModelSettings, Settings
from tests import peers
from tests.conftest import StartDaemon
from tests.fakes.anthropic import FakeAnthropic, ToolUse
from tests.fakes.base import Reply
from tests.fakes.openai import FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
MakeSettings = Callable[..., Settings]
TOOLS = {"submit_task", "list_tasks", "get_task", "get_log", "wait_task", "cancel_task",
         "reply_task", "task_diff"}


def mcp_server(socket_path: Path) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "corral.cli", "mcp"],
                                 env={"CORRAL_SOCKET": str(socket_path)})


def text(result: Any) -> str:
    return "".join(block.text for block in result.content)


async def test_tools_submit_wait_log_and_errors_that_leave_the_server_answering(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: StartDaemon,
) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="Bonjour from the local model"))
    settings = make_settings(local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"))
    _, api = await daemon(settings)
    async with Client(mcp_server(settings.daemon.socket_path)) as client:
        listed = await client.list_tools()
        assert {t.name for t in listed.tools} == TOOLS
        submit = next(t for t in listed.tools if t.name == "submit_task")
        assert submit.input_schema["required"] == ["prompt"]  # the API's own model
        assert "after" in submit.input_schema["properties"]
        submitted = await client.call_tool("submit_task", {"prompt": "say hello",
                                                           "agent": "local"})
        assert not submitted.is_error, text(submitted)
        task_id = submitted.structured_content["id"]
        done = await client.call_tool("wait_task", {"task_id": task_id, "timeout_s": 30})
        assert done.structured_content["state"] == "succeeded", text(done)
        log = await client.call_tool("get_log", {"task_id": task_id})
        assert not log.is_error and "Bonjour from the local model" in text(log)
        raw = await client.call_tool("get_log", {"task_id": task_id, "raw": True})
        assert json.loads(text(raw).splitlines()[-1])["type"] == "result"
        listed_tasks = await client.call_tool("list_tasks", {"state": "succeeded"})
        assert [t["id"] for t in listed_tasks.structured_content["tasks"]] == [task_id]
        # Bad arguments, an unknown agent, a missing task: tool errors, and it goes on.
        for name, arguments, said in (
            ("submit_task", {}, "prompt"),
            ("submit_task", {"prompt": "x", "agent": "robot"}, "unknown agent"),
            ("get_task", {"task_id": "seven"}, "task_id"),
            ("get_task", {"task_id": 999}, "does not exist"),
            ("cancel_task", {"task_id": task_id}, "already succeeded"),
            ("no_such_tool", {}, "unknown tool"),
        ):
            result = await client.call_tool(name, arguments)
            assert result.is_error and said in text(result), (name, text(result))
        again = await client.call_tool("get_task", {"task_id": task_id})
        assert not again.is_error and again.structured_content["id"] == task_id
    await api.close()


async def test_a_daemon_that_is_down_is_a_tool_error(tmp_path: Path) -> None:
    async with Client(mcp_server(tmp_path / "nobody.sock")) as client:
        result = await client.call_tool("list_tasks", {})
        assert result.is_error and "nobody.sock" in text(result)


@pytest.mark.real
async def test_the_claude_cli_submits_a_task_through_corral_mcp(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake,
    fake_anthropic: FakeAnthropic, claude_env: dict[str, str], daemon: StartDaemon,
) -> None:
    fake = await fake_openai()
    settings = make_settings(local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"))
    _, api = await daemon(settings)
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"corral": {
        "command": sys.executable, "args": ["-m", "corral.cli", "mcp"],
        "env": {"CORRAL_SOCKET": str(settings.daemon.socket_path)}}}}))
    talk = fake_anthropic.converse(
        "HAND-OFF", ToolUse("mcp__corral__submit_task",
                            lambda _cwd: {"prompt": "write the release notes", "agent": "local"}),
        Reply(text="queued it"))
    proc = await asyncio.create_subprocess_exec(
        str(peers.claude_bin()), "-p", "HAND-OFF: give this to corral", "--output-format",
        "stream-json", "--verbose", "--mcp-config", str(config),
        "--allowedTools", "mcp__corral__submit_task", cwd=tmp_path,
        env={**claude_env, "PATH": os.environ["PATH"]},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    _, listed = await api.call("GET", "/tasks")
    assert [t["prompt"] for t in listed["tasks"]] == ["write the release notes"]
    task_id = listed["tasks"][0]["id"]
    # The CLI got the tool's answer, the new task's id, and gave it to the model.
    results = [block for block in talk.requests[-1]["messages"][-1]["content"]
               if block["type"] == "tool_result"]
    assert json.loads(results[0]["content"])["id"] == task_id, results
    assert b'"type":"result"' in out
