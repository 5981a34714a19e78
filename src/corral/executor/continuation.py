"""Which conversation an execution continues: a reply, or a run a crash interrupted.

A task's follow-up (``corral reply``) continues the agent's own session where the agent can
resume one (claude's ``--resume``, gemini's own resume), and otherwise carries the earlier turns
in the request (the local model's messages). An execution a crash or a shutdown interrupted
continues its session too, instead of starting over. A plain retry of a failed first prompt
starts afresh. Sessions and answers are read back from each execution's envelope, the one
record of what was said (a crashed run never wrote its session id to the database).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from corral.executor.runner import STDOUT_LOG
from corral.executor.streamjson import EnvelopeSummary, read_events, summarize
from corral.models import ExecStatus, Execution, Task

INTERRUPTED_NOTE = ("(corral: the previous run of this task was interrupted before it finished;"
                    " continue where it left off.)\n\n")


@dataclass(frozen=True, slots=True)
class Continuation:
    """What a runner needs to go on from the earlier executions (nothing: a fresh start)."""

    prompt: str
    resume_session_id: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)  # (asked, answered) turns


def _summary(execution: Execution) -> EnvelopeSummary:
    if not execution.log_dir:
        return EnvelopeSummary()
    return summarize(read_events(Path(execution.log_dir) / STDOUT_LOG))


async def continuation(task: Task, execution: Execution, earlier: list[Execution]) -> Continuation:
    """How ``execution`` of ``task`` goes on from the ``earlier`` executions (oldest first)."""
    prompt = execution.prompt or task.prompt
    if not earlier:
        return Continuation(prompt)
    last = earlier[-1]
    interrupted = last.status == ExecStatus.INTERRUPTED
    if task.current_prompt is None and not interrupted:
        return Continuation(prompt)  # a retry of the first prompt starts afresh
    summaries = await asyncio.to_thread(lambda: [_summary(e) for e in earlier])
    session = None
    for done, summary in zip(reversed(earlier), reversed(summaries), strict=True):
        if done.agent == execution.agent and (done.session_id or summary.session_id):
            session = done.session_id or summary.session_id
            break
    history = [(e.prompt or task.prompt, s.result_text or s.last_assistant_text or "")
               for e, s in zip(earlier, summaries, strict=True)
               if e.status != ExecStatus.INTERRUPTED and (s.result_text or s.last_assistant_text)]
    if interrupted:
        prompt = INTERRUPTED_NOTE + prompt
    return Continuation(prompt, session, history)
