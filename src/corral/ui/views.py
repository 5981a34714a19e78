"""What the dashboard shows, as data for its templates: log events as conversation items, and
the spend chart's bars. No I/O here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

RESULT_PREVIEW_CHARS = 4000  # of a tool's output, inside its collapsed box


@dataclass(frozen=True, slots=True)
class LogItem:
    """One piece of the conversation: ``delta`` text goes on the bubble being streamed,
    ``text`` is a whole assistant message (it replaces that bubble), the rest are appended."""

    kind: str  # delta, text, tool, result, session, end
    html: str = ""
    text: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "html": self.html, "text": self.text}


def _block(css: str, title: str, body: Markup | str) -> str:
    return str(Markup('<div class="item {}"><div class="who">{}</div>{}</div>').format(
        css, title, body))


def _tool_result(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, list):
        content = "\n".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    text = str(content or "")
    if len(text) > RESULT_PREVIEW_CHARS:
        text = text[:RESULT_PREVIEW_CHARS] + f"\n… ({len(text) - RESULT_PREVIEW_CHARS} more)"
    failed = bool(block.get("is_error"))
    summary = "error" if failed else f"result ({len(text.splitlines())} lines)"
    return str(Markup('<details class="item tool-result{}"><summary>{}</summary><pre>{}</pre>'
                      "</details>").format(" error" if failed else "", summary, text))


def log_items(event: dict[str, Any]) -> list[LogItem]:
    """The conversation items one envelope event stands for (none for bookkeeping)."""
    kind = event.get("type")
    if kind == "stream_event":
        delta = (event.get("event") or {}).get("delta") or {}
        text = delta.get("text")
        return [LogItem("delta", text=text)] if isinstance(text, str) and text else []
    if kind == "system" and event.get("subtype") == "init":
        what = " · ".join(str(v) for v in (event.get("source") or "agent", event.get("model"),
                                           event.get("cwd")) if v)
        return [LogItem("session", _block("session", "session", escape(what)))]
    if kind == "system" and event.get("subtype") == "error":
        return [LogItem("error", _block("error", "error", escape(event.get("message", ""))))]
    if kind == "assistant":
        return [_assistant_block(b) for b in (event.get("message") or {}).get("content") or []
                if isinstance(b, dict) and b.get("type") in ("text", "tool_use")]
    if kind == "user":
        content = (event.get("message") or {}).get("content") or []
        return [LogItem("result", _tool_result(b)) for b in content
                if isinstance(b, dict) and b.get("type") == "tool_result"]
    if kind == "result":
        return [_end(event)]
    return []


def _assistant_block(block: dict[str, Any]) -> LogItem:
    if block.get("type") == "text":
        text = str(block.get("text", ""))
        return LogItem("text", _block("assistant", "assistant", Markup("<p>{}</p>").format(text)),
                       text=text)
    body = Markup("<span class=\"tool-name\">{}</span><pre>{}</pre>").format(
        block.get("name", "?"), json.dumps(block.get("input") or {}, indent=1))
    return LogItem("tool", _block("tool", "tool call", body))


def _end(event: dict[str, Any]) -> LogItem:
    usage = event.get("usage") or {}
    cost = event.get("total_cost_usd")
    parts = [f"{event.get('num_turns') or 0} turns",
             f"{usage.get('input_tokens', 0)} in / {usage.get('output_tokens', 0)} out tokens"]
    if isinstance(cost, int | float):
        parts.append(f"${cost:.4f}")
    error = event.get("error")
    failed = bool(event.get("is_error"))
    line = " · ".join(parts)
    body = Markup("<p>{}</p>").format(line) + (
        Markup('<p class="error-text">{}</p>').format(error) if failed and error else "")
    return LogItem("end", _block("end error" if failed else "end",
                                 "failed" if failed else "done", body))


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: float
    x: float
    y: float
    width: float
    height: float


def bars(points: list[tuple[str, float]], *, width: float = 720, height: float = 180,
         gap: float = 4) -> list[Bar]:
    """An inline SVG bar chart's bars, scaled to the largest value."""
    if not points:
        return []
    top = max(value for _, value in points) or 1.0
    step = width / len(points)
    return [Bar(label, value, x=i * step + gap / 2, y=height - value / top * height,
                width=max(step - gap, 1.0), height=value / top * height)
            for i, (label, value) in enumerate(points)]
