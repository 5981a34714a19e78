"""GenericRunner: any agent CLI defined in the config file (``[agents.NAME]``).

It runs like the other CLIs (no shell, its own process group, killed on cancel and timeout,
output streamed to disk with bounded memory, stderr kept in ``stderr.log``) and its exit status
decides success. ``"{prompt}"`` in the command becomes the prompt as one argument, whatever it
holds; without it the prompt goes on stdin. ``"{model}"`` becomes the task's model, and goes
with the element before it when there is none. Output is read one of two ways:

* ``text`` — every line is a text delta, the whole output the assistant's text;
* ``claude-stream-json`` — the CLI prints Claude's envelope itself, read as claude's is (cost,
  tokens and session included).

A follow-up uses the ``resume`` argv (with ``"{session_id}"``) when the CLI has a session to
resume; otherwise the earlier turns lead the prompt.
"""

from __future__ import annotations

from collections import deque
from typing import Any, BinaryIO

from corral.config import AgentCliSettings
from corral.executor.claude import ClaudeHandler
from corral.executor.clibase import CliHandler, CliRunner
from corral.executor.proc import ProcOutcome, Stop
from corral.executor.runner import RunRequest, RunResult, RunStatus
from corral.executor.streamjson import (
    EnvelopeWriter,
    new_message_id,
    new_session_id,
    trim,
    trim_tail,
)

PROMPT, MODEL, SESSION = "{prompt}", "{model}", "{session_id}"
TAIL_CHARS = 64 * 1024  # of plain output kept for the answer; the log has all of it


def fill(command: list[str], *, prompt: str, model: str | None,
         session_id: str | None = None) -> list[str]:
    """The argv for one run: placeholders replaced, a model flag dropped when there is none."""
    out: list[str] = []
    for part in command:
        if part == MODEL and not model:
            if out and out[-1].startswith("-"):
                out.pop()  # "--model" goes with its missing value
            continue
        part = part.replace(MODEL, model or "")
        if session_id is not None:
            part = part.replace(SESSION, session_id)
        out.append(prompt if part == PROMPT else part)
    return out


def with_history(prompt: str, history: list[tuple[str, str]]) -> str:
    """The earlier turns ahead of the prompt, for a CLI that cannot resume a session."""
    if not history:
        return prompt
    turns = "\n\n".join(f"User: {asked}\n\nAssistant: {answered}" for asked, answered in history)
    return f"The conversation so far:\n\n{turns}\n\nNow: {prompt}"


class GenericRunner(CliRunner):
    """``settings`` of one ``[agents.NAME]`` table."""

    def __init__(self, name: str, settings: AgentCliSettings, **kwargs: Any) -> None:
        super().__init__(binary=settings.command[0], model=None, extra_args=[],
                         timeout_s=settings.timeout_seconds, **kwargs)
        self.name = name
        self.settings = settings
        self.install_hint = f"install it, or set [agents.{name}] command"

    def _argv_template(self, request: RunRequest) -> list[str]:
        if request.resume_session_id and self.settings.resume:
            return self.settings.resume
        return self.settings.command

    def _prompt(self, request: RunRequest) -> str:
        if request.resume_session_id and self.settings.resume:
            return request.prompt
        return with_history(request.prompt, request.history)

    def argv(self, binary: str, request: RunRequest, model: str | None) -> list[str]:
        argv = fill(self._argv_template(request), prompt=self._prompt(request), model=model,
                    session_id=request.resume_session_id)
        return [binary, *argv[1:]]

    def stdin_data(self, request: RunRequest) -> bytes:
        if any(PROMPT in part for part in self._argv_template(request)):
            return b""  # the prompt is an argument
        return self._prompt(request).encode("utf-8", "surrogateescape")

    def handler(
        self, writer: EnvelopeWriter, stderr: BinaryIO, request: RunRequest, model: str | None
    ) -> CliHandler:
        codes = set(self.settings.success_exit_codes)
        if self.settings.output == "claude-stream-json":
            return _EnvelopeHandler(writer, stderr, codes, request.max_cost_usd)
        cwd = str(request.workdir) if request.workdir else None
        return _TextHandler(writer, self.name, model, cwd, codes)


class _EnvelopeHandler(ClaudeHandler):
    """A CLI that prints Claude's envelope: read as claude's is, success by its exit codes."""

    def __init__(self, writer: EnvelopeWriter, stderr: BinaryIO, codes: set[int],
                 max_cost_usd: float | None) -> None:
        super().__init__(writer, stderr, max_retries=2, max_cost_usd=max_cost_usd)
        self.codes = codes

    def result(self, outcome: ProcOutcome, duration_ms: int) -> RunResult:
        out = super().result(outcome, duration_ms)
        if outcome.exit_code is not None and outcome.exit_code not in self.codes:
            out.status = RunStatus.FAILED
            out.error = out.error or f"exited with code {outcome.exit_code}"
        elif out.status == RunStatus.FAILED and outcome.exit_code in self.codes and (
                self.summary.has_result and not self.summary.is_error):
            out.status, out.error = RunStatus.SUCCEEDED, None
        return out


class _TextHandler(CliHandler):
    """Plain text output: each line a delta, the output's end the answer.

    The whole output is in the log as deltas; memory holds only its last ``TAIL_CHARS``, so a
    CLI that prints gigabytes costs the daemon nothing more than one that prints a line.
    """

    def __init__(self, writer: EnvelopeWriter, name: str, model: str | None, cwd: str | None,
                 codes: set[int]) -> None:
        self.w = writer
        self.name = name
        self.model = model
        self.codes = codes
        self.session_id = new_session_id()
        self.tail: deque[str] = deque()
        self.tail_chars = 0
        self.dropped_chars = 0
        self.stderr_tail: deque[str] = deque(maxlen=5)
        writer.init(session_id=self.session_id, model=model, cwd=cwd, source=name)

    def stdout_line(self, line: bytes) -> Stop | None:
        text = line.decode("utf-8", "replace") + "\n"
        self.w.text_delta(text, keep=False)
        self.tail.append(text)
        self.tail_chars += len(text)
        while self.tail_chars > TAIL_CHARS and len(self.tail) > 1:
            gone = len(self.tail.popleft())
            self.tail_chars -= gone
            self.dropped_chars += gone
        return None

    def stderr_line(self, line: bytes) -> Stop | None:
        text = line.decode("utf-8", "replace").strip()
        if text:
            self.stderr_tail.append(text)
        return None

    def _error(self, outcome: ProcOutcome) -> str | None:
        if outcome.start_error:
            return outcome.start_error
        if outcome.stopped:
            return outcome.stopped.reason
        if outcome.exit_code in self.codes:
            return None
        said = " | ".join(list(self.stderr_tail)[-2:]) or "nothing on stderr"
        return f"{self.name} exited with code {outcome.exit_code}: {said}"

    def result(self, outcome: ProcOutcome, duration_ms: int) -> RunResult:
        text = "".join(self.tail).rstrip("\n")
        if self.dropped_chars:
            text = f"[the first {self.dropped_chars} characters are in the log]\n{text}"
        error = self._error(outcome)
        if text:
            self.w.assistant(message_id=new_message_id(), model=self.model,
                             session_id=self.session_id, content=[{"type": "text", "text": text}])
        self.w.result(is_error=error is not None, result=text, session_id=self.session_id,
                      duration_ms=duration_ms, usage={}, total_cost_usd=None, num_turns=1,
                      error=error)
        return RunResult(status=RunStatus.FAILED if error else RunStatus.SUCCEEDED,
                         summary=trim_tail(text) or trim(error), exit_code=outcome.exit_code,
                         error=error, final_text=text, model=self.model, retryable=False)
