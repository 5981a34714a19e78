"""Text for people: task tables, task details, and the envelope rendered as a readable log.

Standard library only: the CLI's client commands use it without loading the daemon.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, TextIO


def _age(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    seconds = max(now - ts, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _one_line(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def task_table(tasks: list[dict[str, Any]], now: float | None = None) -> str:
    now = time.time() if now is None else now
    if not tasks:
        return "no tasks"
    rows = [("ID", "STATE", "AGENT", "PRI", "TRIES", "CREATED", "PROMPT")]
    for t in tasks:
        rows.append((str(t["id"]), t["state"], t.get("agent") or "?", str(t["priority"]),
                     str(t["attempts"]), _age(t.get("created_at"), now),
                     _one_line(t["prompt"], 50)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def _workspace_line(task: dict[str, Any]) -> str:
    ws = task.get("workspace")
    if ws:
        return (f"  workspace: {ws['branch']} in {ws['path']} ({ws['state']};"
                f" from {ws['base_commit'][:12]} of {ws['repo']})")
    if not task.get("workdir"):
        return "  workspace: - (no working dir)"
    if task.get("isolate") is False:
        return "  workspace: - (runs in place: --no-isolate)"
    return "  workspace: - (runs in place: not a git repository)"


def workspace_table(workspaces: list[dict[str, Any]]) -> str:
    if not workspaces:
        return "no workspaces"
    rows = [("TASK", "STATE", "BRANCH", "AHEAD", "BEHIND", "DISK", "PATH")]
    for w in workspaces:
        rows.append((str(w["task_id"]), f"{w['task_state']}/{w['state']}", w["branch"],
                     _count(w.get("ahead")), _count(w.get("behind")),
                     _size(w.get("disk_bytes")), w["path"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(c.ljust(wd) for c, wd in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def _count(value: object) -> str:
    return "-" if value is None else str(value)


def _size(value: object) -> str:
    if not isinstance(value, int):
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value}{unit}" if unit == "B" else f"{value:.0f}{unit}"
        value //= 1024
    return f"{value}GiB"


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}".rstrip("0").rstrip(".")


def task_detail(task: dict[str, Any]) -> str:
    lines = [
        f"task {task['id']}: {task['state']}",
        f"  prompt:    {_one_line(task['prompt'], 200)}",
        f"  agent:     {task.get('agent') or '(not yet decided)'}"
        + (f" (asked for {task['requested_agent']})" if task.get("requested_agent") else ""),
        f"  model:     {task.get('model') or '(agent default)'}",
        f"  why:       {task.get('classifier_reason') or '-'}",
        f"  workdir:   {task.get('workdir') or '-'}",
        _workspace_line(task),
        f"  priority:  {task['priority']}   attempts: {task['attempts']}"
        f" (retries allowed: {task['max_retries']})",
    ]
    if task.get("depends_on"):
        lines.append(f"  waits for: {', '.join(map(str, task['depends_on']))}")
    if task.get("dependents"):
        lines.append(f"  waited by: {', '.join(map(str, task['dependents']))}")
    if task.get("max_cost_usd"):
        lines.append(f"  budget:    {_money(task['max_cost_usd'])}")
    if task.get("error"):
        lines.append(f"  error:     {task['error']}")
    for e in task.get("executions") or []:
        lines.append(
            f"  execution {e['id']}: {e['status']} on {e['agent']}"
            f" ({e.get('model') or 'default model'})"
            f" {e['duration_ms'] if e.get('duration_ms') is not None else '-'} ms,"
            f" cost {_money(e.get('cost_usd'))}"
            f"{' (estimated)' if e.get('cost_estimated') else ''},"
            f" tokens {e.get('tokens_in') or 0} in / {e.get('tokens_out') or 0} out"
            + (f", actions: {e['actions']}" if e.get("actions") else "")
        )
        if e.get("files_changed") is not None:
            commit = f" in {e['commit'][:12]}" if e.get("commit") else ""
            lines.append(f"    changed: {e['files_changed']} files,"
                         f" +{e.get('insertions') or 0} -{e.get('deletions') or 0}{commit}")
        if e.get("summary"):
            lines.append(f"    summary: {_one_line(e['summary'], 200)}")
        if e.get("error"):
            lines.append(f"    error:   {e['error']}")
    return "\n".join(lines)


class LogRenderer:
    """Turns envelope lines into text as they arrive: streamed text, tool calls, the result."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.streamed = False
        self.at_line_start = True

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.at_line_start = text.endswith("\n")
            self.out.flush()

    def _line(self, text: str) -> None:
        if not self.at_line_start:
            self._write("\n")
        self._write(text + "\n")

    def feed(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return
        if isinstance(event, dict):
            self.event(event)

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init":
            self._line(f"[{event.get('model') or 'agent'} · session {event.get('session_id')}]")
        elif kind == "system" and event.get("subtype") in ("api_retry", "error"):
            self._line(f"[{event.get('subtype')}: {event.get('error') or event.get('message')}]")
        elif kind == "stream_event":
            delta = (event.get("event") or {}).get("delta") or {}
            if delta.get("type") == "text_delta":
                self.streamed = True
                self._write(str(delta.get("text", "")))
        elif kind == "assistant":
            self._assistant(event)
        elif kind == "result":
            self._result(event)

    def _assistant(self, event: dict[str, Any]) -> None:
        for block in (event.get("message") or {}).get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and not self.streamed:
                self._write(str(block.get("text", "")))
            elif block.get("type") == "tool_use":
                args = json.dumps(block.get("input") or {}, ensure_ascii=False)
                self._line(f"→ {block.get('name')} {_one_line(args, 100)}")
        self.streamed = False

    def _result(self, event: dict[str, Any]) -> None:
        usage = event.get("usage") or {}
        tokens_in = sum(int(usage.get(k) or 0) for k in (
            "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        state = "failed" if event.get("is_error") else "done"
        cost = event.get("total_cost_usd", event.get("cost_usd"))
        detail = f" · {event['error']}" if event.get("error") else ""
        self._line(
            f"— {state} · cost {_money(cost if isinstance(cost, int | float) else None)}"
            f" · {tokens_in} in / {int(usage.get('output_tokens') or 0)} out tokens"
            f" · {int(event.get('duration_ms') or 0) / 1000:.1f}s{detail}"
        )


def render_log(lines: Iterable[bytes], out: TextIO) -> None:
    renderer = LogRenderer(out)
    for line in lines:
        renderer.feed(line)
    if not renderer.at_line_start:
        out.write("\n")
