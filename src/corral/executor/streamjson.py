"""The stream-json envelope every runner writes to ``stdout.log``, and the reader for it.

The envelope is what ``claude -p --output-format stream-json --verbose`` prints: ``system/init``,
``stream_event`` text deltas, ``assistant`` messages, and a ``result`` terminator. One reader
therefore extracts summary, cost, tokens and session from any runner's log. The reader tolerates
unknown event types, blank or partial lines, and a missing terminator (a crash mid-run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.executor.logfiles import open_log

SUMMARY_CHARS = 280
# How long an envelope line may wait to share a write with the lines after it.
FLUSH_INTERVAL_S = 0.05
_FLUSH_BYTES = 256 * 1024
# Built once: json.dumps with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_DELTA_HEAD = (b'{"type":"stream_event","event":{"type":"content_block_delta","index":0,'
               b'"delta":{"type":"text_delta","text":')
_DELTA_TAIL = b"}}}\n"

_CHANGESTAT = re.compile(
    r"(\d+) files? changed(?:, (\d+) insertions?\(\+\))?(?:, (\d+) deletions?\(-\))?"
)


def new_session_id() -> str:
    """A random UUID4 string. Not for secrets: it comes from ``random``, which costs no syscall."""
    return str(uuid.UUID(int=random.getrandbits(128), version=4))


def new_message_id() -> str:
    """An Anthropic-style message id, ``msg_`` and 24 hex digits."""
    return f"msg_{random.getrandbits(96):024x}"


def _utf8(encoded_json: str) -> bytes:
    # A lone surrogate (a model can stream one) becomes its \uXXXX escape, which is still
    # valid JSON, rather than an encoding error that would lose the line.
    return encoded_json.encode("utf-8", "backslashreplace")


class EnvelopeWriter:
    """Appends envelope events to a file as JSON lines, batched over a few milliseconds.

    Lines reach the file at most ``flush_interval_s`` after they are written (at once when no
    event loop runs), so ``corral logs -f`` still shows progress live, while a fast run costs
    one write instead of one per line. Closing flushes. The writer also keeps the text streamed
    so far, so a failure can keep the partial answer.
    """

    def __init__(
        self,
        path: Path,
        *,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        on_flush: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self._on_flush = on_flush
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._parts: list[str] = []
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._holding = False
        self._flush_interval_s = flush_interval_s
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EnvelopeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def write_line(self, line: bytes) -> None:
        """Write one already-encoded JSON line (a CLI's own output, kept byte for byte)."""
        if not line.endswith(b"\n"):
            line += b"\n"
        self._pending.append(line)
        self._pending_bytes += len(line)
        if not self._holding:
            self._schedule()

    def flush(self) -> None:
        """Write out every pending line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self._fd < 0:
            return
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        self._pending_bytes = 0
        while data:
            data = data[os.write(self._fd, data):]
        if self._on_flush is not None:
            self._on_flush()

    def _schedule(self) -> None:
        if self._timer is not None and self._pending_bytes < _FLUSH_BYTES:
            return
        if self._flush_interval_s <= 0 or self._pending_bytes >= _FLUSH_BYTES:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._timer = loop.call_later(self._flush_interval_s, self.flush)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Lines written inside the block reach the file in one write, as one unit."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            self._schedule()

    def event(self, event: dict[str, Any]) -> None:
        self.write_line(_utf8(_ENCODER.encode(event)))

    def init(self, *, session_id: str, model: str | None, cwd: str | None, **extra: Any) -> None:
        self.event({"type": "system", "subtype": "init", "session_id": session_id,
                    "model": model, "cwd": cwd, **extra})

    def text_delta(self, text: str, *, keep: bool = True) -> None:
        """A streamed piece of text; ``keep=False`` for output of no bound, kept by the caller."""
        if keep:
            self._parts.append(text)
        # One line per token on a real model: built from a template, byte for byte what
        # event() would write, at a tenth of the cost.
        self.write_line(_DELTA_HEAD + _utf8(_ENCODER.encode(text)) + _DELTA_TAIL)

    def assistant(
        self,
        *,
        message_id: str,
        model: str | None,
        content: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> None:
        self.event({"type": "assistant", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": content, "usage": usage or {}}, "session_id": session_id})

    def result(
        self,
        *,
        is_error: bool,
        result: str,
        session_id: str | None,
        duration_ms: int,
        usage: dict[str, Any],
        total_cost_usd: float | None,
        num_turns: int = 1,
        error: str | None = None,
        **extra: Any,
    ) -> None:
        event: dict[str, Any] = {
            "type": "result",
            "subtype": "error_during_execution" if is_error else "success",
            "is_error": is_error, "result": result, "session_id": session_id,
            "duration_ms": duration_ms, "num_turns": num_turns,
            "total_cost_usd": total_cost_usd, "usage": usage, **extra,
        }
        if error is not None:
            event["error"] = error
        self.event(event)


def parse_line(line: bytes | str) -> dict[str, Any] | None:
    """One JSON object from a log line, or None for blank, partial or non-object lines."""
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def iter_events(lines: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        event = parse_line(line)
        if event is not None:
            yield event


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every readable event in a log file (plain or compressed); a missing file is an empty log."""
    try:
        with open_log(path) as fh:
            return list(iter_events(fh))
    except FileNotFoundError:
        return []


@dataclass(slots=True)
class EnvelopeSummary:
    """What a finished (or crashed) run's envelope says."""

    session_id: str | None = None
    model: str | None = None
    result_text: str | None = None
    last_assistant_text: str | None = None
    is_error: bool | None = None
    cost_usd: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    has_result: bool = False
    result_event: dict[str, Any] | None = None


def assistant_text(event: dict[str, Any]) -> str:
    message = event.get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return ""
    return "".join(
        str(block.get("text", "")) for block in content
        if isinstance(block, dict) and block.get("type") == "text"
    )


def summarize(events: Iterable[dict[str, Any]]) -> EnvelopeSummary:
    out = EnvelopeSummary()
    for event in events:
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init":
            out.session_id = event.get("session_id") or out.session_id
            out.model = event.get("model") or out.model
        elif kind == "assistant":
            text = assistant_text(event)
            if text.strip():
                out.last_assistant_text = text
        elif kind == "result":
            apply_result(out, event)
    return out


def apply_result(out: EnvelopeSummary, event: dict[str, Any]) -> None:
    out.has_result = True
    out.result_event = event
    out.session_id = event.get("session_id") or out.session_id
    result = event.get("result")
    out.result_text = result if isinstance(result, str) else None
    out.is_error = bool(event.get("is_error")) or str(event.get("subtype", "")).startswith("error")
    cost = event.get("total_cost_usd", event.get("cost_usd"))
    out.cost_usd = float(cost) if isinstance(cost, int | float) else None
    usage = event.get("usage") or {}
    if isinstance(usage, dict):
        tokens_in = sum(
            int(usage.get(k) or 0)
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        out.tokens_in = tokens_in
        out.tokens_out = int(usage.get("output_tokens") or 0)


def extract_summary(events: Iterable[dict[str, Any]], limit: int = SUMMARY_CHARS) -> str | None:
    """The result text, else the last assistant text, on one line and trimmed to ``limit``."""
    summary = summarize(events)
    text = summary.result_text if summary.result_text and summary.result_text.strip() else None
    return trim(text or summary.last_assistant_text, limit)


def trim(text: str | None, limit: int = SUMMARY_CHARS) -> str | None:
    if not text:
        return None
    flat = " ".join(text.split())
    if not flat:
        return None
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def trim_tail(text: str | None, limit: int = SUMMARY_CHARS) -> str | None:
    """Like :func:`trim`, but keeps the end: where a CLI's plain output says how it ended."""
    flat = trim(text, len(text or "") + 1)
    if flat is None or len(flat) <= limit:
        return flat
    return "…" + flat[-(limit - 1):].lstrip()


@dataclass(frozen=True, slots=True)
class ChangeStat:
    files_changed: int
    insertions: int
    deletions: int


def parse_changestat(text: str) -> ChangeStat | None:
    """The last ``N files changed, X insertions(+), Y deletions(-)`` in ``text``, if any."""
    last = None
    for match in _CHANGESTAT.finditer(text):
        last = match
    if last is None:
        return None
    return ChangeStat(int(last.group(1)), int(last.group(2) or 0), int(last.group(3) or 0))
