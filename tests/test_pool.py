"""The pool inside a whole daemon: real SQLite, real runners, real CLIs through fake APIs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.config import (
    ClaudeSettings,
    GeminiSettings,
    LocalAgentSettings,
    LocalModelSettings,
    MaxConcurrent,
    PoolSettings,
    Settings,
)
from corral.executor.local import LocalRunner
from corral.executor.pool import Pool
from corral.executor.streamjson import read_events
from corral.llm.client import Client
from corral.models import ExecStatus, TaskState
from corral.storage.sqlite import SqliteStore
from tests import peers
from tests.conftest import ApiClient, until
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.base import Reply, Status
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai import FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
MakeSettings = Callable[..., Settings]


def pool_settings(**limits: int) -> PoolSettings:
    return PoolSettings(max_workers=limits.pop("workers", 8),
                        max_concurrent=MaxConcurrent(**limits),
                        retry_base_seconds=0.05, retry_max_seconds=0.2,
                        cooldown_default_seconds=1.0, kill_grace_seconds=1.0)


def local(fake: FakeOpenAI) -> LocalModelSettings:
    return LocalModelSettings(endpoint=fake.endpoint, model="fake-model")


def classifier_answer(agent: str) -> Reply:
    return Reply(text=json.dumps({"agent_type": agent, "model": "", "reason": f"pick {agent}"}))


async def running_count(api: ApiClient) -> int:
    _, data = await api.call("GET", "/tasks", params={"state": "running"})
    return len(data["tasks"])


async def test_per_agent_limit_holds(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    fake.default = Reply(text="slow " * 10, chunks=10, chunk_delay_s=0.03)
    _, api = await daemon(make_settings(pool=pool_settings(local=2), local_model=local(fake)))
    tasks = [await api.submit(prompt=f"t{i}", agent="local") for i in range(6)]
    seen_running = 0
    for task in tasks:
        seen_running = max(seen_running, await running_count(api))
        done = await api.wait(task["id"])
        assert done["state"] == "succeeded"
    assert fake.max_in_flight == 2
    assert seen_running <= 2


async def test_retries_then_success(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    fake.push(Status(500), Status(500), Reply(text="third time lucky"))
    _, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake)))
    task = await api.submit(prompt="flaky", agent="local", max_retries=2)
    done = await api.wait(task["id"])
    assert done["state"] == "succeeded"
    assert [e["status"] for e in done["executions"]] == ["failed", "failed", "succeeded"]
    assert done["attempts"] == 3
    assert done["executions"][-1]["summary"] == "third time lucky"


async def test_out_of_retries_fails_with_error(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    fake.default = Status(500)
    _, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake)))
    done = await api.wait((await api.submit(prompt="x", agent="local", max_retries=1))["id"])
    assert done["state"] == "failed" and "HTTP 500" in done["error"]
    assert len(done["executions"]) == 2


async def test_timeout_ends_cancelled_with_timed_out_execution_and_partial_log(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    fake.default = Reply(text="partial " * 100, chunks=100, chunk_delay_s=0.05)
    _, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake)))
    done = await api.wait((await api.submit(prompt="x", agent="local", timeout_s=0.5))["id"])
    assert done["state"] == "cancelled" and "timed out after 0.5s" in done["error"]
    execution = done["executions"][0]
    assert execution["status"] == "timed_out"
    events = read_events(Path(execution["log_dir"]) / "stdout.log")
    assert events[-1]["type"] == "result" and events[-1]["is_error"]
    assert events[-1]["result"].startswith("partial partial")


async def test_runs_make_their_own_folders_even_when_executions_is_gone(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    pool, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake)))
    await asyncio.to_thread(shutil.rmtree, pool.executions_dir)
    tasks = [await api.submit(prompt=f"x{i}", agent="local") for i in range(3)]
    for task in tasks:
        done = await api.wait(task["id"])
        assert done["state"] == "succeeded"
        events = read_events(Path(done["executions"][0]["log_dir"]) / "stdout.log")
        assert events[-1]["type"] == "result" and not events[-1]["is_error"]


async def test_cancel_running_and_queued(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    fake.default = Reply(text="tick " * 400, chunks=400, chunk_delay_s=0.02)
    _, api = await daemon(make_settings(pool=pool_settings(local=1), local_model=local(fake)))
    running = await api.submit(prompt="long", agent="local")
    queued = await api.submit(prompt="waiting", agent="local")

    async def streaming() -> bool:
        status, log = await api.call("GET", f"/tasks/{running['id']}/log")
        return status == 200 and b"tick" in log

    await until(streaming)
    status, cancelled = await api.call("POST", f"/tasks/{queued['id']}/cancel")
    assert status == 200 and cancelled["state"] == "cancelled" and not cancelled["executions"]
    status, cancelled = await api.call("POST", f"/tasks/{running['id']}/cancel")
    assert status == 200 and cancelled["state"] == "cancelled"
    assert cancelled["executions"][0]["status"] == "cancelled"
    status, body = await api.call("GET", f"/tasks/{running['id']}/log")
    assert status == 200 and b"tick" in body  # the partial log is kept
    status, err = await api.call("POST", f"/tasks/{running['id']}/cancel")
    assert status == 409 and err["error"]["code"] == "conflict"


async def test_unregistered_agent_goes_to_classifier(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    fake.push(classifier_answer("local"))
    _, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake)))
    done = await api.wait((await api.submit(prompt="x", agent="claude"))["id"])
    assert done["state"] == "succeeded" and done["agent"] == "local"
    assert done["classifier_reason"].startswith("claude is unavailable: disabled in [claude]")


async def test_classifier_garbage_falls_back_to_default(
    make_settings: MakeSettings, fake_openai: MakeFake, fake_gemini: FakeGemini,
    gemini_env: dict[str, str], daemon: Any,
) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="no json at all"))
    settings = make_settings(
        pool=pool_settings(), local_model=local(fake),
        gemini=GeminiSettings(binary=str(peers.gemini_bin())),
    )
    _, api = await daemon(settings, gemini_env)
    done = await api.wait((await api.submit(prompt="x", agent="auto"))["id"])
    assert "not JSON" in done["classifier_reason"]
    assert done["state"] == "succeeded"


async def test_no_deadlock_when_every_slot_is_busy(
    make_settings: MakeSettings, fake_openai: MakeFake, fake_gemini: FakeGemini,
    gemini_env: dict[str, str], daemon: Any,
) -> None:
    fake = await fake_openai()
    slow = Reply(text="busy " * 200, chunks=200, chunk_delay_s=0.02)
    fake.push(slow, slow, classifier_answer("gemini"))
    settings = make_settings(
        pool=pool_settings(workers=2, local=2), local_model=local(fake),
        gemini=GeminiSettings(binary=str(peers.gemini_bin())),
    )
    _, api = await daemon(settings, gemini_env)
    busy = [await api.submit(prompt=f"busy {i}", agent="local") for i in range(2)]

    async def all_busy() -> bool:
        return fake.in_flight == 2

    await until(all_busy)
    auto = await api.submit(prompt="route me", agent="auto")

    async def classified() -> bool:
        _, task = await api.call("GET", f"/tasks/{auto['id']}")
        return task["classifier_reason"] is not None

    await until(classified)
    _, task = await api.call("GET", f"/tasks/{auto['id']}")
    assert task["classifier_reason"] == "local model: pick gemini"
    assert fake.in_flight == 2  # classified while both slots were still held
    for t in [*busy, auto]:
        assert (await api.wait(t["id"]))["state"] == "succeeded"


@pytest.mark.real
async def test_rate_limited_agent_cools_down_while_others_flow(
    make_settings: MakeSettings, fake_openai: MakeFake, fake_anthropic: FakeAnthropic,
    claude_env: dict[str, str], daemon: Any,
) -> None:
    fake = await fake_openai()
    fake_anthropic.push(*[Status(429, retry_after="1")] * 2)
    settings = make_settings(
        pool=pool_settings(), local_model=local(fake),
        claude=ClaudeSettings(binary=str(peers.claude_bin()), max_rate_limit_retries=1),
    )
    _, api = await daemon(settings, claude_env)
    limited = await api.submit(prompt="claude work", agent="claude")

    async def cooling() -> bool:
        _, data = await api.call("GET", "/agents")
        return any(a["name"] == "claude" and a["state"] == "cooling_down" for a in data["agents"])

    await until(cooling, timeout_s=60)
    locals_ = [await api.submit(prompt=f"l{i}", agent="local") for i in range(3)]
    for task in locals_:
        assert (await api.wait(task["id"]))["state"] == "succeeded"
    done = await api.wait(limited["id"], timeout_s=90)
    assert done["state"] == "succeeded", done
    statuses = [e["status"] for e in done["executions"]]
    assert statuses[0] == "rate_limited" and statuses[-1] == "succeeded"
    assert done["attempts"] == 1  # the rate limit did not spend an attempt
    assert done["executions"][-1]["cost_usd"] > 0


@pytest.mark.real
async def test_auto_task_fails_over_while_an_agent_cools_down(
    make_settings: MakeSettings, fake_openai: MakeFake, fake_gemini: FakeGemini,
    gemini_env: dict[str, str], daemon: Any,
) -> None:
    fake = await fake_openai()
    fake.push(classifier_answer("local"), Status(429, retry_after="60"))
    settings = make_settings(
        pool=pool_settings(), local_model=local(fake),
        gemini=GeminiSettings(binary=str(peers.gemini_bin())),
    )
    _, api = await daemon(settings, gemini_env)
    done = await api.wait((await api.submit(prompt="anything", agent="auto"))["id"], 90)
    assert done["state"] == "succeeded"
    assert [(e["agent"], e["status"]) for e in done["executions"]] == [
        ("local", "rate_limited"), ("gemini", "succeeded")]
    _, data = await api.call("GET", "/agents")
    local_state = next(a for a in data["agents"] if a["name"] == "local")
    assert local_state["state"] == "cooling_down" and local_state["cooldown_remaining_s"] > 30


@pytest.mark.real
async def test_local_task_on_real_smollm2_records_tokens(
    make_settings: MakeSettings, llama_server: str, daemon: Any, tmp_path: Path
) -> None:
    settings = make_settings(pool=pool_settings(), local_model=LocalModelSettings(
        endpoint=llama_server, model="smollm2", max_tokens=24))
    _, api = await daemon(settings)
    done = await api.wait((await api.submit(prompt="Say hi.", agent="auto"))["id"], 120)
    assert done["state"] == "succeeded", done
    execution = done["executions"][0]
    assert execution["tokens_in"] > 0 and 0 < execution["tokens_out"] <= 24
    assert execution["cost_usd"] == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "corral.db")) as conn:
        row = conn.execute("SELECT tokens_in, tokens_out FROM executions").fetchone()
    assert row == (execution["tokens_in"], execution["tokens_out"])


async def test_follow_log_of_a_queued_task_streams_live_until_it_ends(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="first " * 20, chunks=20, chunk_delay_s=0.02),
              Reply(parts=tuple(f"w{i} " for i in range(30)), chunk_delay_s=0.02))
    _, api = await daemon(make_settings(pool=pool_settings(local=1), local_model=local(fake)))
    await api.submit(prompt="first", agent="local")
    second = await api.submit(prompt="second", agent="local")
    lines: list[bytes] = []
    async with api.session.get(f"http://corral/tasks/{second['id']}/log",
                               params={"follow": "1"}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            lines.append(line)
            if len(lines) == 3:  # streamed while the task is still running
                _, task = await api.call("GET", f"/tasks/{second['id']}")
                assert task["state"] == "running"
    events = [json.loads(line) for line in lines]
    assert events[0]["type"] == "system" and events[-1]["type"] == "result"
    assert events[-1]["result"] == "".join(f"w{i} " for i in range(30))


async def test_shutdown_in_the_middle_of_a_claim_hands_the_claimed_tasks_back(
    store: SqliteStore, tmp_path: Path, fake_openai: MakeFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = await fake_openai()
    fake.default = Reply(text="slow " * 40, chunks=40, chunk_delay_s=0.05)
    claimed, release = asyncio.Event(), asyncio.Event()
    claim_many = store.claim_many

    async def claim_then_wait(*args: Any, **kwargs: Any) -> Any:
        result = await claim_many(*args, **kwargs)  # the claim is committed...
        if result.tasks:
            claimed.set()
            await release.wait()  # ...and shutdown begins before the pool has its jobs
        return result

    monkeypatch.setattr(store, "claim_many", claim_then_wait)
    async with Client(fake.endpoint, "m") as client:
        pool = Pool(store, {"local": LocalRunner(client)}, None, pool_settings(local=2),
                    tmp_path / "executions", grace_s=0)
        await pool.start()
        task = await pool.submit("hello", agent="local")
        await claimed.wait()
        shutting = asyncio.create_task(pool.shutdown())

        async def stopped_accepting() -> bool:
            return not pool.accepting

        await until(stopped_accepting)
        release.set()
        await shutting
    back = await store.get_task(task.id, with_executions=True)
    assert back.state == TaskState.QUEUED and back.attempts == 0
    assert [e.status for e in back.executions] == [ExecStatus.INTERRUPTED]


async def test_a_task_rate_limited_past_the_cap_fails_instead_of_looping(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    fake.default = Status(429, retry_after="0")
    settings = pool_settings()
    settings.max_rate_limit_requeues = 2
    _, api = await daemon(make_settings(pool=settings, local_model=local(fake)))
    done = await api.wait((await api.submit(prompt="x", agent="local"))["id"])
    assert done["state"] == "failed"
    assert done["error"].startswith("rate limited 3 times; last reset ")
    assert [e["status"] for e in done["executions"]] == ["rate_limited"] * 3
    assert done["attempts"] == 1  # rate limits never spent the task's attempts


async def test_every_delayed_retry_runs_on_time_after_a_restart(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any, tmp_path: Path
) -> None:
    """The store's run_after is the one record of when a retry is due."""
    import time

    fake = await fake_openai()
    async with SqliteStore(tmp_path / "data" / "corral.db") as store:
        now = time.time()
        ids = []
        for delay in (0.3, 0.8, 1.3):
            task = await store.create_task(f"later {delay}", agent="local", pinned=True)
            await store.update_task(task.id, run_after=now + delay)
            ids.append(task.id)
    started = time.monotonic()
    _, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake)))
    for task_id in ids:
        assert (await api.wait(task_id, timeout_s=10))["state"] == "succeeded"
    assert time.monotonic() - started < 5  # not the dispatcher's 60 s idle wait


async def test_without_git_the_changestat_comes_from_the_agents_words(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any, tmp_path: Path
) -> None:
    fake = await fake_openai()
    # The local agent answers at once, in words that end with a git-style summary.
    fake.push(Reply(text="Done.\n 2 files changed, 7 insertions(+), 1 deletion(-)\n"))
    plain = tmp_path / "not-a-repo"
    plain.mkdir()
    _, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake),
                                        local_agent=LocalAgentSettings(actions="tools")))
    done = await api.wait((await api.submit(prompt="x", agent="local", workdir=str(plain)))["id"])
    execution = done["executions"][0]
    assert (execution["files_changed"], execution["insertions"], execution["deletions"]) == (
        2, 7, 1)


async def test_with_no_agent_at_all_the_error_says_why_each_is_unavailable(
    make_settings: MakeSettings, daemon: Any
) -> None:
    _, api = await daemon(make_settings(pool=pool_settings()))
    done = await api.wait((await api.submit(prompt="x", agent="claude"))["id"])
    assert done["state"] == "failed"
    assert done["error"].startswith(
        "no agent can run this task: claude is unavailable: disabled in [claude]")
    assert "local is unavailable: [local_model] endpoint is empty" in done["error"]


async def test_the_tasks_timeout_is_the_one_bound_on_a_local_run(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    """[local_model] timeout_seconds is only the default for tasks that name none."""
    fake = await fake_openai()
    fake.default = Reply(text="slow but steady " * 10, chunks=10, chunk_delay_s=0.15)
    lm = LocalModelSettings(endpoint=fake.endpoint, model="m", timeout_seconds=0.5)
    _, api = await daemon(make_settings(pool=pool_settings(), local_model=lm))
    named = await api.submit(prompt="x", agent="local", timeout_s=30, max_retries=0)
    default = await api.submit(prompt="y", agent="local", max_retries=0)
    done = await api.wait(named["id"])
    assert done["state"] == "succeeded", done["error"]
    cut = await api.wait(default["id"])
    assert cut["state"] == "cancelled" and "timed out after 0.5s" in cut["error"]
    assert cut["executions"][0]["status"] == "timed_out"


async def test_a_follower_is_woken_by_the_log_not_by_polling_and_leaves_with_its_client(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    fake.push(Reply(parts=tuple(f"w{i} " for i in range(12)), chunk_delay_s=0.15))
    pool, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake)))
    task = await api.submit(prompt="slow", agent="local")

    async def running() -> bool:
        _, t = await api.call("GET", f"/tasks/{task['id']}")
        return bool(t["state"] == "running")

    await until(running)
    reads = 0
    real_read = pool.store._db.read

    async def counted(fn: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real_read(fn)

    pool.store._db.read = counted
    lines = 0
    async with api.session.get(f"http://corral/tasks/{task['id']}/log",
                               params={"follow": "1"}) as resp:
        async for _line in resp.content:
            lines += 1
            if lines == 6:
                break  # the client hangs up while the task still runs
    # About a second of following cost a read or two (finding the execution), not one per
    # 50 ms; and once the client is gone its wake-ups are gone too.
    assert reads <= 3

    async def follower_gone() -> bool:
        return len(pool._watchers) == 0

    await until(follower_gone, timeout_s=5)


async def test_a_reply_to_a_running_task_waits_then_continues_with_the_earlier_turns(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any
) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="first answer", chunks=10, chunk_delay_s=0.1), Reply(text="second"))
    _, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake)))
    task = await api.submit(prompt="first question", agent="local")

    async def running() -> bool:
        _, t = await api.call("GET", f"/tasks/{task['id']}")
        return bool(t["state"] == "running")

    await until(running)
    status, replied = await api.call("POST", f"/tasks/{task['id']}/reply",
                                     json={"prompt": "and then?"})
    assert status == 200 and replied["state"] == "running"  # kept until the first is done

    async def two_done() -> bool:
        _, t = await api.call("GET", f"/tasks/{task['id']}")
        return t["state"] == "succeeded" and len(t["executions"]) == 2

    await until(two_done)
    _, done = await api.call("GET", f"/tasks/{task['id']}")
    assert [e["prompt"] for e in done["executions"]] == ["first question", "and then?"]
    assert done["executions"][1]["summary"] == "second"
    messages = fake.requests[1]["body"]["messages"]
    assert messages == [{"role": "user", "content": "first question"},
                        {"role": "assistant", "content": "first answer"},
                        {"role": "user", "content": "and then?"}]


async def test_reply_checks(make_settings: MakeSettings, fake_openai: MakeFake,
                            daemon: Any) -> None:
    fake = await fake_openai()
    _, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake)))
    status, error = await api.call("POST", "/tasks/999/reply", json={"prompt": "x"})
    assert status == 404 and error["error"]["code"] == "not_found"
    task = await api.wait((await api.submit(prompt="q", agent="local"))["id"])
    status, error = await api.call("POST", f"/tasks/{task['id']}/reply", json={"prompt": " "})
    assert status == 400 and "prompt is empty" in error["error"]["message"]
    status, error = await api.call("POST", f"/tasks/{task['id']}/merge", json={})
    assert status == 409 and "runs in place" in error["error"]["message"]


async def test_workspace_input_is_checked_at_submit(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Any, tmp_path: Path
) -> None:
    from tests.gitrepo import git, make_repo

    fake = await fake_openai()
    _, api = await daemon(make_settings(pool=pool_settings(), local_model=local(fake)))
    repo = make_repo(tmp_path / "repo")
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    plain = tmp_path / "plain"
    plain.mkdir()
    for body, needle in [
        ({"workdir": str(repo), "base": "no-such-ref"}, "is not a commit"),
        ({"workdir": str(empty)}, "has no commits yet"),
        ({"workdir": str(repo / ".git")}, "bare repository or a .git folder"),
        ({"workdir": str(plain), "base": "main"}, "not in a git repository"),
    ]:
        status, error = await api.call("POST", "/tasks", json={"prompt": "x", **body})
        assert status == 400, error
        assert needle in error["error"]["message"]
    in_place = await api.submit(prompt="x", agent="local", workdir=str(repo), isolate=False)
    assert in_place["workspace"] is None and in_place["isolate"] is False
    isolated = await api.submit(prompt="Tidy up the README", agent="local",
                                workdir=str(repo / "src"))
    assert isolated["workspace"]["branch"] == f"corral/{isolated['id']}-tidy-up-the-readme"
    assert isolated["workspace"]["subdir"] == "src"
    done = await api.wait(isolated["id"])
    init = read_events(Path(done["executions"][0]["log_dir"]) / "stdout.log")[0]
    assert init["cwd"] == str(Path(done["workspace"]["path"]) / "src")  # its subfolder
