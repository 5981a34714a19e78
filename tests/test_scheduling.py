"""When a task may run: dependencies, spend caps, schedules, and word when it ends."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from corral.config import (
    BudgetSettings,
    ClaudeSettings,
    LocalAgentSettings,
    LocalModelSettings,
    NotifySettings,
    PoolSettings,
    Price,
    Settings,
)
from corral.models import Task, TaskState
from corral.notify import Notifier
from corral.schedule import Scheduler
from corral.storage.sqlite import SqliteStore
from tests import peers
from tests.conftest import StartDaemon, until
from tests.daemon_proc import cli
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.base import Reply, Status
from tests.fakes.openai import FakeOpenAI, ToolCalls
from tests.gitrepo import git, make_repo

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
MakeSettings = Callable[..., Settings]
Start = StartDaemon


def local(fake: FakeOpenAI, **extra: Any) -> LocalModelSettings:
    return LocalModelSettings(endpoint=fake.endpoint, model="fake-model", **extra)


def one_slot() -> PoolSettings:
    return PoolSettings(max_workers=1, retry_base_seconds=0.05, retry_max_seconds=0.1,
                        default_max_retries=0)


# -- dependencies ------------------------------------------------------------------------------


async def test_a_chain_of_five_with_a_failure_in_the_middle(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start
) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="one"), Reply(text="two"), Status(400))  # the third fails for good
    _, api = await daemon(make_settings(pool=one_slot(), local_model=local(fake)))
    ids: list[int] = []
    for n in range(5):
        task = await api.submit(prompt=f"step {n}", agent="local", after=ids[-1:])
        assert task["state"] == ("queued" if n == 0 else "blocked")
        ids.append(task["id"])
    done = [await api.wait(i) for i in ids]
    assert [d["state"] for d in done] == [
        "succeeded", "succeeded", "failed", "cancelled", "cancelled"]
    assert done[3]["error"] == f"dependency {ids[2]} failed"
    assert done[4]["error"] == f"dependency {ids[3]} cancelled"
    assert done[3]["executions"] == [] and len(fake.requests) == 3  # never ran
    assert done[2]["depends_on"] == [ids[1]] and done[2]["dependents"] == [ids[3]]
    # Retrying the failed task unblocks nothing that was already cancelled, and says so.
    status, retried = await api.call("POST", f"/tasks/{ids[2]}/retry")
    assert status == 200 and f"({ids[3]})" in retried["note"]
    assert (await api.wait(ids[2]))["state"] == "succeeded"
    _, after = await api.call("GET", f"/tasks/{ids[3]}")
    assert after["state"] == "cancelled"


async def test_readiness_is_decided_at_submit(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start
) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="fine"), Status(400))
    _, api = await daemon(make_settings(pool=one_slot(), local_model=local(fake)))
    good = await api.wait((await api.submit(prompt="good", agent="local"))["id"])
    bad = await api.wait((await api.submit(prompt="bad", agent="local"))["id"])
    assert (good["state"], bad["state"]) == ("succeeded", "failed")
    ready = await api.submit(prompt="after good", agent="local", after=[good["id"]])
    assert ready["state"] == "queued"
    doomed = await api.submit(prompt="after bad", agent="local", after=[good["id"], bad["id"]])
    assert doomed["state"] == "cancelled" and doomed["error"] == f"dependency {bad['id']} failed"
    status, error = await api.call("POST", "/tasks", json={
        "prompt": "x", "agent": "local", "after": [good["id"], 99999]})
    assert status == 400 and "99999" in error["error"]["message"]
    code, out, _ = await cli("ls", "--state", "blocked", socket=api.socket_path)
    assert code == 0 and out.strip() == "no tasks"


async def test_cancelling_a_blocked_task_cancels_what_waits_for_it(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start
) -> None:
    fake = await fake_openai()
    fake.default = Reply(text="slow", chunks=20, chunk_delay_s=0.1)
    _, api = await daemon(make_settings(pool=one_slot(), local_model=local(fake)))
    first = await api.submit(prompt="long", agent="local")
    second = await api.submit(prompt="then", agent="local", after=[first["id"]])
    third = await api.submit(prompt="and then", agent="local", after=[second["id"]])
    status, cancelled = await api.call("POST", f"/tasks/{second['id']}/cancel")
    assert status == 200 and cancelled["state"] == "cancelled"
    assert (await api.wait(third["id"]))["error"] == f"dependency {second['id']} cancelled"
    assert (await api.wait(first["id"]))["state"] == "succeeded"


async def test_a_dependent_in_the_same_repository_builds_on_its_dependencys_branch(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start
) -> None:
    repo = make_repo(tmp_path / "repo")
    fake = await fake_openai()
    fake.push(ToolCalls([("Write", {"file_path": "plan.md", "content": "the plan\n"})]),
              Reply(text="planned"),
              ToolCalls([("Bash", {"command": "cat plan.md"})]),
              Reply(text="implemented"))
    _, api = await daemon(make_settings(
        pool=one_slot(), local_model=local(fake),
        local_agent=LocalAgentSettings(actions="tools")))
    plan = await api.submit(prompt="plan it", agent="local", workdir=str(repo))
    build = await api.submit(prompt="build it", agent="local", workdir=str(repo),
                             after=[plan["id"]])
    assert build["workspace"]["base_branch"] == plan["workspace"]["branch"]
    plan_done, build_done = await api.wait(plan["id"]), await api.wait(build["id"])
    assert plan_done["state"] == build_done["state"] == "succeeded"
    assert build_done["workspace"]["base_commit"] == plan_done["executions"][0]["commit"]
    read = fake.requests[3]["body"]["messages"][-1]
    assert read["role"] == "tool" and "the plan" in read["content"]  # it saw plan.md
    assert git(repo, "show", f"{build_done['workspace']['branch']}:plan.md") == "the plan\n"


# -- word when a task ends ---------------------------------------------------------------------


class Receiver:
    """A loopback webhook receiver: answers with ``statuses`` in turn (then 200), or hangs."""

    def __init__(self, statuses: list[int] | None = None, hang: bool = False) -> None:
        self.statuses = list(statuses or [])
        self.hang = hang
        self.bodies: list[dict[str, Any]] = []
        self.got = asyncio.Event()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _post(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.got.set()
        if self.hang:
            await self._release.wait()
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._post)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


async def test_the_webhook_gets_the_finished_task(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start
) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="all done", input_tokens=11, output_tokens=5))
    async with Receiver() as receiver:
        _, api = await daemon(make_settings(local_model=local(fake),
                                            notify=NotifySettings(webhook_url=receiver.url)))
        task = await api.wait((await api.submit(prompt="tell me", agent="local"))["id"])
        await asyncio.wait_for(receiver.got.wait(), 10)
    body = receiver.bodies[0]
    assert (body["id"], body["state"], body["summary"]) == (task["id"], "succeeded", "all done")
    assert (body["tokens_in"], body["tokens_out"], body["cost_usd"]) == (11, 5, 0.0)
    assert body["event"] == "task.finished" and body["workspace"] is None


async def test_a_failing_receiver_is_tried_again_with_backoff(
    store: SqliteStore, tmp_path: Path
) -> None:
    task = await store.create_task("x", agent="local", pinned=True)
    await store.update_task(task.id, state=TaskState.FAILED, error="boom")
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    receiver = Receiver([500, 503])
    async with receiver, Notifier(store, NotifySettings(webhook_url=receiver.url),
                                  sleep=no_wait) as notifier:
        notifier.task_finished(task.id)

        async def three_tries() -> bool:
            return len(receiver.bodies) == 3

        await until(three_tries)
    assert len(waits) == 2 and waits[0] < waits[1]
    assert receiver.bodies[-1]["error"] == "boom"


async def test_a_hanging_or_absent_receiver_holds_up_nothing(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = await fake_openai()
    async with Receiver(hang=True) as receiver:
        _, api = await daemon(make_settings(local_model=local(fake), notify=NotifySettings(
            webhook_url=receiver.url, webhook_timeout_seconds=60)))
        started = time.monotonic()
        tasks = [await api.submit(prompt=f"t{n}", agent="local") for n in range(6)]
        done = [await api.wait(t["id"]) for t in tasks]
        assert all(d["state"] == "succeeded" for d in done)
        assert time.monotonic() - started < 10  # four deliveries hang; every task went on
        await asyncio.wait_for(receiver.got.wait(), 10)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/hook"
    store_path = make_settings().daemon.data_dir / "corral.db"
    async with SqliteStore(store_path) as store:
        ended = await store.create_task("y", agent="local", pinned=True)
        await store.update_task(ended.id, state=TaskState.SUCCEEDED)
        async with Notifier(store, NotifySettings(webhook_url=dead, webhook_attempts=2),
                            sleep=lambda _s: asyncio.sleep(0)) as notifier:
            notifier.task_finished(ended.id)

            async def logged() -> bool:
                return "failed after 2 attempts" in caplog.text

            await until(logged)


async def test_the_command_gets_the_one_line_summary_as_one_argument(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start, tmp_path: Path
) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="summary; $(rm -rf /) `and` more"))
    seen = tmp_path / "argv.json"
    script = tmp_path / "record"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"open({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    script.chmod(0o755)
    _, api = await daemon(make_settings(local_model=local(fake), notify=NotifySettings(
        command=[str(script), "corral"])))
    task = await api.wait((await api.submit(prompt="x", agent="local"))["id"])

    async def recorded() -> bool:
        return seen.exists() and seen.stat().st_size > 0

    await until(recorded)
    assert json.loads(seen.read_text()) == [
        "corral", f"task {task['id']} succeeded: summary; $(rm -rf /) `and` more"]


# -- spend caps --------------------------------------------------------------------------------


class Clock:
    """The daemon's clock, moved on by the test (its event loop keeps real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.mark.real
async def test_a_daily_cap_pauses_claude_while_auto_work_flows_to_local_until_the_day_turns(
    make_settings: MakeSettings, fake_openai: MakeFake, fake_anthropic: FakeAnthropic,
    claude_env: dict[str, str], daemon: Start,
) -> None:
    fake = await fake_openai()
    fake.default = Reply(text=json.dumps({"agent_type": "claude", "model": "",
                                          "reason": "claude, please"}))
    clock = Clock()
    settings = make_settings(
        claude=ClaudeSettings(binary=str(peers.claude_bin())), local_model=local(fake),
        local_agent=LocalAgentSettings(mode="text"),
        budget=BudgetSettings(daily_usd={"claude": 0.00001}))
    pool, api = await daemon(settings, claude_env, clock=clock)
    spent = await api.wait((await api.submit(prompt="spend", agent="claude"))["id"], 120)
    assert spent["state"] == "succeeded" and spent["executions"][0]["cost_usd"] > 0.00001
    _, agents = await api.call("GET", "/agents")
    claude = next(a for a in agents["agents"] if a["name"] == "claude")
    assert claude["state"] == "paused" and "its daily cap" in claude["paused_because"]
    assert claude["spend_today_usd"] == spent["executions"][0]["cost_usd"]
    pinned = await api.submit(prompt="claude only", agent="claude")
    auto = await api.wait((await api.submit(prompt="anyone"))["id"], 60)
    assert auto["state"] == "succeeded" and auto["agent"] == "local"  # flowed around the pause
    _, waiting = await api.call("GET", f"/tasks/{pinned['id']}")
    assert waiting["state"] == "queued" and waiting["executions"] == []
    _, out, _ = await cli("agents", socket=api.socket_path)
    assert "paused until" in out
    clock.offset += 86400  # the next day
    pool.wake()
    assert (await api.wait(pinned["id"], 120))["state"] == "succeeded"


async def test_a_log_line_warns_once_at_80_percent_of_a_cap(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = await fake_openai()
    fake.default = Reply(text="x", input_tokens=30, output_tokens=10)  # $0.40 a run
    _, api = await daemon(make_settings(
        local_model=local(fake), local_agent=LocalAgentSettings(mode="text"),
        prices={"fake-model": Price(input=10_000, output=10_000)},
        budget=BudgetSettings(daily_usd={"local": 0.45}, monthly_usd={"local": 100.0})))
    with caplog.at_level("WARNING", logger="corral.executor.budget"):
        for n in range(2):  # $0.40, then $0.80: at 80 % of the day's cap and past it
            await api.wait((await api.submit(prompt=f"t{n}", agent="local"))["id"])
    warnings = [r.getMessage() for r in caplog.records if r.name == "corral.executor.budget"]
    assert warnings == ["local has spent $0.4 of its daily cap of $0.45"]
    _, agents = await api.call("GET", "/agents")
    assert next(a for a in agents["agents"] if a["name"] == "local")["state"] == "paused"
    # What corral estimated is told apart from what an agent reported.
    _, stats = await api.call("GET", "/stats")
    local_stats = stats["agents"]["local"]
    assert local_stats["cost_usd"] == local_stats["cost_estimated_usd"] == pytest.approx(0.8)
    _, out, _ = await cli("stats", "--by", "agent", socket=api.socket_path)
    assert "$    0.8000 ($0.8000 estimated)" in out


async def test_a_per_task_cap_stops_a_local_agent_run(
    tmp_path: Path, make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start
) -> None:
    fake = await fake_openai()
    fake.default = ToolCalls([("Bash", {"command": "true"})])  # it would go on and on
    ws = tmp_path / "ws"
    ws.mkdir()
    # 50 tokens in and 10 out per turn, at $10,000 a million: $0.60 a turn.
    _, api = await daemon(make_settings(
        local_model=local(fake), local_agent=LocalAgentSettings(actions="tools"),
        prices={"fake-model": Price(input=10_000, output=10_000)}))
    done = await api.wait((await api.submit(prompt="loop", agent="local", workdir=str(ws),
                                            max_cost_usd=1.0))["id"])
    execution = done["executions"][0]
    assert done["state"] == "failed" and "budget of $1 reached" in done["error"]
    assert execution["cost_estimated"] and execution["cost_usd"] == pytest.approx(1.2)
    assert len(fake.requests) == 2  # stopped after the second turn, not at max_turns
    _, out, _ = await cli("show", str(done["id"]), socket=api.socket_path)
    assert "(estimated)" in out


@pytest.mark.real
async def test_claude_is_given_the_cap_and_stops_itself(
    make_settings: MakeSettings, fake_openai: MakeFake, fake_anthropic: FakeAnthropic,
    claude_env: dict[str, str], daemon: Start,
) -> None:
    fake = await fake_openai()
    _, api = await daemon(make_settings(claude=ClaudeSettings(binary=str(peers.claude_bin())),
                                        local_model=local(fake)), claude_env)
    done = await api.wait((await api.submit(prompt="x", agent="claude",
                                            max_cost_usd=0.00001))["id"], 120)
    assert done["state"] == "failed"
    assert done["error"] == "budget of $1e-05 reached (claude stopped itself)"


async def test_stats_per_day_agent_and_model(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start
) -> None:
    fake = await fake_openai()
    fake.default = Reply(text="x", input_tokens=3, output_tokens=2)
    _, api = await daemon(make_settings(local_model=local(fake)))
    for n in range(3):
        await api.wait((await api.submit(prompt=f"t{n}", agent="local"))["id"])
    _, by_agent = await api.call("GET", "/stats", params={"by": "agent"})
    assert by_agent["groups"] == [{"agent": "local", "executions": 3, "cost_usd": 0.0,
                                   "cost_estimated_usd": 0.0, "tokens_in": 9, "tokens_out": 6}]
    today = time.strftime("%Y-%m-%d")
    code, out, _ = await cli("stats", "--by", "day", "--since", today, socket=api.socket_path)
    assert code == 0 and out.startswith(today) and "3 runs" in out
    _, none = await api.call("GET", "/stats", params={"by": "model", "since": "2999-01-01"})
    assert none["groups"] == []
    status, _ = await api.call("GET", "/stats", params={"by": "colour"})
    assert status == 400


# -- schedules ---------------------------------------------------------------------------------


async def test_a_schedule_fires_skips_while_its_task_runs_and_catches_up_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="corral.schedule")
    clock = Clock()
    submitted: list[Task] = []
    async with SqliteStore(tmp_path / "s.db", clock=clock) as store:

        async def submit(prompt: str, **options: Any) -> Task:
            task = await store.create_task(prompt, **options)
            submitted.append(task)
            return task

        scheduler = Scheduler(store, submit, clock=clock)
        async with scheduler:
            added = await scheduler.add("*/5 * * * *", "tidy up", {"priority": 3})
            assert added.next_at is not None and added.next_at > clock()
            clock.offset += added.next_at - clock() + 1  # just past the first firing
            scheduler.wake()

            async def fired(n: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return len(submitted) == n
                return check

            await until(await fired(1))
            first = submitted[0]
            assert first.schedule_id == added.id and first.priority == 3
            await store.update_task(first.id, state=TaskState.RUNNING)  # still running
            clock.offset += 300
            scheduler.wake()

            async def skipped() -> bool:
                return "skipped a firing" in caplog.text

            await until(skipped)
            assert len(submitted) == 1
            await store.update_task(first.id, state=TaskState.SUCCEEDED)
        # The daemon is down for an hour: twelve slots missed.
        clock.offset += 3600
        async with Scheduler(store, submit, clock=clock):
            await until(await fired(2))
            listed = (await scheduler.list())[0]
            assert listed.last_task_id == submitted[1].id
            assert listed.next_at is not None and listed.next_at > clock()
        assert len(submitted) == 2  # once, not once per missed slot


async def test_schedules_through_the_cli(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: Start
) -> None:
    fake = await fake_openai()
    _, api = await daemon(make_settings(local_model=local(fake)))
    sock = api.socket_path
    code, out, err = await cli("schedule", "add", "0 9 * * 1-5", "morning report",
                               "--agent", "local", "--json", socket=sock)
    assert code == 0, err
    schedule = json.loads(out)
    assert schedule["options"] == {"agent": "local", "priority": 0} and schedule["next_at"]
    code, out, _ = await cli("schedule", "ls", socket=sock)
    assert code == 0 and "0 9 * * 1-5" in out and "morning report" in out
    code, _, err = await cli("schedule", "add", "61 * * * *", "never", socket=sock)
    assert code == 1 and "'61 * * * *' is not a cron expression" in err
    code, _, err = await cli("schedule", "add", "* * * * *", "x", "--agent", "robot",
                             socket=sock)
    assert code == 1 and "unknown agent" in err
    code, out, _ = await cli("schedule", "rm", str(schedule["id"]), socket=sock)
    assert code == 0
    code, _, err = await cli("schedule", "rm", str(schedule["id"]), socket=sock)
    assert code == 1 and "does not exist" in err
