"""Shared life cycle of the runners that drive an agent CLI (claude, gemini).

Subclasses say how to build the command line and how to read the CLI's lines; this base starts
the process without a shell, writes the logs, enforces the timeout, and turns a missing binary
into a clear failed result.
"""

from __future__ import annotations

import asyncio
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from corral.config import looks_secret
from corral.executor.proc import LineHandler, ProcOutcome, resolve_binary, run_agent_process
from corral.executor.runner import RunRequest, RunResult, RunStatus, open_logs
from corral.executor.streamjson import EnvelopeWriter


class CliHandler(LineHandler):
    """Per-run reader of a CLI's output; turns what it saw into a :class:`RunResult`."""

    @abstractmethod
    def result(self, outcome: ProcOutcome, duration_ms: int) -> RunResult: ...


class CliRunner(ABC):
    """Base of ClaudeRunner and GeminiRunner."""

    name: str
    install_hint: str

    def __init__(
        self,
        *,
        binary: str,
        model: str | None,
        extra_args: list[str],
        timeout_s: float,
        env: Mapping[str, str] | None = None,
        kill_grace_s: float = 5.0,
    ) -> None:
        self.binary = binary
        self.model = model or None
        self.extra_args = list(extra_args)
        self.timeout_s = timeout_s
        self.base_env = dict(os.environ if env is None else env)
        self.kill_grace_s = kill_grace_s

    def unavailable_reason(self) -> str | None:
        if resolve_binary(self.binary, self.base_env) is None:
            return f"{self.binary} not found on PATH; {self.install_hint}"
        return None

    @abstractmethod
    def argv(self, binary: str, request: RunRequest, model: str | None) -> list[str]: ...

    @abstractmethod
    def stdin_data(self, request: RunRequest) -> bytes: ...

    def cwd(self, request: RunRequest) -> Path | None:
        """Where the CLI runs: the task's working dir (None: the daemon's own)."""
        return request.workdir

    def child_env(self) -> dict[str, str]:
        return dict(self.base_env)

    def secrets(self) -> list[str]:
        """Values in the child's environment that must never reach a log."""
        return [v for k, v in self.child_env().items() if looks_secret(k) and v]

    @abstractmethod
    def handler(
        self, writer: EnvelopeWriter, stderr: BinaryIO, request: RunRequest, model: str | None
    ) -> CliHandler: ...

    async def run(self, request: RunRequest) -> RunResult:
        model = request.model or self.model
        timeout_s = request.timeout_s or self.timeout_s
        binary = resolve_binary(self.binary, self.base_env)
        w, stderr = await open_logs(request)
        with stderr, w:
            if binary is None:
                return self._missing_binary(w, stderr)
            handler = self.handler(w, stderr, request, model)
            started = time.monotonic()
            try:
                outcome = await run_agent_process(
                    self.argv(binary, request, model),
                    handler=handler,
                    stdin_data=self.stdin_data(request),
                    cwd=self.cwd(request),
                    env=self.child_env(),
                    stderr_file=stderr,
                    timeout_s=timeout_s,
                    kill_grace_s=self.kill_grace_s,
                    on_process=request.on_process,
                    secrets=self.secrets(),
                )
            except asyncio.CancelledError:
                _write_end(w, "cancelled", started)
                raise
            result = handler.result(outcome, int((time.monotonic() - started) * 1000))
            if outcome.timed_out:
                result = RunResult(
                    status=RunStatus.TIMED_OUT, error=f"{self.name} timed out after {timeout_s:g}s",
                    summary=result.summary, session_id=result.session_id,
                    tokens_in=result.tokens_in, tokens_out=result.tokens_out,
                    cost_usd=result.cost_usd, exit_code=outcome.exit_code,
                )
                _write_end(w, result.error or "timed out", started)
            elif outcome.stopped is not None:
                _write_end(w, outcome.stopped.reason, started)
            result.model = result.model or model
        return result

    def _missing_binary(self, writer: EnvelopeWriter, stderr: BinaryIO) -> RunResult:
        message = f"{self.binary} not found on PATH; {self.install_hint}"
        stderr.write(message.encode() + b"\n")
        writer.result(is_error=True, result=message, session_id=None, duration_ms=0,
                      usage={}, total_cost_usd=None, num_turns=0, error=message)
        return RunResult(status=RunStatus.FAILED, error=message)


def _write_end(writer: EnvelopeWriter, reason: str, started: float) -> None:
    """A terminator corral adds when it ended the run itself, so the log says why it stopped."""
    writer.result(
        is_error=True, result=writer.text, session_id=None,
        duration_ms=int((time.monotonic() - started) * 1000), usage={}, total_cost_usd=None,
        error=reason, terminal_reason=f"corral: {reason}",
    )
