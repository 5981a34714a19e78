"""The Runner protocol: what every agent adapter takes and returns.

A runner gets a :class:`RunRequest` (prompt, model, working dir, timeout, execution folder), writes
``stdout.log`` (the stream-json envelope) and ``stderr.log`` into the folder as it goes, and
returns a :class:`RunResult`. It enforces ``timeout_s`` itself and, when cancelled, stops its
agent (process group or HTTP stream) before letting ``CancelledError`` through.
"""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from corral.executor.streamjson import ChangeStat, EnvelopeWriter
from corral.models import ProcessIdentity

# The two files of an execution's folder: the envelope, and what a child wrote to stderr.
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"


class RunStatus(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RATE_LIMITED = "rate_limited"
    TIMED_OUT = "timed_out"


@dataclass(slots=True)
class RunRequest:
    prompt: str
    exec_dir: Path
    model: str | None = None
    workdir: Path | None = None
    timeout_s: float | None = None
    # Going on from earlier executions of the task: the agent's own session to resume, and
    # the earlier turns (asked, answered) for an agent that cannot resume one.
    resume_session_id: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    # The task's spend cap: an agent that can stop itself at it does (claude, the local agent).
    max_cost_usd: float | None = None
    # Tokens (in, out) the resumed session had already used: codex reports session totals.
    prior_usage: tuple[int, int] = (0, 0)
    # Told who the agent's process group leader is once it starts, so that after a crash
    # the next daemon can end exactly that group.
    on_process: Callable[[ProcessIdentity], Awaitable[None]] | None = None
    # Called whenever the logs have grown, so followers wake instead of polling.
    on_output: Callable[[], None] | None = None

    @property
    def stdout_path(self) -> Path:
        return self.exec_dir / STDOUT_LOG

    @property
    def stderr_path(self) -> Path:
        return self.exec_dir / STDERR_LOG


@dataclass(slots=True)
class RunResult:
    status: RunStatus
    summary: str | None = None
    cost_usd: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    cached_tokens: int = 0  # of tokens_in, read from a cache (priced apart)
    session_id: str | None = None
    exit_code: int | None = None
    error: str | None = None
    # For RATE_LIMITED: how long the agent should cool down, when the peer said.
    retry_after_s: float | None = None
    # For FAILED: whether another attempt may succeed (a crash, a 5xx, a dropped connection).
    retryable: bool = False
    files_changed: int | None = None
    insertions: int | None = None
    deletions: int | None = None
    model: str | None = None
    # The agent's whole last answer (the summary is a trimmed line of it); not stored.
    final_text: str | None = None
    # How the local model was asked for actions: text, tools or schema (None: not local).
    actions: str | None = None
    # The agent itself stopped at the task's spend cap (the error says so already).
    budget_reached: bool = False

    def apply_changes(self, stat: ChangeStat | None) -> None:
        """Record a measured change; git's own measurement wins over anything parsed."""
        if stat is not None:
            self.files_changed = stat.files_changed
            self.insertions = stat.insertions
            self.deletions = stat.deletions


async def open_logs(request: RunRequest) -> tuple[EnvelopeWriter, BinaryIO]:
    """Create the execution folder with ``stdout.log`` and ``stderr.log``, off the event loop.

    Creating files can block for milliseconds on a busy disk; a thread keeps the daemon
    answering meanwhile.
    """

    def make() -> tuple[EnvelopeWriter, BinaryIO]:
        writer = _make_writer(request)
        try:
            return writer, request.stderr_path.open("ab")
        except BaseException:
            writer.close()
            raise

    return await asyncio.to_thread(make)


async def open_envelope(request: RunRequest) -> EnvelopeWriter:
    """Like :func:`open_logs` for a runner with no child process, hence no ``stderr.log``.

    The pool has usually made the folder and its empty ``stdout.log`` already
    (:func:`make_folders`), and opening an existing file is cheap enough for the event loop;
    else they are made in a thread.
    """
    try:
        return EnvelopeWriter(request.stdout_path, on_flush=request.on_output)
    except FileNotFoundError:
        return await asyncio.to_thread(_make_writer, request)


def _make_writer(request: RunRequest) -> EnvelopeWriter:
    request.exec_dir.mkdir(parents=True, exist_ok=True)
    return EnvelopeWriter(request.stdout_path, on_flush=request.on_output)


def make_folders(folders: list[Path]) -> None:
    """Execution folders, each with an empty ``stdout.log``; blocking (run it in a thread).

    Best effort: a folder that cannot be made is left for its runner, which reports why.
    """
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.close(os.open(folder / STDOUT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        except OSError:
            continue


class Runner(Protocol):
    """An agent adapter. ``name`` is its agent type (claude, gemini, local)."""

    name: str

    async def run(self, request: RunRequest) -> RunResult: ...

    def unavailable_reason(self) -> str | None:
        """Why this runner cannot run anything right now (missing binary…), or None."""
        ...
