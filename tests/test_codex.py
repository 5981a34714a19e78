"""CodexRunner with the real codex CLI against a loopback Responses API fake."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.config import CodexSettings, LocalModelSettings, Price, Settings
from corral.executor.codex import CodexRunner
from corral.executor.runner import RunRequest, RunResult, RunStatus
from corral.executor.streamjson import read_events
from tests.conftest import StartDaemon
from tests.fakes.base import Hang, Reply, Status
from tests.fakes.openai import FakeOpenAI
from tests.fakes.responses import Failed, FakeResponses, Shell
from tests.gitrepo import git, make_repo
from tests.test_runners import PgidLog, group_alive

pytestmark = pytest.mark.real
MakeFake = Callable[[], Awaitable[FakeOpenAI]]


def runner(settings: CodexSettings, **overrides: Any) -> CodexRunner:
    options: dict[str, Any] = {
        "binary": settings.binary, "model": settings.model, "extra_args": settings.extra_args,
        "timeout_s": 120, "env": {"PATH": os.environ["PATH"], **settings.env},
        "kill_grace_s": 1.0, "sandbox": "danger-full-access"}
    options.update(overrides)
    return CodexRunner(**options)


async def run(settings: CodexSettings, tmp_path: Path, prompt: str = "hi",
              **request: Any) -> tuple[RunResult, list[dict[str, Any]]]:
    exec_dir = tmp_path / f"exec-{time.monotonic_ns()}"
    workdir = request.pop("workdir", tmp_path)
    sandbox = request.pop("sandbox", "danger-full-access")
    result = await runner(settings, sandbox=sandbox).run(
        RunRequest(prompt=prompt, exec_dir=exec_dir, workdir=workdir, **request))
    return result, read_events(exec_dir / "stdout.log")


async def test_a_plain_answer(tmp_path: Path, codex_settings: CodexSettings,
                              fake_responses: FakeResponses) -> None:
    fake_responses.push(Reply(parts=("Hello ", "from codex"), input_tokens=21, output_tokens=4))
    result, events = await run(codex_settings, tmp_path)
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert result.summary == "Hello from codex" and result.session_id
    assert (result.tokens_in, result.tokens_out, result.cost_usd) == (21, 4, None)
    assert events[0]["type"] == "system" and events[0]["session_id"] == result.session_id
    assert events[-1]["type"] == "result" and not events[-1]["is_error"]
    assert any(e["type"] == "assistant" for e in events)
    request = fake_responses.requests[0]
    assert request["headers"]["Authorization"] == "Bearer sk-test-codex-key"
    assert request["body"]["model"] == "gpt-5.5"


async def test_a_shell_command_runs_in_the_workspace_and_is_logged_as_bash(
    tmp_path: Path, codex_settings: CodexSettings, fake_responses: FakeResponses
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    fake_responses.push(Shell("echo from-codex > made.txt && cat made.txt"),
                        Reply(text="made it", input_tokens=60, output_tokens=5))
    # The default sandbox, with CODEX_HOME outside /tmp.
    result, events = await run(codex_settings, tmp_path, workdir=ws, sandbox="workspace-write")
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert (ws / "made.txt").read_text() == "from-codex\n"
    uses = [b for e in events if e["type"] == "assistant" for b in e["message"]["content"]
            if b["type"] == "tool_use"]
    results = [b for e in events if e["type"] == "user" for b in e["message"]["content"]]
    assert [u["name"] for u in uses] == ["Bash"] and "made.txt" in uses[0]["input"]["command"]
    assert results[0]["tool_use_id"] == uses[0]["id"] and not results[0]["is_error"]
    assert "from-codex" in results[0]["content"]
    assert result.tokens_in == 40 + 60  # a turn with a tool call is two requests


async def test_a_429_is_a_rate_limit_from_codexs_own_record(
    tmp_path: Path, codex_settings: CodexSettings, fake_responses: FakeResponses
) -> None:
    fake_responses.push(Status(429, retry_after="3"))
    result, events = await run(codex_settings, tmp_path)
    assert result.status == RunStatus.RATE_LIMITED, result.error
    assert len(fake_responses.requests) == 1 and events[-1]["is_error"]
    fake_responses.push(Failed("rate_limit_exceeded", "slow down"))
    result, _ = await run(codex_settings, tmp_path)
    assert result.status == RunStatus.RATE_LIMITED


async def test_a_500_is_retried_by_codex_then_a_retryable_failure(
    tmp_path: Path, codex_settings: CodexSettings, fake_responses: FakeResponses
) -> None:
    fake_responses.default = Status(500)
    retrying = codex_settings.model_copy(update={"extra_args": [
        a.replace("request_max_retries=0", "request_max_retries=2")
        for a in codex_settings.extra_args]})
    result, _ = await run(retrying, tmp_path)
    assert result.status == RunStatus.FAILED and result.retryable, result.error
    assert len(fake_responses.requests) == 3  # codex's own two retries


async def test_a_hang_is_killed_by_the_task_timeout_with_no_child_left(
    tmp_path: Path, codex_settings: CodexSettings, fake_responses: FakeResponses
) -> None:
    fake_responses.default = Hang()
    pgids = PgidLog()
    result, _ = await run(codex_settings, tmp_path, timeout_s=4, on_process=pgids.record)
    assert result.status == RunStatus.TIMED_OUT
    # The npm codex is a node wrapper around a native binary: the whole group is gone.
    assert pgids.first is not None and not group_alive(pgids.first)


async def test_a_missing_binary(tmp_path: Path) -> None:
    result = await CodexRunner(binary="codex-nope", model=None, extra_args=[], timeout_s=5,
                               env={"PATH": str(tmp_path)}).run(
        RunRequest(prompt="x", exec_dir=tmp_path / "e"))
    assert result.status == RunStatus.FAILED and result.error
    assert "codex-nope not found on PATH" in result.error


def test_extra_args_other_than_config_overrides_are_refused() -> None:
    with pytest.raises(ValueError, match="only -c key=value"):
        CodexSettings(extra_args=["--model", "x"])
    assert CodexSettings(extra_args=["-c", "a=1"]).extra_args == ["-c", "a=1"]


async def test_a_reply_resumes_the_thread_and_the_cost_is_estimated(
    tmp_path: Path, codex_settings: CodexSettings, fake_responses: FakeResponses,
    fake_openai: MakeFake, make_settings: Callable[..., Settings],
    daemon: StartDaemon,
) -> None:
    repo = make_repo(tmp_path / "repo")
    fake_responses.push(Shell("echo planned > plan.txt"), Reply(text="first", input_tokens=10,
                                                                 output_tokens=2),
                        Reply(text="second", input_tokens=30, output_tokens=3))
    settings = make_settings(
        codex=codex_settings.model_copy(update={"sandbox": "danger-full-access"}),
        local_model=LocalModelSettings(endpoint=(await fake_openai()).endpoint, model="m"),
        prices={"gpt-5.5": Price(input=1.25, output=10.0, cached_input=0.125)})
    _, api = await daemon(settings, {"PATH": os.environ["PATH"]})
    task = await api.wait((await api.submit(prompt="write a plan", agent="codex",
                                            workdir=str(repo)))["id"], 120)
    assert task["state"] == "succeeded", task["error"]
    first = task["executions"][0]
    assert [f["path"] for f in first["files"]] == ["plan.txt"] and first["commit"]
    assert first["cost_estimated"] and first["cost_usd"] == pytest.approx(
        (50 * 1.25 + 10 * 10.0) / 1e6)
    assert git(repo, "show", f"{task['workspace']['branch']}:plan.txt") == "planned\n"
    status, _ = await api.call("POST", f"/tasks/{task['id']}/reply", json={"prompt": "and?"})
    assert status == 200
    done = await api.wait(task["id"], 120)
    second = done["executions"][1]
    assert second["session_id"] == first["session_id"] == second["resumed_session"]
    # The thread's totals went from 50/10 to 80/13: this execution used the difference.
    assert (second["tokens_in"], second["tokens_out"]) == (30, 3)
    resumed = json.dumps(fake_responses.requests[-1]["body"]["input"])
    assert "write a plan" in resumed and "and?" in resumed
