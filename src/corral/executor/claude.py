"""ClaudeRunner: the Claude Code CLI, headless, whose stream-json *is* the envelope.

Lines the CLI prints are kept byte for byte in ``stdout.log``. The runner watches them for the
``result`` (cost, tokens, session, ``is_error``) and for rate limits: the CLI retries a 429 by
itself for minutes, so after a few announced retries corral stops it and reports a rate limit,
letting the pool cool the agent down and route other work around it. A rate limit is known
only from the CLI's structured fields (``system/api_retry``'s ``error_status``, a
``rate_limit_event`` that was ``rejected``, the result's ``api_error_status``), never from
words in a message, which may quote anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, BinaryIO

from corral.executor.clibase import CliHandler, CliRunner
from corral.executor.proc import ProcOutcome, Stop
from corral.executor.runner import RunRequest, RunResult, RunStatus
from corral.executor.streamjson import (
    EnvelopeSummary,
    EnvelopeWriter,
    apply_result,
    assistant_text,
    parse_line,
    trim,
)
from corral.retry import RATE_LIMIT_STATUSES

log = logging.getLogger(__name__)


class ClaudeRunner(CliRunner):
    name = "claude"
    install_hint = (
        "install it with `npm install -g @anthropic-ai/claude-code` or set [claude] binary"
    )

    def __init__(
        self,
        *,
        permission_mode: str = "acceptEdits",
        strip_api_key: bool = False,
        max_rate_limit_retries: int = 2,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(env=env, **kwargs)
        self.max_rate_limit_retries = max_rate_limit_retries
        self.permission_mode = permission_mode
        self.strip_api_key = strip_api_key
        if "ANTHROPIC_API_KEY" in self.base_env and not strip_api_key:
            log.warning(
                "ANTHROPIC_API_KEY is set: `claude -p` will bill that API account; set"
                " [claude] strip_api_key = true to run on the CLI's own login instead"
            )

    def argv(self, binary: str, request: RunRequest, model: str | None) -> list[str]:
        argv = [binary, "-p", "--output-format", "stream-json", "--verbose"]
        if request.resume_session_id:  # the same conversation; sessions live per working dir
            argv += ["--resume", request.resume_session_id]
        if request.max_cost_usd is not None:  # the CLI stops itself there
            argv += ["--max-budget-usd", f"{request.max_cost_usd:g}"]
        if model:
            argv += ["--model", model]
        if self.permission_mode:
            argv += ["--permission-mode", self.permission_mode]
        return argv + self.extra_args

    def stdin_data(self, request: RunRequest) -> bytes:
        # On stdin, not argv: no length limit and never visible in `ps`.
        return request.prompt.encode("utf-8", "surrogateescape")

    def child_env(self) -> dict[str, str]:
        env = dict(self.base_env)
        if self.strip_api_key:
            env.pop("ANTHROPIC_API_KEY", None)
        return env

    def handler(
        self, writer: EnvelopeWriter, stderr: BinaryIO, request: RunRequest, model: str | None
    ) -> CliHandler:
        return ClaudeHandler(writer, stderr, self.max_rate_limit_retries, request.max_cost_usd)


class ClaudeHandler(CliHandler):
    def __init__(self, writer: EnvelopeWriter, stderr: BinaryIO, max_retries: int,
                 max_cost_usd: float | None = None) -> None:
        self.max_cost_usd = max_cost_usd
        self.writer = writer
        self.stderr = stderr
        self.max_retries = max_retries
        self.summary = EnvelopeSummary()
        self.retries_seen = 0
        self.retry_after_s: float | None = None
        self.rate_limited = False
        self.stderr_tail: list[str] = []

    def stdout_line(self, line: bytes) -> Stop | None:
        event = parse_line(line)
        if event is None:
            if line.strip():  # not JSON: noise belongs in stderr.log, not the envelope
                self.stderr.write(line + b"\n")
                self.stderr.flush()
            return None
        self.writer.write_line(line)
        return self._event(event)

    def _event(self, event: dict[str, Any]) -> Stop | None:
        kind = event.get("type")
        subtype = event.get("subtype")
        if kind == "system" and subtype == "init":
            self.summary.session_id = event.get("session_id")
            self.summary.model = event.get("model")
        elif kind == "system" and subtype == "api_retry":
            return self._api_retry(event)
        elif kind == "rate_limit_event":
            info = event.get("rate_limit_info") or {}
            if info.get("status") == "rejected":
                self.rate_limited = True
                resets_at = info.get("resetsAt")
                if isinstance(resets_at, int | float):
                    self.retry_after_s = max(0.0, float(resets_at) - time.time())
        elif kind == "assistant":
            text = assistant_text(event)
            if text.strip():
                self.summary.last_assistant_text = text
        elif kind == "result":
            apply_result(self.summary, event)
        return None

    def _api_retry(self, event: dict[str, Any]) -> Stop | None:
        status = event.get("error_status")
        if status not in RATE_LIMIT_STATUSES:
            return None
        self.retries_seen += 1
        delay_ms = event.get("retry_delay_ms")
        if isinstance(delay_ms, int | float):
            self.retry_after_s = float(delay_ms) / 1000.0
        if self.retries_seen >= max(self.max_retries, 1):
            self.rate_limited = True
            return Stop(f"rate limited (HTTP {status}); claude was retrying, corral stopped it")
        return None

    def stderr_line(self, line: bytes) -> Stop | None:
        text = line.decode("utf-8", "replace").strip()
        if text:
            self.stderr_tail = [*self.stderr_tail[-4:], text]
        return None

    def result(self, outcome: ProcOutcome, duration_ms: int) -> RunResult:
        s = self.summary
        base = RunResult(
            status=RunStatus.SUCCEEDED, summary=trim(s.result_text or s.last_assistant_text),
            cost_usd=s.cost_usd, tokens_in=s.tokens_in, tokens_out=s.tokens_out,
            session_id=s.session_id, exit_code=outcome.exit_code, model=s.model,
            final_text=s.result_text or s.last_assistant_text,
        )
        if outcome.start_error:
            base.status, base.error = RunStatus.FAILED, outcome.start_error
            return base
        if self.rate_limited or self._result_is_rate_limit():
            base.status = RunStatus.RATE_LIMITED
            base.retry_after_s = self.retry_after_s
            base.error = f"claude: rate limited{_after(base.retry_after_s)}"
            return base
        if s.has_result and not s.is_error and outcome.exit_code in (0, None):
            return base
        base.status = RunStatus.FAILED
        if s.result_event and s.result_event.get("subtype") == "error_max_budget_usd":
            cap = f"${self.max_cost_usd:g}" if self.max_cost_usd is not None else "its budget"
            base.error = f"budget of {cap} reached (claude stopped itself)"
            base.budget_reached = True
            return base
        if s.has_result:
            base.error = f"claude reported an error: {trim(s.result_text, 500) or 'no detail'}"
            base.retryable = _api_status(s) is not None and (_api_status(s) or 0) >= 500
        else:
            tail = " | ".join(self.stderr_tail[-2:]) or "no output"
            base.error = f"claude exited with code {outcome.exit_code} before a result: {tail}"
            base.retryable = not outcome.timed_out  # a crashed CLI may well work next time
        return base

    def _result_is_rate_limit(self) -> bool:
        s = self.summary
        return bool(s.has_result and s.is_error and _api_status(s) in RATE_LIMIT_STATUSES)


def _api_status(summary: EnvelopeSummary) -> int | None:
    event = summary.result_event or {}
    status = event.get("api_error_status")
    return status if isinstance(status, int) else None


def _after(seconds: float | None) -> str:
    return "" if seconds is None else f"; retry-after: {seconds:g}"
