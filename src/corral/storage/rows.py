"""What both backends share: the column lists they select and the rows turned into models.

A backend's SQL differs (placeholders, JSON, locking), the shape of a task or an execution does
not: selecting these columns in this order gives the same ``Task`` and ``Execution`` anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from corral.models import ExecStatus, Execution, Schedule, Task, TaskState, Workspace


class Row(Protocol):
    """A row as either driver returns it: indexable by column position."""

    def __getitem__(self, index: int, /) -> Any: ...


R = TypeVar("R")

TASK_COLS = (
    "id, prompt, requested_agent, requested_model, agent, model, pinned, classifier_reason,"
    " workdir, priority, state, attempts, max_retries, timeout_s, error, rate_limit_requeues,"
    " run_after, created_at, updated_at, isolate, base_ref, ws_repo, ws_path, ws_branch,"
    " ws_base_commit, ws_subdir, ws_state, current_prompt, ws_base_branch, max_cost_usd,"
    " schedule_id, node"
)
EXEC_COLS = (
    "id, task_id, agent, model, status, started_at, finished_at, exit_code, error, session_id,"
    " summary, cost_usd, tokens_in, tokens_out, files_changed, insertions, deletions,"
    " log_dir, pgid, prompt, commit_sha, resumed_session, actions, cost_estimated, node_id"
)
SCHEDULE_COLS = "id, cron, prompt, options, created_at, last_fired_at, last_task_id"

EXEC_RESULT_FIELDS = frozenset({
    "status", "finished_at", "exit_code", "error", "session_id", "summary", "cost_usd",
    "tokens_in", "tokens_out", "files_changed", "insertions", "deletions", "pgid", "model",
    "commit_sha", "resumed_session", "actions", "cost_estimated",
})
TASK_UPDATE_FIELDS = frozenset({
    "state", "attempts", "error", "run_after", "agent", "model", "classifier_reason",
    "rate_limit_requeues", "current_prompt", "pinned",
})


def got(row: R | None) -> R:
    """A row a statement always returns (``INSERT … RETURNING``, a row locked before)."""
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


def task(row: Row) -> Task:
    return Task(
        id=row[0], prompt=row[1], requested_agent=row[2], requested_model=row[3], agent=row[4],
        model=row[5], pinned=bool(row[6]), classifier_reason=row[7], workdir=row[8],
        priority=row[9], state=TaskState(row[10]), attempts=row[11], max_retries=row[12],
        timeout_s=row[13], error=row[14], rate_limit_requeues=row[15], run_after=row[16],
        created_at=row[17], updated_at=row[18], isolate=bool(row[19]), base_ref=row[20],
        workspace=None if row[21] is None else Workspace(
            repo=row[21], path=row[22], branch=row[23], base_commit=row[24], subdir=row[25],
            state=row[26], base_branch=row[28]),
        current_prompt=row[27], max_cost_usd=row[29], schedule_id=row[30], node=row[31],
    )


def execution(row: Row) -> Execution:
    return Execution(
        id=row[0], task_id=row[1], agent=row[2], model=row[3], status=ExecStatus(row[4]),
        started_at=row[5], finished_at=row[6], exit_code=row[7], error=row[8], session_id=row[9],
        summary=row[10], cost_usd=row[11], tokens_in=row[12], tokens_out=row[13],
        files_changed=row[14], insertions=row[15], deletions=row[16], log_dir=row[17],
        pgid=row[18],
        duration_ms=None if row[6] is None else int((row[6] - row[5]) * 1000),
        prompt=row[19], commit=row[20], resumed_session=row[21], actions=row[22],
        cost_estimated=bool(row[23]), node_id=row[24],
    )


def schedule(row: Row) -> Schedule:
    return Schedule(id=row[0], cron=row[1], prompt=row[2], options=json.loads(row[3]),
                    created_at=row[4], last_fired_at=row[5], last_task_id=row[6])


def result_values(execution: dict[str, Any], now: float) -> dict[str, Any]:
    """An execution's outcome as column values (checked against what may change)."""
    unknown = set(execution) - EXEC_RESULT_FIELDS
    if unknown:
        raise ValueError(f"cannot update execution fields {sorted(unknown)}")
    values = {k: (str(v) if isinstance(v, ExecStatus) else v) for k, v in execution.items()}
    if "cost_estimated" in values:  # a flag, whatever the caller counted it with
        values["cost_estimated"] = bool(values["cost_estimated"])
    values.setdefault("finished_at", now)
    return values


def task_values(fields: dict[str, Any]) -> dict[str, Any]:
    """A task's changed fields as column values (checked against what may change)."""
    unknown = set(fields) - TASK_UPDATE_FIELDS
    if unknown:
        raise ValueError(f"cannot update task fields {sorted(unknown)}")
    values = {k: (str(v) if isinstance(v, TaskState) else v) for k, v in fields.items()}
    if "pinned" in values:
        values["pinned"] = bool(values["pinned"])
    return values


def usage_rows(rows: Sequence[Row], by: str) -> list[dict[str, Any]]:
    return [{by: r[0], "executions": r[1], "cost_usd": round(r[2] or 0.0, 6),
             "cost_estimated_usd": round(r[3] or 0.0, 6),
             "tokens_in": r[4] or 0, "tokens_out": r[5] or 0} for r in rows]


def stats(states: Sequence[Row], rows: Sequence[Row]) -> dict[str, Any]:
    """``stats`` from the counters: tasks per state, and per agent (executions, succeeded,
    failed, rate_limited, cost, estimated cost, tokens in and out, duration)."""
    by_state = {str(s): 0 for s in TaskState}
    by_state.update({r[0]: r[1] for r in states if r[1]})
    agents = {
        row[0]: {
            "executions": row[1], "succeeded": row[2], "failed": row[3],
            "rate_limited": row[4], "cost_usd": round(row[5], 6),
            "cost_estimated_usd": round(row[6], 6), "tokens_in": row[7],
            "tokens_out": row[8],
            "avg_duration_ms": int(row[9] / row[1]) if row[1] else None,
        } for row in rows}
    return {"tasks": by_state, "agents": agents}


def totals(rows: Sequence[Row]) -> dict[int, dict[str, Any]]:
    return {r[0]: {"executions": r[1], "cost_usd": r[2], "tokens_in": r[3],
                   "tokens_out": r[4], "duration_ms": r[5], "files_changed": r[6],
                   "insertions": r[7], "deletions": r[8]} for r in rows}
