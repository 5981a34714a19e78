"""GeminiRunner: the Gemini CLI, headless, translated into the stream-json envelope.

Gemini prints its own JSON Lines (init, message, tool_use, tool_result, error, result); each is
rewritten as the envelope event Claude would have printed. Noise lines (warnings, startup
timings) go to ``stderr.log``. A rate limit is known from structured output only: the
``result`` event's ``error.type`` (the CLI's quota error classes), its exit code 173 (HTTP 429
mod 256), or, while the CLI retries a per-minute limit by itself for minutes with nothing on
stdout, the API's own error object that it logs on stderr for each failed attempt
(``{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}``): after a few of those corral
stops it, as it does claude, and the pool cools the agent down.
"""

from __future__ import annotations

import json
import time
from typing import Any, BinaryIO

from corral.executor.clibase import CliHandler, CliRunner
from corral.executor.proc import ProcOutcome, Stop
from corral.executor.runner import RunRequest, RunResult, RunStatus
from corral.executor.streamjson import (
    EnvelopeWriter,
    new_message_id,
    parse_line,
    trim,
)

EXIT_CODES = {
    1: "gemini failed (exit 1)",
    41: "gemini could not authenticate (exit 41): check GEMINI_API_KEY or its settings.json",
    42: "gemini rejected its input (exit 42)",
    52: "gemini's configuration is invalid (exit 52)",
    53: "gemini hit its turn limit (exit 53)",
    55: "gemini refused an untrusted folder (exit 55); corral passes --skip-trust",
    130: "gemini was cancelled (exit 130)",
    173: "gemini quota exhausted (exit 173, HTTP 429)",
}
EXIT_RATE_LIMITED = 173  # the CLI exits with the HTTP status, 429, mod 256
# The CLI's own error classes for a quota or rate limit, named in ``result.error.type``.
QUOTA_ERROR_TYPES = frozenset({"TerminalQuotaError", "RetryableQuotaError"})


class GeminiRunner(CliRunner):
    name = "gemini"
    install_hint = "install it with `npm install -g @google/gemini-cli` or set [gemini] binary"

    def __init__(
        self, *, approval_mode: str = "auto_edit", max_rate_limit_retries: int = 2, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.approval_mode = approval_mode
        self.max_rate_limit_retries = max_rate_limit_retries

    def argv(self, binary: str, request: RunRequest, model: str | None) -> list[str]:
        # The prompt goes on stdin (the CLI prepends stdin to -p's empty value): no argv length
        # limit, never visible in `ps`, never near a shell.
        argv = [binary, "-p", "", "--output-format", "stream-json", "--skip-trust"]
        if request.resume_session_id:  # the CLI finds a session of this dir by its id
            argv += ["--resume", request.resume_session_id]
        if model:
            argv += ["-m", model]
        if self.approval_mode:
            argv += ["--approval-mode", self.approval_mode]
        return argv + self.extra_args

    def stdin_data(self, request: RunRequest) -> bytes:
        return request.prompt.encode("utf-8", "surrogateescape")

    def handler(
        self, writer: EnvelopeWriter, stderr: BinaryIO, request: RunRequest, model: str | None
    ) -> CliHandler:
        cwd = str(request.workdir) if request.workdir else None
        return _GeminiHandler(writer, stderr, model, cwd, self.max_rate_limit_retries)


class _GeminiHandler(CliHandler):
    def __init__(
        self, writer: EnvelopeWriter, stderr: BinaryIO, model: str | None, cwd: str | None,
        max_retries: int,
    ) -> None:
        self.w = writer
        self.stderr = stderr
        self.max_retries = max_retries
        self.quota_retries = 0
        self.model = model
        self.cwd = cwd
        self.session_id: str | None = None
        self.message_id = new_message_id()
        self.errors: list[str] = []
        self.result_event: dict[str, Any] | None = None
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None
        self.stderr_tail: list[str] = []
        self.started = time.monotonic()
        self._final_text = ""  # streamed text already closed into assistant messages

    def stdout_line(self, line: bytes) -> Stop | None:
        event = parse_line(line)
        if event is None or "type" not in event:
            if line.strip():
                self.stderr.write(line + b"\n")
                self.stderr.flush()
            return None
        handler = _TRANSLATE.get(str(event["type"]))
        if handler is not None:
            handler(self, event)
        return None

    def _init(self, event: dict[str, Any]) -> None:
        self.session_id = event.get("session_id") or self.session_id
        self.model = event.get("model") or self.model
        self.w.init(session_id=self.session_id or "", model=self.model, cwd=self.cwd,
                    source="gemini")

    def _message(self, event: dict[str, Any]) -> None:
        if event.get("role") != "assistant":
            return
        content = event.get("content")
        if isinstance(content, str) and content:
            self.w.text_delta(content)

    def _tool_use(self, event: dict[str, Any]) -> None:
        self._flush_text()
        self.w.assistant(
            message_id=new_message_id(), model=self.model, session_id=self.session_id,
            content=[{"type": "tool_use", "id": event.get("tool_id"),
                      "name": event.get("tool_name"), "input": event.get("parameters") or {}}],
        )

    def _tool_result(self, event: dict[str, Any]) -> None:
        self.w.event({"type": "user", "session_id": self.session_id, "message": {
            "role": "user", "content": [{
                "type": "tool_result", "tool_use_id": event.get("tool_id"),
                "content": event.get("output") or "", "is_error": event.get("status") != "success",
            }]}})

    def _error(self, event: dict[str, Any]) -> None:
        message = str(event.get("message") or "")
        self.errors.append(message)
        self.w.event({"type": "system", "subtype": "error", "severity": event.get("severity"),
                      "message": message, "session_id": self.session_id})

    def _result(self, event: dict[str, Any]) -> None:
        self.result_event = event
        self._flush_text()
        stats = event.get("stats") or {}
        self.tokens_in = _int(stats.get("input_tokens"))
        self.tokens_out = _int(stats.get("output_tokens"))
        is_error = event.get("status") != "success"
        error = event.get("error") or {}
        message = str(error.get("message") or "") if isinstance(error, dict) else str(error)
        if message:
            self.errors.append(message)
        cached = _int(stats.get("cached")) or 0
        self.w.result(
            is_error=is_error, result=message if is_error else self._final_text,
            session_id=self.session_id,
            duration_ms=_int(stats.get("duration_ms")) or self._elapsed_ms(),
            usage={"input_tokens": max((self.tokens_in or 0) - cached, 0),
                   "cache_read_input_tokens": cached, "output_tokens": self.tokens_out or 0},
            total_cost_usd=None, num_turns=1, error=message or None,
        )

    def _flush_text(self) -> None:
        """Close the streamed text as one consolidated assistant message, Claude-style."""
        text = self.w.text[len(self._final_text):]
        if not text:
            return
        self._final_text += text
        self.w.assistant(message_id=self.message_id, model=self.model, session_id=self.session_id,
                         content=[{"type": "text", "text": text}])
        self.message_id = new_message_id()

    def _elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def stderr_line(self, line: bytes) -> Stop | None:
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return None
        self.stderr_tail = [*self.stderr_tail[-4:], text]
        if _is_quota_error(_api_error_in(text)):
            self.quota_retries += 1
            if self.quota_retries >= max(self.max_retries, 1):
                return Stop("rate limited (HTTP 429); gemini was retrying, corral stopped it")
        return None

    def result(self, outcome: ProcOutcome, duration_ms: int) -> RunResult:
        summary = trim(self.w.text) or trim("; ".join(self.errors))
        out = RunResult(
            status=RunStatus.SUCCEEDED, summary=summary, cost_usd=None,
            tokens_in=self.tokens_in, tokens_out=self.tokens_out, session_id=self.session_id,
            exit_code=outcome.exit_code, model=self.model, final_text=self.w.text,
        )
        if outcome.start_error:
            out.status, out.error = RunStatus.FAILED, outcome.start_error
            return out
        if self._rate_limited(outcome):
            text = " ".join(self.errors)
            out.status = RunStatus.RATE_LIMITED
            out.error = "gemini: rate limited or quota exhausted" + (
                f": {trim(text, 300)}" if text else ""
            )
            return out
        ok = self.result_event is not None and self.result_event.get("status") == "success"
        if ok and outcome.exit_code in (0, None):
            return out
        out.status = RunStatus.FAILED
        detail = trim("; ".join(self.errors), 500)
        known = EXIT_CODES.get(outcome.exit_code or 0)
        tail = " | ".join(self.stderr_tail[-2:])
        out.error = detail or known or f"gemini exited with code {outcome.exit_code}: {tail}"
        if known and detail:
            out.error = f"{known}: {detail}"
        out.retryable = self.result_event is None and outcome.exit_code not in EXIT_CODES
        return out

    def _rate_limited(self, outcome: ProcOutcome) -> bool:
        if outcome.exit_code == EXIT_RATE_LIMITED or outcome.stopped is not None:
            return True
        error = (self.result_event or {}).get("error")
        return isinstance(error, dict) and error.get("type") in QUOTA_ERROR_TYPES


def _api_error_in(text: str) -> dict[str, Any] | None:
    """The Google API error object a log line carries (``{"error": {...}}``), if any."""
    start = text.find('{"error"')
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    error = value.get("error") if isinstance(value, dict) else None
    return error if isinstance(error, dict) else None


def _is_quota_error(error: dict[str, Any] | None) -> bool:
    return error is not None and (
        error.get("status") == "RESOURCE_EXHAUSTED" or error.get("code") == 429)


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


_TRANSLATE = {
    "init": _GeminiHandler._init,
    "message": _GeminiHandler._message,
    "tool_use": _GeminiHandler._tool_use,
    "tool_result": _GeminiHandler._tool_result,
    "error": _GeminiHandler._error,
    "result": _GeminiHandler._result,
}
