"""The local model as a coding agent: scripted servers in each dialect, and real llama.cpp."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.config import LocalAgentSettings, LocalModelSettings, Settings
from corral.executor.agent.tools import BashLimits, Toolbox
from corral.executor.local import AgentOptions, LocalRunner
from corral.executor.runner import RunRequest, RunResult, RunStatus
from corral.executor.streamjson import read_events
from corral.host import sandbox
from corral.llm.client import Client
from tests.conftest import StartDaemon, until
from tests.fakes.base import Reply, Status
from tests.fakes.openai import FakeOpenAI, ToolCalls
from tests.gitrepo import git, make_repo

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
BWRAP = sandbox.find()


def action(tool: str, **given: Any) -> Reply:
    """A schema-mode turn: one JSON action as the reply's text."""
    return Reply(text=json.dumps({"tool": tool, "input": given}), chunks=1)


def write_run_edit(dialect: str) -> list[Any]:
    return [
        ToolCalls([("Write", {"file_path": "notes.txt", "content": "alpha\n"})], dialect),
        ToolCalls([("Bash", {"command": "cat notes.txt && echo ran"})], dialect),
        ToolCalls([("Edit", {"file_path": "notes.txt", "old_string": "alpha",
                             "new_string": "beta"})], dialect),
        Reply(text="Done: notes.txt says beta."),
    ]


SCHEMA_WRITE_RUN_EDIT = [
    action("Write", file_path="notes.txt", content="alpha\n"),
    action("Bash", command="cat notes.txt && echo ran"),
    action("Edit", file_path="notes.txt", old_string="alpha", new_string="beta"),
    action("done", answer="Done: notes.txt says beta."),
]


async def run_agent(fake: FakeOpenAI, workspace: Path, *, actions: str = "tools",
                    timeout_s: float = 60, **options: Any) -> tuple[RunResult, list[Any]]:
    exec_dir = workspace.parent / "exec"
    async with Client(fake.endpoint, "m") as client:
        runner = LocalRunner(client, agent=AgentOptions(mode="agent", actions=actions,
                                                        **options))
        result = await runner.run(RunRequest(prompt="make notes", exec_dir=exec_dir,
                                             workdir=workspace, timeout_s=timeout_s))
    return result, read_events(exec_dir / "stdout.log")


def tool_results(events: list[Any]) -> list[dict[str, Any]]:
    return [block for e in events if e["type"] == "user"
            for block in e["message"]["content"]]


def tool_uses(events: list[Any]) -> list[dict[str, Any]]:
    return [block for e in events if e["type"] == "assistant"
            for block in e["message"]["content"] if block["type"] == "tool_use"]


@pytest.mark.parametrize("dialect", ["fragments", "whole", "index0", "empty_ids"])
async def test_write_run_edit_finish_in_each_dialect(
    tmp_path: Path, fake_openai: MakeFake, dialect: str
) -> None:
    fake = await fake_openai()
    fake.push(*write_run_edit(dialect))
    ws = tmp_path / "ws"
    ws.mkdir()
    result, events = await run_agent(fake, ws)
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert (ws / "notes.txt").read_text() == "beta\n"
    assert [u["name"] for u in tool_uses(events)] == ["Write", "Bash", "Edit"]
    outputs = tool_results(events)
    assert [r["is_error"] for r in outputs] == [False, False, False]
    assert "alpha" in outputs[1]["content"] and "ran" in outputs[1]["content"]
    assert all(r["tool_use_id"] == u["id"] and u["id"]
               for r, u in zip(outputs, tool_uses(events), strict=True))
    last = events[-1]
    assert last["type"] == "result" and not last["is_error"] and last["num_turns"] == 4
    assert result.tokens_in == 50 * 3 + 12 and result.tokens_out == 10 * 3 + 7
    # Each result went back as a tool message answering its call.
    sent = fake.requests[1]["body"]["messages"]
    assert sent[-2]["tool_calls"][0]["function"]["name"] == "Write"
    assert sent[-1]["role"] == "tool"
    assert sent[-1]["tool_call_id"] == sent[-2]["tool_calls"][0]["id"]
    assert fake.requests[0]["body"]["tools"][0]["function"]["name"] == "Read"


async def test_the_same_task_in_schema_mode(tmp_path: Path, fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(*SCHEMA_WRITE_RUN_EDIT)
    ws = tmp_path / "ws"
    ws.mkdir()
    result, events = await run_agent(fake, ws, actions="schema")
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert result.summary == "Done: notes.txt says beta." and result.actions == "schema"
    assert (ws / "notes.txt").read_text() == "beta\n"
    assert [u["name"] for u in tool_uses(events)] == ["Write", "Bash", "Edit"]
    body = fake.requests[0]["body"]
    assert body["response_format"]["type"] == "json_schema" and "tools" not in body
    names = {o["properties"]["tool"]["const"]
             for o in body["response_format"]["json_schema"]["schema"]["anyOf"]}
    assert names == {"Read", "Write", "Edit", "Bash", "Glob", "Grep", "done"}


@pytest.mark.parametrize("path", ["../outside.txt", "ABSOLUTE", "link/inside.txt"])
async def test_escapes_are_refused_and_nothing_outside_changes(
    tmp_path: Path, fake_openai: MakeFake, path: str
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (ws / "link").symlink_to(outside)
    target = str(tmp_path / "outside.txt") if path == "ABSOLUTE" else path
    fake = await fake_openai()
    fake.push(ToolCalls([("Write", {"file_path": target, "content": "escaped"})]),
              ToolCalls([("Read", {"file_path": "/etc/hostname"})]),
              Reply(text="ok"))
    result, events = await run_agent(fake, ws)
    assert result.status == RunStatus.SUCCEEDED
    refused = tool_results(events)
    assert all(r["is_error"] and "outside the workspace" in r["content"] for r in refused)
    assert not (tmp_path / "outside.txt").exists() and list(outside.iterdir()) == []


async def test_malformed_calls_are_answered_and_three_in_a_row_fail(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    fake = await fake_openai()
    fake.push(ToolCalls([("Write", '{"file_path": "a.txt", "content": ')]),  # not JSON
              ToolCalls([("Teleport", {"where": "moon"})]),  # no such tool
              ToolCalls([("Write", {"content": "no path"})]),  # a missing field
              Reply(text="never reached"))
    result, events = await run_agent(fake, ws)
    assert result.status == RunStatus.FAILED
    assert result.error and "3 malformed tool calls in a row" in result.error
    answers = [r["content"] for r in tool_results(events)]
    assert "not JSON" in answers[0]
    assert "unknown tool 'Teleport'" in answers[1]
    assert "file_path" in answers[2] and "Field required" in answers[2]
    assert events[-1]["type"] == "result" and events[-1]["is_error"]


async def test_a_malformed_call_then_a_good_one_goes_on(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    fake = await fake_openai()
    fake.push(ToolCalls([("Nope", {})]),
              ToolCalls([("Write", {"file_path": "a.txt", "content": "a"})]),
              Reply(text="fine"))
    result, _ = await run_agent(fake, ws)
    assert result.status == RunStatus.SUCCEEDED and (ws / "a.txt").read_text() == "a"


async def test_a_turn_cut_by_the_token_limit_is_told_so(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    fake = await fake_openai()
    fake.push(ToolCalls([("Write", '{"file_path": "a.txt", "con')], finish_reason="length"),
              Reply(text="shorter now"))
    result, _ = await run_agent(fake, ws)
    assert result.status == RunStatus.SUCCEEDED
    told = fake.requests[1]["body"]["messages"][-1]
    assert told["role"] == "user" and "finish_reason: length" in told["content"]


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


async def test_a_command_past_its_timeout_is_killed_with_its_children_and_the_loop_goes_on(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    marker = f"corral-sleep-{os.getpid()}"
    fake = await fake_openai()
    fake.push(ToolCalls([("Bash", {"command": f"bash -c 'sleep 60; : {marker}' & sleep 60; :"
                                   f" {marker}", "timeout": 500})]),
              ToolCalls([("Bash", {"command": "echo still here"})]),
              Reply(text="done"))
    result, events = await run_agent(fake, ws, bash=BashLimits(kill_grace_s=1))
    assert result.status == RunStatus.SUCCEEDED
    first, second = tool_results(events)
    assert first["is_error"] and "past its timeout of 0.5s" in first["content"]
    assert "still here" in second["content"]
    assert processes_with(marker) == []


async def test_a_cancel_during_a_command_ends_its_group(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    marker = f"corral-cancel-{os.getpid()}"
    fake = await fake_openai()
    fake.push(ToolCalls([("Bash", {"command": f"sleep 120 & sleep 120; : {marker}"})]))
    run = asyncio.create_task(run_agent(fake, ws))

    async def started() -> bool:
        return bool(processes_with(marker))

    await until(started)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    async def gone() -> bool:
        return processes_with(marker) == [] and processes_with("sleep 120") == []

    await until(gone, timeout_s=10)


async def test_fifty_megabytes_of_output_keep_head_and_tail_in_bounded_memory(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    fake = await fake_openai()
    command = "echo FIRST; head -c 52428800 /dev/zero | tr '\\0' x; echo; echo LAST"
    fake.push(ToolCalls([("Bash", {"command": command})]), Reply(text="ok"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, events = await run_agent(fake, ws, bash=BashLimits(output_limit_chars=2000))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.status == RunStatus.SUCCEEDED
    output = tool_results(events)[0]["content"]
    assert output.startswith("FIRST") and output.rstrip().endswith("LAST")
    assert "bytes of output left out" in output and len(output) < 3000
    assert grown_mb < 40


async def test_a_server_that_refuses_tools_gets_schema_actions(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    fake = await fake_openai()
    fake.push(Status(500, body={"error": {"code": 500, "type": "server_error",
                                          "message": "tools param requires --jinja flag"}}),
              *SCHEMA_WRITE_RUN_EDIT)
    result, events = await run_agent(fake, ws, actions="auto")
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert result.actions == "schema" and (ws / "notes.txt").read_text() == "beta\n"
    switched = [e for e in events if e.get("subtype") == "local_agent" and "reason" in e]
    assert switched and "refused tools (HTTP 500)" in switched[0]["reason"]
    assert events[-1]["actions"] == "schema"


async def test_a_model_answering_tools_in_prose_gets_schema_actions(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    fake = await fake_openai()
    fake.push(Reply(text="I would write the file, if I could."), *SCHEMA_WRITE_RUN_EDIT)
    result, _ = await run_agent(fake, ws, actions="auto")
    assert result.status == RunStatus.SUCCEEDED and result.actions == "schema"
    assert "tools" in fake.requests[0]["body"]
    assert "tools" not in fake.requests[1]["body"]


async def test_an_agent_task_in_a_repository_ends_in_a_commit_of_its_changes(
    tmp_path: Path, fake_openai: MakeFake, make_settings: Callable[..., Settings],
    daemon: StartDaemon,
) -> None:
    fake = await fake_openai()
    fake.push(*write_run_edit("fragments"))
    repo = make_repo(tmp_path / "repo")
    _, api = await daemon(make_settings(local_model=LocalModelSettings(endpoint=fake.endpoint,
                                                                    model="m")))
    done = await api.wait((await api.submit(prompt="make notes", agent="local",
                                            workdir=str(repo)))["id"])
    assert done["state"] == "succeeded", done["error"]
    execution = done["executions"][0]
    assert execution["actions"] == "tools" and execution["tokens_in"] > 0
    assert [f["path"] for f in execution["files"]] == ["notes.txt"]
    assert git(repo, "show", f"{done['workspace']['branch']}:notes.txt") == "beta\n"
    assert not (repo / "notes.txt").exists()  # in the task's worktree only
    _, agents = await api.call("GET", "/agents")
    local = next(a for a in agents["agents"] if a["name"] == "local")
    assert local["agent_mode"] == "auto"
    assert local["sandbox"] == "bwrap" if BWRAP else local["sandbox"].startswith("none")


async def test_without_a_working_dir_the_local_model_answers_in_text(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="just words"))
    async with Client(fake.endpoint, "m") as client:
        result = await LocalRunner(client).run(RunRequest(prompt="hi", exec_dir=tmp_path / "e"))
    assert result.status == RunStatus.SUCCEEDED and result.actions == "text"
    assert "tools" not in fake.requests[0]["body"]


# -- the sandbox ------------------------------------------------------------------------------

needs_bwrap = pytest.mark.skipif(BWRAP is None and os.environ.get("CI") != "true",
                                 reason="bubblewrap is not installed (scripts/setup.sh does)")


@needs_bwrap
async def test_in_the_sandbox_writes_outside_and_the_network_fail(tmp_path: Path) -> None:
    assert BWRAP is not None, "bubblewrap must be installed in CI"
    ws = tmp_path / "ws"
    ws.mkdir()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        box = Toolbox(ws, sandbox_binary=BWRAP)
        escape = Path(f"/var/tmp/corral-escape-{os.getpid()}")  # on the real disk
        inside = await box.run("Bash", {"command": "echo kept > mine.txt && cat mine.txt"})
        outside = await box.run("Bash", {"command": f"echo no > {escape}"})
        in_tmp = await box.run("Bash", {"command": f"echo no > {tmp_path}/escape.txt"})
        net = await box.run("Bash", {"command": f"exec 3<>/dev/tcp/127.0.0.1/{port}"})
    assert not inside.is_error and (ws / "mine.txt").read_text() == "kept\n"
    assert outside.is_error and "Read-only file system" in outside.content
    assert not escape.exists()
    # /tmp in the sandbox is its own and empty: a write there never reaches the host's.
    assert not in_tmp.is_error and not (tmp_path / "escape.txt").exists()
    assert net.is_error


async def test_a_required_sandbox_that_cannot_run_fails_the_task_clearly(
    tmp_path: Path, fake_openai: MakeFake, make_settings: Callable[..., Settings],
    daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sandbox, "BINARY", "bwrap-that-is-not-installed")
    fake = await fake_openai()
    ws = tmp_path / "ws"
    ws.mkdir()
    _, api = await daemon(make_settings(
        local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"),
        local_agent=LocalAgentSettings(sandbox="required")))
    done = await api.wait((await api.submit(prompt="x", agent="local", workdir=str(ws)))["id"])
    assert done["state"] == "failed"
    assert "sandbox is required, but bwrap-that-is-not-installed is not installed" in done["error"]
    assert fake.requests == []  # the model was never asked
    _, agents = await api.call("GET", "/agents")
    local = next(a for a in agents["agents"] if a["name"] == "local")
    assert local["sandbox"].startswith("required but unavailable")



# -- the real llama.cpp server with SmolLM2 ---------------------------------------------------

MALFORMED = ("unknown tool", "invalid input", "is not JSON", "not JSON", "must be an object",
             'an action is {"tool"')


@pytest.mark.real
@pytest.mark.slow
async def test_real_smollm2_runs_as_an_agent_in_schema_mode(
    tmp_path: Path, llama_server: str
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "hello.txt").write_text("hello from the workspace\n")
    exec_dir = tmp_path / "exec"
    async with Client(llama_server, "smollm2") as client:
        runner = LocalRunner(client, max_tokens=300, temperature=0.0, agent=AgentOptions(
            mode="agent", actions="schema", max_turns=4, sandbox_binary=BWRAP))
        result = await runner.run(RunRequest(
            prompt="Read hello.txt, then say done with what it contains.",
            exec_dir=exec_dir, workdir=ws, timeout_s=240))
    events = read_events(exec_dir / "stdout.log")
    assert events[-1]["type"] == "result" and events[-1]["actions"] == "schema"
    assert result.tokens_in and result.tokens_out
    # Whatever the tiny model chose, every action was well formed and was run.
    for block in tool_results(events):
        assert not any(m in block["content"] for m in MALFORMED), block
    assert len(tool_results(events)) == len(tool_uses(events))
    if result.status == RunStatus.FAILED:
        assert result.error and "max_turns" in result.error
    else:
        assert result.status == RunStatus.SUCCEEDED and events[-1]["num_turns"] >= 1


@pytest.mark.real
async def test_real_llama_auto_mode_falls_back_to_schema_actions(
    tmp_path: Path, llama_server: str
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    exec_dir = tmp_path / "exec"
    async with Client(llama_server, "smollm2") as client:
        runner = LocalRunner(client, max_tokens=200, temperature=0.0, agent=AgentOptions(
            mode="agent", actions="auto", max_turns=2))
        result = await runner.run(RunRequest(prompt="Create a file named a.txt.",
                                             exec_dir=exec_dir, workdir=ws, timeout_s=240))
    events = read_events(exec_dir / "stdout.log")
    switched = [e for e in events if e.get("subtype") == "local_agent" and "reason" in e]
    # SmolLM2 on this llama.cpp answers a tools request in prose (or the server refuses it).
    assert result.actions == "schema" and switched, [e.get("type") for e in events]
