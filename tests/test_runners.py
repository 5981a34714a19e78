"""Runners: LocalRunner on loopback fakes and real llama.cpp; Claude and Gemini via real CLIs."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from corral.executor.claude import ClaudeRunner
from corral.executor.gemini import GeminiRunner
from corral.executor.local import LocalRunner
from corral.executor.runner import RunRequest, RunStatus
from corral.executor.streamjson import read_events, summarize
from corral.llm.client import Client
from corral.models import ProcessIdentity
from tests import peers
from tests.conftest import until
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.base import Drop, Hang, Reply, Status
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai import FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
R = TypeVar("R", ClaudeRunner, GeminiRunner)


def request(tmp_path: Path, prompt: str = "say hi", **kw: object) -> RunRequest:
    return RunRequest(prompt=prompt, exec_dir=tmp_path / "exec", **kw)  # type: ignore[arg-type]


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still alive (zombies do not count), from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class PgidLog:
    """Collects the process groups a runner reports through ``on_process``."""

    def __init__(self) -> None:
        self.pgids: list[int | None] = []
        self.processes: list[ProcessIdentity] = []

    async def record(self, proc: ProcessIdentity) -> None:
        self.processes.append(proc)
        self.pgids.append(proc.pgid)

    @property
    def first(self) -> int | None:
        return self.pgids[0] if self.pgids else None


# -- LocalRunner -------------------------------------------------------------------------------


async def test_local_runner_writes_envelope_live(tmp_path: Path, fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Reply(parts=("Hel", "lo ", "there"), input_tokens=9, output_tokens=4))
    async with Client(fake.endpoint, "fake-model") as client:
        result = await LocalRunner(client).run(request(tmp_path))
    assert result.status == RunStatus.SUCCEEDED
    assert (result.tokens_in, result.tokens_out, result.cost_usd) == (9, 4, 0.0)
    assert result.summary == "Hello there"
    events = read_events(tmp_path / "exec" / "stdout.log")
    kinds = [e["type"] for e in events]
    assert kinds == ["system", "stream_event", "stream_event", "stream_event", "assistant",
                     "result"]
    assert summarize(events).tokens_in == 9
    assert not (tmp_path / "exec" / "stderr.log").exists()  # no child process, no stderr


async def test_local_runner_failure_mid_stream_keeps_partial(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    fake = await fake_openai()
    fake.push(Drop(text="half of it"))
    async with Client(fake.endpoint, "m") as client:
        result = await LocalRunner(client).run(request(tmp_path))
    assert result.status == RunStatus.FAILED and result.retryable
    events = read_events(tmp_path / "exec" / "stdout.log")
    assert events[-1]["type"] == "result" and events[-1]["is_error"]
    assert events[-1]["result"] == "half of it"


async def test_local_runner_rate_limit(tmp_path: Path, fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Status(429, retry_after="45"))
    async with Client(fake.endpoint, "m", max_attempts=1) as client:
        result = await LocalRunner(client).run(request(tmp_path))
    assert result.status == RunStatus.RATE_LIMITED
    assert result.retry_after_s == 45.0


async def test_local_runner_timeout(tmp_path: Path, fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Hang())
    async with Client(fake.endpoint, "m") as client:
        result = await LocalRunner(client).run(request(tmp_path, timeout_s=0.3))
    assert result.status == RunStatus.TIMED_OUT


async def test_local_runner_cancellation_stops_the_stream(
    tmp_path: Path, fake_openai: MakeFake
) -> None:
    fake = await fake_openai()
    fake.push(Reply(text="x" * 200, chunks=200, chunk_delay_s=0.05))
    async with Client(fake.endpoint, "m") as client:
        run = asyncio.create_task(LocalRunner(client).run(request(tmp_path)))
        log = tmp_path / "exec" / "stdout.log"

        async def streaming() -> bool:
            return log.exists() and len(read_events(log)) >= 3

        await until(streaming)
        run.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert time.monotonic() - started < 1.0
    events = read_events(log)
    assert events[-1]["type"] == "result" and events[-1]["error"] == "cancelled"


@pytest.mark.real
async def test_local_runner_real_llama(tmp_path: Path, llama_server: str) -> None:
    async with Client(llama_server, "smollm2") as client:
        result = await LocalRunner(client, max_tokens=32).run(request(tmp_path, "Say hello."))
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert result.tokens_in and result.tokens_in > 0
    assert result.tokens_out and 0 < result.tokens_out <= 32
    deltas = [e for e in read_events(tmp_path / "exec" / "stdout.log")
              if e["type"] == "stream_event"]
    assert len(deltas) > 1


# -- ClaudeRunner ------------------------------------------------------------------------------


def cli_runner(cls: type[R], binary: Path, model: str, env: dict[str, str], **kw: object) -> R:
    """A runner for the real CLI at ``binary``, with test-sized timeouts unless ``kw`` says."""
    settings: dict[str, object] = {"binary": str(binary), "model": model, "extra_args": [],
                                   "timeout_s": 60.0, "kill_grace_s": 1.0, **kw}
    return cls(env=env, **settings)  # type: ignore[arg-type]


def claude(env: dict[str, str], **kw: object) -> ClaudeRunner:
    return cli_runner(ClaudeRunner, peers.claude_bin(), "claude-sonnet-4-5", env, **kw)


@pytest.mark.real
async def test_claude_normal_run(
    tmp_path: Path, claude_env: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.push(Reply(text="Done: all good.", input_tokens=20, output_tokens=6))
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = await claude(claude_env).run(request(tmp_path, "x" * 1_000_000, workdir=workdir))
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert result.summary == "Done: all good."
    assert result.cost_usd is not None and result.cost_usd > 0
    assert (result.tokens_in, result.tokens_out) == (20, 6)
    assert result.session_id
    events = read_events(tmp_path / "exec" / "stdout.log")
    assert events[0]["type"] == "system" and events[-1]["type"] == "result"
    # The 1 MB prompt arrived whole, over stdin.
    sent = fake_anthropic.requests[-1]["messages"][-1]["content"]
    text = sent if isinstance(sent, str) else "".join(b.get("text", "") for b in sent)
    assert "x" * 1_000_000 in text


@pytest.mark.real
@pytest.mark.parametrize("status", [429, 529])
async def test_claude_rate_limit_stops_the_retrying_cli(
    tmp_path: Path, claude_env: dict[str, str], fake_anthropic: FakeAnthropic, status: int
) -> None:
    fake_anthropic.default = Status(status, retry_after="1")
    started = time.monotonic()
    pgids = PgidLog()

    result = await claude(claude_env, max_rate_limit_retries=2).run(
        request(tmp_path, on_process=pgids.record))
    assert result.status == RunStatus.RATE_LIMITED, result.error
    assert result.retry_after_s is not None and result.retry_after_s > 0
    assert time.monotonic() - started < 30
    assert pgids.first is not None and not group_alive(pgids.first)


WORDS_OF_A_RATE_LIMIT = "tests/test_api.py:429: AssertionError (overloaded; rate limit; quota)"


@pytest.mark.real
async def test_claude_error_whose_text_mentions_429_is_a_failure_not_a_rate_limit(
    tmp_path: Path, claude_env: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.default = Status(400, body={"type": "error", "error": {
        "type": "invalid_request_error", "message": WORDS_OF_A_RATE_LIMIT}})
    result = await claude(claude_env).run(request(tmp_path))
    assert result.status == RunStatus.FAILED, result.error
    assert result.error and "429: AssertionError" in result.error


@pytest.mark.real
async def test_gemini_error_whose_text_mentions_quota_is_a_failure_not_a_rate_limit(
    tmp_path: Path, gemini_env: dict[str, str], fake_gemini: FakeGemini
) -> None:
    fake_gemini.default = Status(400, body={"error": {
        "code": 400, "status": "INVALID_ARGUMENT", "message": WORDS_OF_A_RATE_LIMIT}})
    result = await gemini(gemini_env).run(request(tmp_path))
    assert result.status == RunStatus.FAILED, result.error
    assert result.error and "429: AssertionError" in result.error


@pytest.mark.real
async def test_claude_hang_times_out_and_group_is_gone(
    tmp_path: Path, claude_env: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.default = Hang()
    pgids = PgidLog()

    result = await claude(claude_env).run(request(tmp_path, timeout_s=4, on_process=pgids.record))
    assert result.status == RunStatus.TIMED_OUT
    assert pgids.first is not None and not group_alive(pgids.first)


@pytest.mark.real
async def test_claude_cancel_mid_run_kills_group(
    tmp_path: Path, claude_env: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.default = Hang()
    pgids = PgidLog()

    run = asyncio.create_task(claude(claude_env).run(request(tmp_path, on_process=pgids.record)))

    async def requested() -> bool:
        return bool(fake_anthropic.requests)

    await until(requested, timeout_s=30)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert pgids.first is not None and not group_alive(pgids.first)


async def test_claude_missing_binary_is_a_clear_failure(tmp_path: Path) -> None:
    runner = ClaudeRunner(binary="/nonexistent/claude", model=None, extra_args=[],
                          timeout_s=5, env={"PATH": "/nonexistent"})
    result = await runner.run(request(tmp_path))
    assert result.status == RunStatus.FAILED
    assert result.error and "not found on PATH" in result.error
    assert "[claude] binary" in result.error
    assert runner.unavailable_reason() is not None


async def test_claude_api_key_warning_and_strip(caplog: pytest.LogCaptureFixture) -> None:
    env = {"PATH": os.environ["PATH"], "ANTHROPIC_API_KEY": "sk-planted-warn"}
    with caplog.at_level("WARNING"):
        runner = ClaudeRunner(binary="claude", model=None, extra_args=[], timeout_s=5, env=env)
    assert "bill" in caplog.text and "sk-planted-warn" not in caplog.text
    assert "ANTHROPIC_API_KEY" in runner.child_env()
    stripped = ClaudeRunner(binary="claude", model=None, extra_args=[], timeout_s=5, env=env,
                            strip_api_key=True)
    assert "ANTHROPIC_API_KEY" not in stripped.child_env()


# -- GeminiRunner ------------------------------------------------------------------------------


def gemini(env: dict[str, str], **kw: object) -> GeminiRunner:
    return cli_runner(GeminiRunner, peers.gemini_bin(), "gemini-2.5-flash", env, **kw)


@pytest.mark.real
async def test_gemini_normal_run_translated(
    tmp_path: Path, gemini_env: dict[str, str], fake_gemini: FakeGemini
) -> None:
    fake_gemini.push(Reply(parts=("Gem", "ini ", "says hi"), input_tokens=30, output_tokens=4))
    prompt = "big prompt " + "z" * 300_000  # over the kernel's 128 KiB limit for one argument
    result = await gemini(gemini_env).run(request(tmp_path, prompt, workdir=tmp_path))
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert result.summary == "Gemini says hi"
    assert (result.tokens_in, result.tokens_out) == (30, 4)
    events = read_events(tmp_path / "exec" / "stdout.log")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "system" and kinds[-1] == "result"
    assert kinds.count("stream_event") == 3 and "assistant" in kinds
    s = summarize(events)
    assert s.result_text == "Gemini says hi" and s.tokens_out == 4
    stderr = (tmp_path / "exec" / "stderr.log").read_text()
    assert "256-color" in stderr or "Ripgrep" in stderr or stderr == ""
    assert prompt in json.dumps(fake_gemini.requests[-1]["contents"])


@pytest.mark.real
async def test_gemini_quota_error_is_a_rate_limit(
    tmp_path: Path, gemini_env: dict[str, str], fake_gemini: FakeGemini
) -> None:
    fake_gemini.default = Status(429, body={"error": {
        "code": 429, "status": "RESOURCE_EXHAUSTED",
        "message": "You exceeded your current quota. Quota exceeded for metric: x, limit: 0"}})
    result = await gemini(gemini_env).run(request(tmp_path))
    assert result.status == RunStatus.RATE_LIMITED, result.error
    assert result.exit_code == 173


@pytest.mark.real
async def test_gemini_per_minute_429_is_stopped_early(
    tmp_path: Path, gemini_env: dict[str, str], fake_gemini: FakeGemini
) -> None:
    fake_gemini.default = Status(429, retry_after="1")
    started = time.monotonic()
    result = await gemini(gemini_env, max_rate_limit_retries=1).run(request(tmp_path))
    assert result.status == RunStatus.RATE_LIMITED, result.error
    assert time.monotonic() - started < 60


@pytest.mark.real
async def test_gemini_hang_times_out(
    tmp_path: Path, gemini_env: dict[str, str], fake_gemini: FakeGemini
) -> None:
    fake_gemini.default = Hang()
    pgids = PgidLog()

    result = await gemini(gemini_env).run(request(tmp_path, timeout_s=4, on_process=pgids.record))
    assert result.status == RunStatus.TIMED_OUT
    assert pgids.first is not None and not group_alive(pgids.first)


async def test_gemini_missing_binary(tmp_path: Path) -> None:
    runner = GeminiRunner(binary="gemini-nope", model=None, extra_args=[], timeout_s=5,
                          env={"PATH": str(tmp_path)})
    result = await runner.run(request(tmp_path))
    assert result.status == RunStatus.FAILED and result.error
    assert "gemini-nope not found on PATH" in result.error
