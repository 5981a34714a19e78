"""CodexRunner: the Codex CLI, headless (``codex exec --json``), translated into the envelope.

Events become what Claude would have printed: ``thread.started`` → ``system/init`` (the thread id
is the session), an ``agent_message`` → assistant text, a ``command_execution`` → a ``Bash``
tool_use and its tool_result (``is_error`` from the exit code), a ``file_change`` → an
``Edit``/``Write`` tool_use per path, ``turn.completed`` → usage, ``turn.failed`` → an error
result. Top-level ``error`` events are codex reconnecting and are logged, not failures.

Why a turn failed is read from codex's own record of the session (its rollout file under
``CODEX_HOME``), whose ``task_complete`` event carries a typed ``codex_error_info``: a 429
(``{"response_too_many_failed_attempts": {"http_status_code": 429}}``) or
``rate_limit_exceeded`` is a rate limit, a 5xx worth another attempt. Its usage counts are
cumulative over a session, so a resumed thread records the difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

from corral.executor.clibase import CliHandler, CliRunner
from corral.executor.proc import ProcOutcome, Stop
from corral.executor.runner import RunRequest, RunResult, RunStatus
from corral.executor.streamjson import EnvelopeWriter, new_message_id, parse_line, trim

SANDBOXES = ("read-only", "workspace-write", "danger-full-access")
_RETRYABLE_INFO = {"internal_server_error", "server_overloaded", "response_stream_failed",
                   "response_stream_disconnected", "connection_failed"}


class CodexRunner(CliRunner):
    name = "codex"
    install_hint = "install it with `npm install -g @openai/codex` or set [codex] binary"

    def __init__(self, *, sandbox: str = "workspace-write", max_rate_limit_retries: int = 5,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sandbox = sandbox
        self.max_reconnects = max_rate_limit_retries

    def argv(self, binary: str, request: RunRequest, model: str | None) -> list[str]:
        common = ["--json", "--skip-git-repo-check"]
        if model:
            common += ["-m", model]
        if request.resume_session_id:
            # `exec resume` takes neither -s nor -C: the sandbox is a config override and the
            # process runs in the workspace itself.
            return [binary, "exec", "resume", request.resume_session_id, *common,
                    "-c", f'sandbox_mode="{self.sandbox}"', *self.extra_args, "-"]
        return [binary, "exec", *common, "-s", self.sandbox,
                "-C", str(self._cwd(request)), *self.extra_args, "-"]

    def cwd(self, request: RunRequest) -> Path:
        return self._cwd(request)

    @staticmethod
    def _cwd(request: RunRequest) -> Path:
        # Without a working dir codex runs in the execution's own folder, never the daemon's.
        return request.workdir or request.exec_dir

    def stdin_data(self, request: RunRequest) -> bytes:
        return request.prompt.encode("utf-8", "surrogateescape")

    def codex_home(self) -> Path:
        env = self.child_env()
        return Path(env.get("CODEX_HOME") or Path(env.get("HOME", "~")).expanduser() / ".codex")

    def handler(
        self, writer: EnvelopeWriter, stderr: BinaryIO, request: RunRequest, model: str | None
    ) -> CliHandler:
        return _CodexHandler(writer, stderr, model, str(self._cwd(request)), self.codex_home(),
                             request.prior_usage, self.max_reconnects)


class _CodexHandler(CliHandler):
    def __init__(self, writer: EnvelopeWriter, stderr: BinaryIO, model: str | None, cwd: str,
                 codex_home: Path, prior_usage: tuple[int, int], max_reconnects: int) -> None:
        self.w = writer
        self.stderr = stderr
        self.model = model
        self.cwd = cwd
        self.codex_home = codex_home
        self.prior_in, self.prior_out = prior_usage
        self.max_reconnects = max_reconnects
        self.thread_id: str | None = None
        self.usage: dict[str, Any] | None = None
        self.failure: str | None = None
        self.reconnects = 0
        self.last_text = ""
        self.streamed: dict[str, str] = {}  # item id -> text already sent as deltas
        self.started: set[str] = set()  # command items whose tool_use is logged
        self.stderr_tail: list[str] = []

    def stdout_line(self, line: bytes) -> Stop | None:
        event = parse_line(line)
        if event is None or not isinstance(event.get("type"), str):
            if line.strip():
                self.stderr.write(line + b"\n")
                self.stderr.flush()
            return None
        kind = event["type"]
        if kind == "thread.started":
            self.thread_id = str(event.get("thread_id") or "")
            self.w.init(session_id=self.thread_id, model=self.model, cwd=self.cwd,
                        source="codex")
        elif kind in ("item.started", "item.updated", "item.completed"):
            item = event.get("item")
            if isinstance(item, dict):
                self._item(kind, item)
        elif kind == "turn.completed":
            usage = event.get("usage")
            self.usage = usage if isinstance(usage, dict) else {}
        elif kind == "turn.failed":
            error = event.get("error")
            self.failure = str(error.get("message") if isinstance(error, dict) else error)
        elif kind == "error":
            return self._reconnecting(str(event.get("message") or ""))
        return None

    def _reconnecting(self, message: str) -> Stop | None:
        self.reconnects += 1
        self.w.event({"type": "system", "subtype": "api_retry", "attempt": self.reconnects,
                      "error": message, "session_id": self.thread_id})
        if self.reconnects > self.max_reconnects:
            return Stop(f"codex was still reconnecting after {self.max_reconnects} tries")
        return None

    def _item(self, kind: str, item: dict[str, Any]) -> None:
        item_type, item_id = item.get("type"), str(item.get("id") or "")
        if item_type == "agent_message":
            self._message(kind, item_id, str(item.get("text") or ""))
        elif item_type == "command_execution":
            self._command(kind, item_id, item)
        elif item_type == "file_change" and kind == "item.completed":
            self._file_change(item_id, item)

    def _message(self, kind: str, item_id: str, text: str) -> None:
        sent = self.streamed.get(item_id, "")
        if text.startswith(sent) and len(text) > len(sent):
            self.w.text_delta(text[len(sent):])
            self.streamed[item_id] = text
        if kind == "item.completed" and text:
            self.last_text = text
            self.w.assistant(message_id=new_message_id(), model=self.model,
                             session_id=self.thread_id, content=[{"type": "text", "text": text}])

    def _command(self, kind: str, item_id: str, item: dict[str, Any]) -> None:
        if item_id not in self.started:
            self.started.add(item_id)
            self.w.assistant(message_id=new_message_id(), model=self.model,
                             session_id=self.thread_id, content=[{
                                 "type": "tool_use", "id": item_id, "name": "Bash",
                                 "input": {"command": str(item.get("command") or "")}}])
        if kind == "item.completed":
            code = item.get("exit_code")
            self._tool_result(item_id, str(item.get("aggregated_output") or ""),
                              is_error=code != 0)

    def _file_change(self, item_id: str, item: dict[str, Any]) -> None:
        changes = item.get("changes") if isinstance(item.get("changes"), list) else []
        failed = item.get("status") == "failed"
        for n, change in enumerate(changes or []):
            if not isinstance(change, dict):
                continue
            call_id = f"{item_id}_{n}"
            tool = "Write" if change.get("kind") == "add" else "Edit"
            self.w.assistant(message_id=new_message_id(), model=self.model,
                             session_id=self.thread_id, content=[{
                                 "type": "tool_use", "id": call_id, "name": tool,
                                 "input": {"file_path": change.get("path"),
                                           "kind": change.get("kind")}}])
            self._tool_result(call_id, "failed" if failed else "applied", is_error=failed)

    def _tool_result(self, tool_use_id: str, content: str, *, is_error: bool) -> None:
        self.w.event({"type": "user", "session_id": self.thread_id, "message": {
            "role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id,
                                         "content": content, "is_error": is_error}]}})

    def stderr_line(self, line: bytes) -> Stop | None:
        text = line.decode("utf-8", "replace").strip()
        if text:
            self.stderr_tail = [*self.stderr_tail[-4:], text]
        return None

    def _tokens(self) -> tuple[int | None, int | None, int]:
        """This run's tokens (the session's totals less what earlier runs had used)."""
        if self.usage is None:
            return None, None, 0
        total_in = int(self.usage.get("input_tokens") or 0)
        total_out = int(self.usage.get("output_tokens") or 0)
        cached = int(self.usage.get("cached_input_tokens") or 0)
        return max(total_in - self.prior_in, 0), max(total_out - self.prior_out, 0), cached

    def result(self, outcome: ProcOutcome, duration_ms: int) -> RunResult:
        tokens_in, tokens_out, cached = self._tokens()
        failed = outcome.start_error or self.failure or outcome.stopped is not None or (
            outcome.exit_code not in (0, None))
        usage = {"input_tokens": max((tokens_in or 0) - cached, 0),
                 "cache_read_input_tokens": cached, "output_tokens": tokens_out or 0}
        error = outcome.start_error or self.failure or (
            outcome.stopped.reason if outcome.stopped else None)
        if failed and error is None:
            tail = " | ".join(self.stderr_tail[-2:]) or "no output"
            error = f"codex exited with code {outcome.exit_code}: {tail}"
        self.w.result(is_error=bool(failed), result=self.last_text, session_id=self.thread_id,
                      duration_ms=duration_ms, usage=usage, total_cost_usd=None, num_turns=1,
                      error=error)
        out = RunResult(
            status=RunStatus.SUCCEEDED, summary=trim(self.last_text), cost_usd=None,
            tokens_in=tokens_in, tokens_out=tokens_out, cached_tokens=cached,
            session_id=self.thread_id, exit_code=outcome.exit_code, model=self.model,
            final_text=self.last_text)
        if not failed:
            return out
        out.status, out.error = RunStatus.FAILED, error
        info = _error_info(self.codex_home, self.thread_id)
        if _is_rate_limit(info):
            out.status = RunStatus.RATE_LIMITED
            out.error = f"codex: rate limited: {error}"
        else:
            out.retryable = outcome.stopped is not None or (
                isinstance(info, str) and info in _RETRYABLE_INFO) or _http_status(info) >= 500
        return out


def _is_rate_limit(info: object) -> bool:
    return info == "rate_limit_exceeded" or _http_status(info) == 429


def _http_status(info: object) -> int:
    if isinstance(info, dict):
        for detail in info.values():
            if isinstance(detail, dict) and isinstance(detail.get("http_status_code"), int):
                return int(detail["http_status_code"])
    return 0


def _error_info(codex_home: Path, thread_id: str | None) -> object:
    """The ``codex_error_info`` of the thread's last ``task_complete``, from codex's own record."""
    if not thread_id:
        return None
    found = None
    sessions = codex_home / "sessions"
    for path in sessions.glob(f"*/*/*/rollout-*-{thread_id}.jsonl"):
        try:
            with path.open("rb") as fh:
                for raw in fh:
                    event = parse_line(raw)
                    payload = (event or {}).get("payload")
                    if isinstance(payload, dict) and payload.get("type") == "task_complete":
                        error = payload.get("error")
                        found = error.get("codex_error_info") if isinstance(error, dict) else None
        except OSError:
            continue
    return found
