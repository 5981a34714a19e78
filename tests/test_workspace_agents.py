"""Workspaces with real agents: the real claude CLI edits files in each task's own worktree."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.config import (
    ClaudeSettings,
    GeminiSettings,
    LocalAgentSettings,
    LocalModelSettings,
    Settings,
    WorkspaceSettings,
)
from corral.executor.landing import Landing
from tests import peers
from tests.conftest import ApiClient, until
from tests.daemon_proc import DaemonProcess, cli
from tests.fakes.anthropic import FakeAnthropic, ToolUse
from tests.fakes.base import Hang, Reply
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai import FakeOpenAI, ToolCalls
from tests.gitrepo import git, make_repo, snapshot

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
MakeSettings = Callable[..., Settings]


def write(name: str, content: str) -> ToolUse:
    """A turn in which the agent writes ``name`` in its working dir with Claude Code's Write."""
    return ToolUse("Write", lambda cwd: {"file_path": f"{cwd}/{name}", "content": content})


def api_socket(api: ApiClient) -> Path:
    return api.socket_path


def with_claude(make_settings: MakeSettings, fake: FakeOpenAI, **extra: Any) -> Settings:
    return make_settings(
        claude=ClaudeSettings(binary=str(peers.claude_bin())),
        local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"), **extra)


@pytest.mark.real
@pytest.mark.slow
async def test_two_claude_tasks_and_a_local_one_on_one_repo_each_in_its_own_worktree(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake,
    fake_anthropic: FakeAnthropic, claude_env: dict[str, str], daemon: Any,
) -> None:
    repo = make_repo(tmp_path / "repo")
    before = snapshot(repo)
    first = fake_anthropic.converse("TASK-A", write("a.txt", "from A\n"), Reply(text="wrote a"))
    second = fake_anthropic.converse("TASK-B", write("b.txt", "from B\n"), Reply(text="wrote b"))
    fake = await fake_openai()  # the local agent writes a file of its own
    fake.push(ToolCalls([("Write", {"file_path": "c.txt", "content": "from the local agent\n"})]),
              Reply(text="wrote c"))
    settings = with_claude(make_settings, fake, local_agent=LocalAgentSettings(actions="tools"))
    _, api = await daemon(settings, claude_env)
    submitted = await asyncio.gather(
        api.submit(prompt="TASK-A: add a.txt", agent="claude", workdir=str(repo)),
        api.submit(prompt="TASK-B: add b.txt", agent="claude", workdir=str(repo)),
        api.submit(prompt="add c.txt", agent="local", workdir=str(repo)))
    done = [await api.wait(t["id"], 120) for t in submitted]
    assert [d["state"] for d in done] == ["succeeded"] * 3, [d["error"] for d in done]
    paths = [d["workspace"]["path"] for d in done]
    assert len(set(paths)) == 3 and all(str(repo) not in p for p in paths)
    assert first.cwds[0] == paths[0] and second.cwds[0] == paths[1]  # where the CLI really ran
    a, b, local = (d["executions"][-1] for d in done)
    assert [f["path"] for f in a["files"]] == ["a.txt"] and a["insertions"] == 1
    assert [f["path"] for f in b["files"]] == ["b.txt"] and a["commit"] and b["commit"]
    assert [f["path"] for f in local["files"]] == ["c.txt"] and local["commit"]
    assert git(repo, "show", f"{done[0]['workspace']['branch']}:a.txt") == "from A\n"
    assert snapshot(repo) == before  # files, HEAD, index, status, branches, stash
    for task in done[:2]:
        code, out, err = await cli("merge", str(task["id"]), socket=api_socket(api))
        assert code == 0, err
        assert "merged" in out
    assert (repo / "a.txt").read_text() == "from A\n" and (repo / "b.txt").read_text() == "from B\n"
    assert not (repo / "c.txt").exists()  # the local task's branch is not merged
    code, out, err = await cli("workspaces", "--json", socket=api_socket(api))
    assert code == 0, err
    assert [w["task_id"] for w in json.loads(out)] == [done[2]["id"]]


@pytest.mark.real
async def test_a_conflicting_merge_is_refused_through_the_cli_with_the_tree_unchanged(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake,
    fake_anthropic: FakeAnthropic, claude_env: dict[str, str], daemon: Any,
) -> None:
    repo = make_repo(tmp_path / "repo")
    fake_anthropic.converse("RETITLE", write("README.md", "# the agent's title\n"),
                            Reply(text="retitled"))
    _, api = await daemon(with_claude(make_settings, await fake_openai()), claude_env)
    task = await api.wait((await api.submit(prompt="RETITLE the readme", agent="claude",
                                            workdir=str(repo)))["id"], 120)
    assert task["state"] == "succeeded"
    (repo / "README.md").write_text("# the user's title\n")
    git(repo, "commit", "-qam", "the user retitled it too")
    before = snapshot(repo)
    code, _, err = await cli("merge", str(task["id"]), socket=api_socket(api))
    assert code == 1 and "conflicts" in err and "README.md" in err
    assert snapshot(repo) == before
    code, out, _ = await cli("diff", str(task["id"]), "--stat", socket=api_socket(api))
    assert code == 0 and "README.md" in out
    code, out, err = await cli("discard", str(task["id"]), socket=api_socket(api))
    assert code == 0, err
    assert task["workspace"]["branch"] not in git(repo, "branch", "--list")
    assert not Path(task["workspace"]["path"]).exists()


@pytest.mark.real
async def test_a_reply_continues_the_same_conversation_in_the_same_worktree(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake,
    fake_anthropic: FakeAnthropic, claude_env: dict[str, str], daemon: Any,
) -> None:
    repo = make_repo(tmp_path / "repo")
    talk = fake_anthropic.converse(
        "PLAN-7", write("plan.md", "step 1\n"), Reply(text="planned"),
        write("plan.md", "step 1\nstep 2\n"), Reply(text="extended"))
    _, api = await daemon(with_claude(make_settings, await fake_openai()), claude_env)
    task = await api.wait((await api.submit(prompt="PLAN-7: write a plan", agent="claude",
                                            workdir=str(repo)))["id"], 120)
    assert task["state"] == "succeeded"
    code, out, err = await cli("reply", str(task["id"]), "now add step 2", "--wait", "--json",
                               socket=api_socket(api))
    assert code == 0, err
    again = json.loads(out)
    first, second = again["executions"]
    assert second["prompt"] == "now add step 2" and second["resumed_session"]
    assert second["resumed_session"] == first["session_id"]
    assert len(set(talk.cwds)) == 1 and talk.cwds[0] == task["workspace"]["path"]
    # The request after the reply carries the whole first conversation, then the reply.
    last = talk.requests[2]["messages"]
    assert "PLAN-7" in json.dumps(last[0]) and "now add step 2" in json.dumps(last[-1])
    assert git(repo, "show", f"{task['workspace']['branch']}:plan.md") == "step 1\nstep 2\n"
    assert [f["path"] for f in second["files"]] == ["plan.md"] and second["insertions"] == 1


@pytest.mark.real
@pytest.mark.slow
async def test_a_daemon_killed_mid_run_resumes_the_claude_session_on_restart(
    tmp_path: Path, fake_openai: MakeFake, fake_anthropic: FakeAnthropic,
    claude_env: dict[str, str], socket_path: Callable[[], Path],
) -> None:
    repo = make_repo(tmp_path / "repo")
    # The second turn hangs: the daemon is killed while the CLI waits for it.
    talk = fake_anthropic.converse("LONG-9", write("half.txt", "half done\n"), Hang(),
                                   Reply(text="finished after the restart"))
    sock = socket_path()
    env = ", ".join(f'{k} = "{v}"' for k, v in claude_env.items() if k != "PATH")
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nsocket_path = "{sock}"\ndata_dir = "{tmp_path / "data"}"\n'
        "shutdown_grace_seconds = 1.0\n[pool]\nkill_grace_seconds = 1.0\n"
        f'[claude]\nbinary = "{peers.claude_bin()}"\nenv = {{ {env} }}\n'
        "[gemini]\nenabled = false\n")
    daemon = DaemonProcess(config, sock)
    await daemon.start()
    _, out, _ = await cli("submit", "LONG-9: a long job", "--agent", "claude", "--dir",
                             str(repo), "--json", socket=sock)
    task_id = json.loads(out)["id"]

    async def waiting_on_the_second_turn() -> bool:
        return len(talk.requests) >= 2

    await until(waiting_on_the_second_turn, timeout_s=60)
    assert daemon.proc is not None
    daemon.proc.kill()
    await daemon.proc.wait()
    restarted = DaemonProcess(config, sock)
    await restarted.start()
    try:
        async def final() -> bool:
            c, o, _ = await cli("show", str(task_id), "--json", socket=sock)
            return c == 0 and json.loads(o)["state"] in ("succeeded", "failed", "cancelled")

        await until(final, timeout_s=120, every_s=0.5)
        _, out, _ = await cli("show", str(task_id), "--json", socket=sock)
        task = json.loads(out)
        assert task["state"] == "succeeded", task
        interrupted, resumed = task["executions"]
        assert interrupted["status"] == "interrupted" and resumed["resumed_session"]
        # The same session, from the same worktree: the resumed request holds the first turns.
        assert set(talk.cwds) == {task["workspace"]["path"]}
        assert "half.txt" in json.dumps(talk.requests[-1]["messages"])
        assert git(repo, "show", f"{task['workspace']['branch']}:half.txt") == "half done\n"
    finally:
        await restarted.stop()


@pytest.mark.real
async def test_cleanup_removes_idle_worktrees_but_keeps_their_branches(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake,
    fake_anthropic: FakeAnthropic, claude_env: dict[str, str], daemon: Any,
) -> None:
    repo = make_repo(tmp_path / "repo")
    fake_anthropic.converse("IDLE-1", write("idle.txt", "x\n"), Reply(text="done"))
    settings = with_claude(make_settings, await fake_openai(),
                           workspace=WorkspaceSettings(keep_days=0))
    pool, api = await daemon(settings, claude_env)
    task = await api.wait((await api.submit(prompt="IDLE-1", agent="claude",
                                            workdir=str(repo)))["id"], 120)
    assert task["state"] == "succeeded" and Path(task["workspace"]["path"]).exists()
    assert pool.workspaces is not None
    landing = Landing(pool.store, pool.workspaces, keep_days=0)
    assert await landing.cleanup() == 1
    assert not Path(task["workspace"]["path"]).exists()
    assert task["workspace"]["branch"] in git(repo, "branch", "--list")
    _, shown = await api.call("GET", f"/tasks/{task['id']}")
    assert shown["workspace"]["state"] == "removed"


@pytest.mark.real
async def test_a_gemini_reply_resumes_its_own_session_in_the_worktree(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake,
    fake_gemini: FakeGemini, gemini_env: dict[str, str], daemon: Any,
) -> None:
    repo = make_repo(tmp_path / "repo")
    fake_gemini.push(Reply(text="noted"), Reply(text="it was PINEAPPLE"))
    settings = make_settings(gemini=GeminiSettings(binary=str(peers.gemini_bin())),
                             local_model=LocalModelSettings(endpoint=(await fake_openai()).endpoint,
                                                            model="m"))
    _, api = await daemon(settings, gemini_env)
    task = await api.wait((await api.submit(prompt="remember the word PINEAPPLE",
                                            agent="gemini", workdir=str(repo)))["id"], 120)
    assert task["state"] == "succeeded", task["error"]
    status, _ = await api.call("POST", f"/tasks/{task['id']}/reply",
                               json={"prompt": "what was the word?"})
    assert status == 200
    done = await api.wait(task["id"], 120)
    first, second = done["executions"]
    assert done["state"] == "succeeded" and second["summary"] == "it was PINEAPPLE"
    assert second["resumed_session"] == first["session_id"] == second["session_id"]
    contents = json.dumps(fake_gemini.requests[-1]["contents"])
    assert "PINEAPPLE" in contents and "noted" in contents and "what was the word?" in contents
    assert task["workspace"]["path"] in contents  # it ran in the task's worktree
