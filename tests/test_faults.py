"""Faults from peers end in a recorded state, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
import email.utils
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.config import LocalModelSettings
from corral.daemon import running_daemon
from corral.executor.claude import ClaudeRunner
from corral.executor.runner import RunRequest, RunStatus
from corral.executor.streamjson import read_events
from tests.conftest import ApiClient, free_port, until
from tests.fakes.base import Behaviour, Drop, Garbage, Hang, Reply, Status, StreamError
from tests.fakes.openai import BareStringError, FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
FAKE_CLI = Path(__file__).parent / "fakes" / "cli" / "misbehave.py"


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize("script, final, first_status", [
    ([Status(429, retry_after="20")], "queued", "rate_limited"),
    ([Status(429, retry_after="http-date:+60")], "queued", "rate_limited"),
    ([Status(503)] * 3, "succeeded", "failed"),
    ([Status(529, retry_after="20")], "queued", "rate_limited"),
    ([Drop(text="cut off")], "succeeded", "failed"),
    ([StreamError(message="boom")], "succeeded", "failed"),
    ([BareStringError(message="boom")], "succeeded", "failed"),
    ([Garbage(text="{{{")], "succeeded", "failed"),
    ([Hang()], "cancelled", "timed_out"),
], ids=["429-seconds", "429-http-date", "503", "529", "reset-mid-stream", "error-event",
        "error-string", "malformed-line", "stops-sending"])
async def test_server_faults_end_recorded(
    make_settings: Callable[..., Any], fake_openai: MakeFake,
    api_client: Callable[[Path], ApiClient], script: list[Behaviour], final: str,
    first_status: str,
) -> None:
    fake = await fake_openai()
    for behaviour in script:
        if isinstance(behaviour, Status) and (behaviour.retry_after or "").startswith("http-date"):
            # Dated when the test runs, not when it was collected.
            seconds = float((behaviour.retry_after or "").split(":+")[1])
            behaviour = Status(behaviour.status, retry_after=http_date(seconds))
        fake.push(behaviour)
    settings = make_settings(local_model=LocalModelSettings(
        endpoint=fake.endpoint, model="m", idle_timeout_seconds=30))
    async with running_daemon(settings, {}):
        api = api_client(settings.daemon.socket_path)
        task = await api.submit(prompt="x", agent="local", max_retries=1, timeout_s=2)
        if final == "queued":
            async def recorded() -> bool:
                _, t = await api.call("GET", f"/tasks/{task['id']}")
                return bool(t["executions"]) and t["executions"][0]["status"] != "running"

            await until(recorded)
            _, done = await api.call("GET", f"/tasks/{task['id']}")
            _, agents = await api.call("GET", "/agents")
            local = next(a for a in agents["agents"] if a["name"] == "local")
            assert local["state"] == "cooling_down"
        else:
            done = await api.wait(task["id"])
        assert done["state"] == final
        assert done["executions"][0]["status"] == first_status
        assert done["executions"][0]["error"]
        status, health = await api.call("GET", "/health")
        assert status == 200 and health["status"] == "ok"


async def test_connection_refused_fails_with_reason(
    make_settings: Callable[..., Any], api_client: Callable[[Path], ApiClient],
) -> None:
    settings = make_settings(local_model=LocalModelSettings(
        endpoint=f"http://127.0.0.1:{free_port()}/v1", model="m"))
    async with running_daemon(settings, {}):
        api = api_client(settings.daemon.socket_path)
        done = await api.wait((await api.submit(prompt="x", agent="local", max_retries=1))["id"])
        assert done["state"] == "failed" and "cannot reach" in done["error"]
        assert len(done["executions"]) == 2


def fake_cli_runner(tmp_path: Path, mode: str, timeout_s: float = 20) -> ClaudeRunner:
    script = tmp_path / "claude"
    script.write_text(f"#!{sys.executable}\nexec(open({str(FAKE_CLI)!r}).read())\n")
    script.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "CORRAL_FAKE_CLI": mode}
    return ClaudeRunner(binary=str(script), model=None, extra_args=[], timeout_s=timeout_s,
                        env=env, kill_grace_s=1.0)


async def test_cli_exiting_non_zero(tmp_path: Path) -> None:
    result = await fake_cli_runner(tmp_path, "exit-nonzero").run(
        RunRequest(prompt="x", exec_dir=tmp_path / "e"))
    assert result.status == RunStatus.FAILED and result.retryable
    assert result.error and "exited with code 3" in result.error and "fatal" in result.error
    assert "fatal" in (tmp_path / "e" / "stderr.log").read_text()


async def test_cli_hanging_is_timed_out(tmp_path: Path) -> None:
    result = await fake_cli_runner(tmp_path, "hang", timeout_s=1).run(
        RunRequest(prompt="x", exec_dir=tmp_path / "e"))
    assert result.status == RunStatus.TIMED_OUT
    assert read_events(tmp_path / "e" / "stdout.log")[-1]["type"] == "result"


async def test_cli_printing_50_mb_streams_with_bounded_memory(tmp_path: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = await fake_cli_runner(tmp_path, "flood").run(
        RunRequest(prompt="x", exec_dir=tmp_path / "e"))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.status == RunStatus.SUCCEEDED and result.summary == "flooded"
    assert (tmp_path / "e" / "stdout.log").stat().st_size > 50_000_000
    assert "dropped an output line of 20971520 bytes" in (tmp_path / "e" / "stderr.log").read_text()
    assert grown_mb < 40


async def test_cli_printing_non_json(tmp_path: Path) -> None:
    result = await fake_cli_runner(tmp_path, "non-json").run(
        RunRequest(prompt="x", exec_dir=tmp_path / "e"))
    assert result.status == RunStatus.FAILED
    assert read_events(tmp_path / "e" / "stdout.log") == []
    assert "plain text line 99" in (tmp_path / "e" / "stderr.log").read_text()


async def test_reply_after_fault_still_works(fake_openai: MakeFake) -> None:
    # Sanity for the fakes above: a scripted fault is followed by normal replies.
    fake = await fake_openai()
    fake.push(Status(500))
    assert isinstance(fake.next_behaviour(), Status)
    assert isinstance(fake.next_behaviour(), Reply)


async def test_a_cancel_while_the_process_is_being_recorded_still_ends_its_group(
    tmp_path: Path,
) -> None:
    """From the moment the child exists, its group is ended whatever happens next."""
    from corral.models import ProcessIdentity
    from tests.test_runners import group_alive

    recording = asyncio.Event()
    seen: list[ProcessIdentity] = []

    async def slow_record(proc: ProcessIdentity) -> None:
        seen.append(proc)
        recording.set()
        await asyncio.Event().wait()  # a database write that never returns

    run = asyncio.create_task(fake_cli_runner(tmp_path, "hang").run(
        RunRequest(prompt="x", exec_dir=tmp_path / "e", on_process=slow_record)))
    await asyncio.wait_for(recording.wait(), 10)
    assert group_alive(seen[0].pgid)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    async def gone() -> bool:
        return not group_alive(seen[0].pgid)

    await until(gone, timeout_s=10)
