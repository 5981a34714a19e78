"""Shapes shared by the API, the store and the CLI: tasks, executions and their states.

Kept free of heavy imports: the CLI reads these names without loading the daemon.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field, fields
from typing import Any


class TaskState(enum.StrEnum):
    BLOCKED = "blocked"  # waiting for the tasks it depends on to succeed
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_TASK_STATES


FINAL_TASK_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


class ExecStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RATE_LIMITED = "rate_limited"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class AgentType(enum.StrEnum):
    CLAUDE = "claude"
    GEMINI = "gemini"
    CODEX = "codex"
    LOCAL = "local"


AUTO = "auto"
KNOWN_AGENTS: tuple[str, ...] = tuple(a.value for a in AgentType)


@dataclass(frozen=True, slots=True)
class Workspace:
    """A task's own git worktree and branch (``state``: planned, active, removed, merged,
    discarded). ``subdir`` is where the task's dir sits inside the repository."""

    repo: str
    path: str
    branch: str
    base_commit: str
    subdir: str = "."
    state: str = "planned"
    # A dependency's branch to start from instead (its tip when the worktree is made).
    base_branch: str | None = None

    def replace(self, **changes: Any) -> Workspace:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"repo": self.repo, "path": self.path, "branch": self.branch,
                "base_commit": self.base_commit, "subdir": self.subdir, "state": self.state,
                "base_branch": self.base_branch}


@dataclass(slots=True)
class Task:
    id: int
    prompt: str
    state: TaskState
    requested_agent: str | None = None
    requested_model: str | None = None
    agent: str | None = None
    model: str | None = None
    pinned: bool = False
    classifier_reason: str | None = None
    workdir: str | None = None
    priority: int = 0
    attempts: int = 0
    max_retries: int = 0
    timeout_s: float | None = None
    error: str | None = None
    isolate: bool = True
    base_ref: str | None = None
    workspace: Workspace | None = None
    # What the next execution is asked: the prompt, or the reply that follows it.
    current_prompt: str | None = None
    max_cost_usd: float | None = None
    schedule_id: int | None = None
    # The node whose daemon may run it (paths are host-local); None: any node.
    node: str | None = None
    depends_on: list[int] = field(default_factory=list)  # what it waits for
    dependents: list[int] = field(default_factory=list)  # what waits for it
    rate_limit_requeues: int = 0
    run_after: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    executions: list[Execution] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # Field by field rather than dataclasses.asdict: this runs for every API answer.
        data = {name: getattr(self, name) for name in _TASK_FIELDS}
        data["state"] = str(self.state)
        data["workspace"] = None if self.workspace is None else self.workspace.to_dict()
        data["executions"] = [e.to_dict() for e in self.executions]
        return data


@dataclass(slots=True)
class Execution:
    id: int
    task_id: int
    agent: str
    model: str | None
    status: ExecStatus
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    session_id: str | None = None
    summary: str | None = None
    cost_usd: float | None = None
    cost_estimated: bool = False  # from [prices] and the tokens: the agent reported no cost
    tokens_in: int | None = None
    tokens_out: int | None = None
    files_changed: int | None = None
    insertions: int | None = None
    deletions: int | None = None
    log_dir: str | None = None
    pgid: int | None = None
    duration_ms: int | None = None  # set from the two times by whoever reads them
    prompt: str | None = None  # what this execution was asked (the task's prompt or a reply)
    commit: str | None = None  # the commit on the task's branch that records what it changed
    resumed_session: str | None = None  # the agent session it continued, if any
    actions: str | None = None  # the local model: text, tools or schema
    node_id: str | None = None  # the daemon that ran it
    files: list[FileChange] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _EXECUTION_FIELDS}
        data["status"] = str(self.status)
        data["files"] = [dataclasses.asdict(f) for f in self.files]
        return data


@dataclass(slots=True)
class Schedule:
    """A cron expression that submits ``prompt`` with ``options`` at each firing."""

    id: int
    cron: str
    prompt: str
    options: dict[str, Any]
    created_at: float
    last_fired_at: float | None = None
    last_task_id: int | None = None
    next_at: float | None = None  # worked out when shown

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "id", "cron", "prompt", "options", "created_at", "last_fired_at", "last_task_id",
            "next_at")}


@dataclass(frozen=True, slots=True)
class FileChange:
    """One file an execution changed (from ``git diff --numstat`` of its commit)."""

    path: str
    insertions: int
    deletions: int


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """A process group leader as the kernel knows it: pid (= pgid), start time, boot.

    A pid alone can be reused by an unrelated process, above all after a reboot; the start time
    (clock ticks since boot) and the boot's id together name exactly one process.
    """

    pgid: int
    started: int | None
    boot_id: str | None


_TASK_FIELDS = tuple(f.name for f in fields(Task) if f.name not in ("executions", "workspace"))
_EXECUTION_FIELDS = tuple(f.name for f in fields(Execution) if f.name != "files")
