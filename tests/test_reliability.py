"""Crashes, shutdown and peer faults: nothing is lost, no child outlives its execution."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests import peers
from tests.conftest import ApiClient, until
from tests.daemon_proc import DaemonProcess
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.base import Hang, Reply
from tests.fakes.openai import FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]


def processes_with_env(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment mentions ``marker``: our agents' children."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def write_config(tmp_path: Path, sock: Path, fake: FakeOpenAI, extra: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nsocket_path = "{sock}"\ndata_dir = "{tmp_path / "data"}"\n'
        "shutdown_grace_seconds = 1.0\n"
        "[pool]\nkill_grace_seconds = 1.0\nretry_base_seconds = 0.05\nretry_max_seconds = 0.2\n"
        f'[local_model]\nendpoint = "{fake.endpoint}"\nmodel = "fake-model"\n'
        "[gemini]\nenabled = false\n" + extra
    )
    return config


def claude_section(claude_env: dict[str, str]) -> str:
    env = ", ".join(f'{k} = "{v}"' for k, v in claude_env.items() if k != "PATH")
    return f'[claude]\nbinary = "{peers.claude_bin()}"\nenv = {{ {env} }}\n'


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_sigkill_at_random_moments_loses_nothing(
    tmp_path: Path, fake_openai: MakeFake, fake_anthropic: FakeAnthropic,
    claude_env: dict[str, str], api_client: Callable[[Path], ApiClient],
    socket_path: Callable[[], Path],
) -> None:
    fake = await fake_openai()
    fake.default = Reply(text="local work done", chunks=5, chunk_delay_s=0.02)
    fake_anthropic.default = Reply(text="claude work done", chunks=8, chunk_delay_s=0.15)
    sock = socket_path()
    config = write_config(tmp_path, sock, fake, claude_section(claude_env))
    daemon = DaemonProcess(config, sock)
    await daemon.start()
    api = api_client(sock)
    ids = []
    for n in range(300):
        agent = "claude" if n % 10 == 0 else "local"
        ids.append((await api.submit(prompt=f"task {n}", agent=agent, max_retries=6))["id"])
    rng = random.Random(1234)
    for _ in range(6):
        await asyncio.sleep(rng.uniform(0.2, 1.2))  # a random moment in the middle of the work
        assert daemon.proc is not None
        daemon.proc.kill()
        await daemon.proc.wait()
        await daemon.start()
        api = api_client(sock)

    async def all_final() -> bool:
        _, data = await api.call("GET", "/tasks", params={"limit": "1000"})
        return all(t["state"] in ("succeeded", "failed", "cancelled") for t in data["tasks"])

    await until(all_final, timeout_s=300, every_s=0.5)
    await daemon.stop()

    db = sqlite3.connect(tmp_path / "data" / "corral.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        states = dict(db.execute("SELECT id, state FROM tasks").fetchall())
        assert sorted(states) == sorted(ids)
        assert set(states.values()) <= {"succeeded", "failed"}
        rows = db.execute("SELECT task_id, started_at, finished_at, status FROM executions"
                          " ORDER BY task_id, started_at").fetchall()
    finally:
        db.close()
    by_task: dict[int, list[tuple[float, float]]] = {}
    for task_id, started, finished, status in rows:
        assert finished is not None and status != "running"
        by_task.setdefault(task_id, []).append((started, finished))
    for spans in by_task.values():
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, "a task ran twice at the same time"
    assert processes_with_env(claude_env["HOME"]) == [], "orphan agent processes remain"


@pytest.mark.real
async def test_sigterm_interrupts_running_tasks_back_to_queue_and_kills_children(
    tmp_path: Path, fake_openai: MakeFake, fake_anthropic: FakeAnthropic,
    claude_env: dict[str, str], api_client: Callable[[Path], ApiClient],
    socket_path: Callable[[], Path],
) -> None:
    fake = await fake_openai()
    fake_anthropic.default = Hang()
    sock = socket_path()
    daemon = DaemonProcess(write_config(tmp_path, sock, fake, claude_section(claude_env)), sock)
    await daemon.start()
    api = api_client(sock)
    tasks = [await api.submit(prompt=f"hang {n}", agent="claude") for n in range(2)]

    async def both_asking() -> bool:
        return len(fake_anthropic.requests) >= 2

    await until(both_asking, timeout_s=60)
    assert len(processes_with_env(claude_env["HOME"])) >= 2
    started = time.monotonic()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.send_signal(signal.SIGTERM)  # a second signal is harmless
    assert await daemon.stop() == 0
    assert time.monotonic() - started < 15
    assert processes_with_env(claude_env["HOME"]) == []
    assert not sock.exists()
    db = sqlite3.connect(tmp_path / "data" / "corral.db")
    try:
        for task in tasks:
            state, attempts = db.execute("SELECT state, attempts FROM tasks WHERE id = ?",
                                         (task["id"],)).fetchone()
            assert (state, attempts) == ("queued", 0)
            (status,) = db.execute("SELECT status FROM executions WHERE task_id = ?",
                                   (task["id"],)).fetchone()
            assert status == "interrupted"
    finally:
        db.close()


async def test_submit_after_shutdown_is_refused_and_shutdown_twice_is_harmless(
    make_settings: Callable[..., Any], fake_openai: MakeFake,
) -> None:
    from corral.config import LocalModelSettings
    from corral.daemon import running_daemon
    from corral.errors import ShuttingDown

    fake = await fake_openai()
    settings = make_settings(local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"))
    async with running_daemon(settings, {}) as pool:
        await pool.shutdown()
        await pool.shutdown()
        with pytest.raises(ShuttingDown):
            await pool.submit("late", agent="local")


async def test_disk_failure_on_log_folder_is_recorded_and_daemon_keeps_serving(
    make_settings: Callable[..., Any], fake_openai: MakeFake,
    api_client: Callable[[Path], ApiClient], tmp_path: Path,
) -> None:
    from corral.config import LocalModelSettings
    from corral.daemon import running_daemon

    fake = await fake_openai()
    settings = make_settings(local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"))
    executions = tmp_path / "data" / "executions"
    executions.mkdir(parents=True)
    (executions / "1").write_text("a file where execution 1's folder should go")
    async with running_daemon(settings, {}):
        api = api_client(settings.daemon.socket_path)
        broken = await api.wait((await api.submit(prompt="x", agent="local", max_retries=0))["id"])
        assert broken["state"] == "failed"
        assert "local runner error" in broken["error"] and "executions/1" in broken["error"]
        fine = await api.wait((await api.submit(prompt="y", agent="local"))["id"])
        assert fine["state"] == "succeeded"


async def test_flood_of_1000_concurrent_submits(
    make_settings: Callable[..., Any], fake_openai: MakeFake,
    api_client: Callable[[Path], ApiClient],
) -> None:
    import aiohttp

    from corral.config import LocalModelSettings
    from corral.daemon import running_daemon

    fake = await fake_openai()
    fake.default = Reply(text="ok", chunks=1)
    settings = make_settings(local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"))
    async with running_daemon(settings, {}):
        connector = aiohttp.UnixConnector(path=str(settings.daemon.socket_path), limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def submit(n: int) -> int:
                async with session.post("http://corral/tasks",
                                        json={"prompt": f"f{n}", "agent": "local"}) as resp:
                    assert resp.status == 201, await resp.text()
                    return int((await resp.json())["id"])

            ids = await asyncio.gather(*(submit(n) for n in range(1000)))
        assert len(set(ids)) == 1000
        api = api_client(settings.daemon.socket_path)

        async def all_done() -> bool:
            _, stats = await api.call("GET", "/stats")
            return int(stats["tasks"]["succeeded"]) == 1000

        await until(all_done, timeout_s=120, every_s=0.2)



async def test_second_daemon_on_the_same_data_dir_is_refused(
    make_settings: Callable[..., Any], fake_openai: MakeFake, socket_path: Callable[[], Path],
) -> None:
    from corral.config import DaemonSettings, LocalModelSettings
    from corral.daemon import DataDirInUse, running_daemon

    fake = await fake_openai()
    first = make_settings(local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"))
    second = first.model_copy(update={"daemon": DaemonSettings(
        socket_path=socket_path(), data_dir=first.daemon.data_dir)})
    async with running_daemon(first, {}):
        with pytest.raises(DataDirInUse, match="already using"):
            async with running_daemon(second, {}):
                pass
        assert first.daemon.socket_path.exists()
    async with running_daemon(second, {}):  # free again once the first one stopped
        pass


async def test_startup_kills_only_the_exact_process_a_dead_daemon_recorded(
    tmp_path: Path, fake_openai: MakeFake, socket_path: Callable[[], Path]
) -> None:
    """A recorded pid now held by an unrelated process (even one named "node") is left alone."""
    from corral.executor.pool import balance
    from corral.host import procs
    from corral.models import ProcessIdentity
    from corral.storage.sqlite import SqliteStore
    from tests.test_runners import group_alive

    async def spawn(*argv: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*argv, start_new_session=True)

    sleeper = ("python3", "-c", "import time; time.sleep(60)")
    agent = await spawn(*sleeper, "claude")
    stranger = await spawn(*sleeper, "node")  # what a reused pid looks like after a reboot
    other_boot = await spawn(*sleeper, "node")
    try:
        async with SqliteStore(tmp_path / "data" / "corral.db") as store:
            for _ in range(3):
                await store.create_task("left running", agent="local", pinned=True)
            claimed = (await store.claim_many({"local": 3}, balance, tmp_path, limit=3)).tasks
            exact = procs.identify(agent.pid)
            started = procs.start_ticks(stranger.pid)
            assert started is not None and exact.boot_id is not None
            records = [exact, ProcessIdentity(stranger.pid, started + 1, exact.boot_id),
                       ProcessIdentity(other_boot.pid, procs.start_ticks(other_boot.pid),
                                       "another-boot")]
            for (_, execution), record in zip(claimed, records, strict=True):
                await store.set_execution_process(execution.id, record)
        fake = await fake_openai()
        sock = socket_path()
        daemon = DaemonProcess(write_config(tmp_path, sock, fake, "[claude]\nenabled = false\n"),
                               sock)
        await daemon.start()
        await asyncio.wait_for(agent.wait(), 10)  # the daemon's own agent: killed
        # The kill happened before the daemon answered; the others are still there.
        assert group_alive(stranger.pid) and group_alive(other_boot.pid)
        await daemon.stop()
    finally:
        for proc in (agent, stranger, other_boot):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
