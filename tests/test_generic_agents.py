"""Agents defined in the config file (``[agents.NAME]``): the real aider, the real claude CLI
configured by hand, and small programs that exit badly, hang, flood or echo their argv."""

from __future__ import annotations

import json
import os
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.config import AgentCliSettings, LocalModelSettings, PoolSettings, Settings
from corral.executor.generic import GenericRunner, fill, with_history
from corral.executor.runner import RunRequest, RunResult, RunStatus
from corral.executor.streamjson import read_events
from tests import peers
from tests.conftest import StartDaemon, until
from tests.daemon_proc import cli
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.base import Reply
from tests.fakes.openai import FakeOpenAI
from tests.gitrepo import git, make_repo, snapshot
from tests.test_runners import PgidLog, group_alive

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
MakeSettings = Callable[..., Settings]
ECHO_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


def python(code: str, *args: str) -> list[str]:
    """A real program as the configured CLI: this interpreter running ``code``."""
    return [sys.executable, "-c", code, *args]


def aider(fake: FakeOpenAI, home: Path) -> AgentCliSettings:
    """The real aider against the fake, editing the files it is told, in ``whole`` format."""
    return AgentCliSettings(
        command=[str(peers.aider_bin()), "--model", "openai/M", "--openai-api-base",
                 fake.endpoint, "--openai-api-key", "sk-test-aider", "--edit-format", "whole",
                 "--yes-always", "--no-git", "--no-check-update", "--no-show-model-warnings",
                 "--no-analytics", "--no-stream", "--no-pretty",
                 "--chat-history-file", str(home / "chat.md"),
                 "--input-history-file", str(home / "input.txt"),
                 "--message", "{prompt}", "hello.txt"],
        env={"HOME": str(home), "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        timeout_seconds=120, description="aider: rewrites the files it is given")


async def run_only(settings: AgentCliSettings, exec_dir: Path, prompt: str = "hi",
                   **request: Any) -> RunResult:
    runner = GenericRunner("tool", settings, env={"PATH": os.environ["PATH"], **settings.env},
                           kill_grace_s=1.0)
    return await runner.run(RunRequest(prompt=prompt, exec_dir=exec_dir,
                                       workdir=request.pop("workdir", exec_dir.parent),
                                       **request))


async def run(settings: AgentCliSettings, tmp_path: Path, prompt: str = "hi",
              **request: Any) -> tuple[RunResult, list[dict[str, Any]]]:
    exec_dir = tmp_path / f"exec-{time.monotonic_ns()}"
    result = await run_only(settings, exec_dir, prompt, **request)
    return result, read_events(exec_dir / "stdout.log")


def test_placeholders_fill_whole_elements_and_a_missing_model_takes_its_flag() -> None:
    command = ["cli", "--model", "{model}", "-p", "{prompt}", "--tag=x"]
    assert fill(command, prompt="do it", model="m1") == [
        "cli", "--model", "m1", "-p", "do it", "--tag=x"]
    assert fill(command, prompt="do it", model=None) == ["cli", "-p", "do it", "--tag=x"]
    # A prompt that looks like a placeholder or a flag is still just the prompt.
    assert fill(command, prompt="{model} --rm", model=None)[2] == "{model} --rm"
    resume = ["cli", "--resume", "{session_id}", "{prompt}"]
    assert fill(resume, prompt="more", model=None, session_id="s-1") == [
        "cli", "--resume", "s-1", "more"]


def test_a_reply_without_sessions_carries_the_earlier_turns() -> None:
    assert with_history("next", []) == "next"
    prompt = with_history("and now?", [("first ask", "first answer")])
    assert prompt.index("first ask") < prompt.index("first answer") < prompt.index("and now?")


@pytest.mark.parametrize("argv, text", [
    ([], "nothing but {prompt}"),
    (python("import sys; sys.stdout.write(sys.stdin.read()[::-1])"), "in on stdin"),
])
async def test_the_prompt_is_an_argument_or_stdin(tmp_path: Path, argv: list[str],
                                                  text: str) -> None:
    settings = AgentCliSettings(command=argv or python(ECHO_ARGV, "{prompt}"))
    result, events = await run(settings, tmp_path, prompt=text)
    assert result.status == RunStatus.SUCCEEDED, result.error
    expected = json.dumps([text]) if not argv else text[::-1]
    assert result.final_text == expected and result.summary == expected
    assert (result.cost_usd, result.tokens_in, result.tokens_out) == (None, None, None)
    assert events[0]["type"] == "system" and events[0]["source"] == "tool"
    deltas = "".join(e["event"]["delta"]["text"] for e in events if e["type"] == "stream_event")
    assert deltas.strip() == expected
    assert events[-1]["type"] == "result" and not events[-1]["is_error"]
    assert events[-1]["result"] == expected


async def test_shell_metacharacters_newlines_and_a_leading_dash_arrive_as_one_argument(
    tmp_path: Path,
) -> None:
    prompt = ("-rf --help; rm -rf ~ && $(touch pwned) `touch pwned2` | cat > out\n"
              "second line * ? ~ \\ ' \" {model} %s")
    settings = AgentCliSettings(command=python(ECHO_ARGV, "{prompt}", "--model", "{model}"))
    result, _ = await run(settings, tmp_path, prompt=prompt)
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert json.loads(result.final_text or "") == [prompt]  # and the empty --model is gone
    assert not list(tmp_path.glob("pwned*")) and not (tmp_path / "out").exists()
    result, _ = await run(settings, tmp_path, prompt="x", model="m-2")
    assert json.loads(result.final_text or "") == ["x", "--model", "m-2"]


async def test_a_cli_that_exits_1_fails_with_its_code_and_stderr(tmp_path: Path) -> None:
    settings = AgentCliSettings(command=python(
        "import sys; print('working'); print('no API key configured', file=sys.stderr);"
        " sys.exit(1)"))
    result, events = await run(settings, tmp_path)
    assert result.status == RunStatus.FAILED and result.exit_code == 1
    assert result.error == "tool exited with code 1: no API key configured"
    assert result.summary == "working" and not result.retryable
    assert events[-1]["is_error"] and events[-1]["error"] == result.error
    stderr_log = next(tmp_path.glob("exec-*")) / "stderr.log"
    assert stderr_log.read_text().strip() == "no API key configured"
    # An exit code the config calls success is one.
    lenient = AgentCliSettings(command=settings.command, success_exit_codes=[0, 1])
    assert (await run(lenient, tmp_path))[0].status == RunStatus.SUCCEEDED


async def test_a_cli_that_hangs_past_its_timeout_is_killed_with_its_children(
    tmp_path: Path,
) -> None:
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c',"
            " 'import time; time.sleep(600)']); print('started', flush=True); time.sleep(600)")
    settings = AgentCliSettings(command=python(code), timeout_seconds=1.0)
    pgids = PgidLog()
    started = time.monotonic()
    result, events = await run(settings, tmp_path, on_process=pgids.record)
    assert result.status == RunStatus.TIMED_OUT and "timed out after 1s" in (result.error or "")
    assert time.monotonic() - started < 30
    assert pgids.first is not None and not group_alive(pgids.first)  # the grandchild too
    assert events[-1]["type"] == "result" and events[-1]["is_error"]


async def test_fifty_megabytes_of_output_reach_the_log_and_not_the_daemons_memory(
    tmp_path: Path,
) -> None:
    line_chars, lines = 1000, 50 * 1024
    settings = AgentCliSettings(command=python(
        f"import sys\nline = 'x' * {line_chars - 1} + '\\n'\n"
        f"for i in range({lines}): sys.stdout.write(line)\nprint('the end')"))
    exec_dir = tmp_path / "exec"
    tracemalloc.start()
    try:
        result = await run_only(settings, exec_dir)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert peak_bytes < 16 * 1024 * 1024, peak_bytes  # the output is 50 MiB
    assert (result.final_text or "").endswith("the end") and result.summary
    assert result.summary.endswith("the end") and len(result.summary) <= 300
    log = exec_dir / "stdout.log"
    assert log.stat().st_size > line_chars * lines
    streamed = 0
    with log.open("rb") as f:
        for raw in f:
            event = json.loads(raw)
            if event["type"] == "stream_event":
                streamed += len(event["event"]["delta"]["text"])
    assert streamed == line_chars * lines + len("the end\n")


# -- through the daemon ---------------------------------------------------------------------

def with_agents(make_settings: MakeSettings, fake: FakeOpenAI, limit: int = 1,
                **agents: AgentCliSettings) -> Any:
    return make_settings(
        local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"), agents=agents,
        pool=PoolSettings(retry_base_seconds=0.05, retry_max_seconds=0.2,
                          kill_grace_seconds=1.0, max_concurrent=dict.fromkeys(agents, limit)))


@pytest.mark.real
async def test_aider_edits_a_file_in_the_tasks_workspace(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake, daemon: StartDaemon,
) -> None:
    repo = make_repo(tmp_path / "repo", {"hello.txt": "old greeting\n"})
    before = snapshot(repo)
    llm = await fake_openai()  # the local model: the classifier's, unused here
    model = await fake_openai()  # aider's
    model.push(Reply(text="hello.txt\n```\nhello from aider\n```\n", input_tokens=30,
                     output_tokens=9))
    home = tmp_path / "aider-home"
    home.mkdir()
    _, api = await daemon(with_agents(make_settings, llm, aider=aider(model, home)),
                          {"PATH": os.environ["PATH"]})
    status, agents = await api.call("GET", "/agents")
    assert status == 200
    entry = next(a for a in agents["agents"] if a["name"] == "aider")
    assert entry["registered"] and entry["max_concurrent"] == 1, entry
    task = await api.wait((await api.submit(prompt="say hello in hello.txt", agent="aider",
                                            workdir=str(repo)))["id"], 120)
    assert task["state"] == "succeeded", task["error"]
    execution = task["executions"][-1]
    assert [f["path"] for f in execution["files"]] == ["hello.txt"]
    assert (execution["insertions"], execution["deletions"]) == (1, 1) and execution["commit"]
    assert git(repo, "show", f"{task['workspace']['branch']}:hello.txt") == "hello from aider\n"
    assert snapshot(repo) == before  # the user's checkout is untouched
    assert execution["cost_usd"] is None and execution["tokens_in"] is None
    assert "hello.txt" in (execution["summary"] or "")
    sent = json.dumps(model.requests[0]["body"]["messages"])
    assert "say hello in hello.txt" in sent and model.requests[0]["body"]["model"] == "M"
    events = read_events(Path(execution["log_dir"]) / "stdout.log")
    assert events[0]["source"] == "aider" and events[-1]["type"] == "result"
    assert not events[-1]["is_error"] and "hello.txt" in events[-1]["result"]


@pytest.mark.real
async def test_a_configured_claude_stream_json_cli_reports_cost_and_resumes_its_session(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake,
    fake_anthropic: FakeAnthropic, claude_env: dict[str, str], daemon: StartDaemon,
) -> None:
    claude = str(peers.claude_bin())
    head = [claude, "-p", "--output-format", "stream-json", "--verbose"]
    hand_made = AgentCliSettings(
        command=[*head, "{prompt}"], resume=[*head, "--resume", "{session_id}", "{prompt}"],
        output="claude-stream-json", env=claude_env)
    talk = fake_anthropic.converse("COUNT-3", Reply(text="one", input_tokens=40, output_tokens=5),
                                   Reply(text="two", input_tokens=50, output_tokens=6))
    _, api = await daemon(with_agents(make_settings, await fake_openai(), mine=hand_made))
    task = await api.wait((await api.submit(prompt="COUNT-3: start counting", agent="mine",
                                            workdir=str(tmp_path)))["id"], 120)
    assert task["state"] == "succeeded", task["error"]
    first = task["executions"][0]
    assert first["summary"] == "one" and first["session_id"]
    assert (first["tokens_in"], first["tokens_out"]) == (40, 5) and first["cost_usd"] > 0
    code, out, err = await cli("reply", str(task["id"]), "go on", "--wait", "--json",
                               socket=api.socket_path)
    assert code == 0, err
    second = json.loads(out)["executions"][1]
    assert second["status"] == "succeeded"
    assert second["summary"] == "two" and second["resumed_session"] == first["session_id"]
    assert "COUNT-3" in json.dumps(talk.requests[-1]["messages"][0])  # the same conversation


async def test_a_text_cli_reply_carries_the_conversation_and_the_classifier_knows_it(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake, daemon: StartDaemon,
) -> None:
    llm = await fake_openai()
    llm.push(Reply(text=json.dumps({"agent_type": "echo", "model": None, "reason": "echoes"})))
    echo = AgentCliSettings(command=python("import sys; print('heard: ' + sys.argv[1])",
                                           "{prompt}"),
                            description="echo: repeats what it is told, word for word")
    # As many slots as the local agent: balancing leaves the classifier's choice alone.
    _, api = await daemon(with_agents(make_settings, llm, limit=4, echo=echo))
    task = await api.wait((await api.submit(prompt="repeat FIRST"))["id"], 60)
    assert task["state"] == "succeeded" and task["agent"] == "echo", task["classifier_reason"]
    classifier_prompt = json.dumps(llm.requests[0]["body"]["messages"])
    assert "echo: repeats what it is told, word for word" in classifier_prompt
    code, out, err = await cli("reply", str(task["id"]), "repeat SECOND", "--wait", "--json",
                               socket=api.socket_path)
    assert code == 0, err
    said = json.loads(out)["executions"][1]["summary"]
    assert said.index("repeat FIRST") < said.index("heard: repeat FIRST") < said.index(
        "repeat SECOND")


async def test_a_cancelled_task_kills_the_clis_process_group(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake, daemon: StartDaemon,
) -> None:
    code = ("import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c',"
            " 'import time; time.sleep(600)']); open('pid', 'w').write(str(os.getpid()));"
            " time.sleep(600)")
    _, api = await daemon(with_agents(make_settings, await fake_openai(),
                                      sleeper=AgentCliSettings(command=python(code))))
    task = await api.submit(prompt="sleep", agent="sleeper", workdir=str(tmp_path))

    async def started() -> bool:
        return (tmp_path / "pid").exists() and bool((tmp_path / "pid").read_text())

    await until(started, timeout_s=30)
    pgid = int((tmp_path / "pid").read_text())
    status, _ = await api.call("POST", f"/tasks/{task['id']}/cancel")
    assert status == 200
    assert (await api.wait(task["id"]))["state"] == "cancelled"
    assert not group_alive(pgid)


async def test_an_agent_whose_program_is_missing_is_listed_unavailable(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake, daemon: StartDaemon,
) -> None:
    gone = AgentCliSettings(command=[str(tmp_path / "no-such-cli"), "{prompt}"])
    off = AgentCliSettings(command=python("print(1)"), enabled=False)
    _, api = await daemon(with_agents(make_settings, await fake_openai(), gone=gone, off=off))
    status, agents = await api.call("GET", "/agents")
    assert status == 200
    by_name = {a["name"]: a for a in agents["agents"]}
    assert not by_name["gone"]["registered"]
    assert "no-such-cli not found" in by_name["gone"]["reason"]
    assert by_name["off"]["reason"] == "disabled in [agents.off]"
    status, body = await api.call("POST", "/tasks", json={"prompt": "x", "agent": "nobody"})
    assert status == 400 and "gone" in body["error"]["message"]
