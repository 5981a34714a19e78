"""The ``Store`` protocol: what the pool, the server and the daemon need of a backend.

The store is the queue. A backend keeps tasks and their executions, claims ready tasks for free
agent slots atomically (a claim and the execution it opens are one transaction), and after a
crash hands back what was left running. ``storage/sqlite.py`` is the embedded default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corral.models import (
    Execution,
    FileChange,
    ProcessIdentity,
    Schedule,
    Task,
    TaskState,
    Workspace,
)

Clock = Callable[[], float]
# (the classifier's choice, free slots per agent) -> the agent a task runs on
Balancer = Callable[[str | None, Mapping[str, int]], str]


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one claim took, and when the earliest delayed task left behind becomes ready."""

    tasks: list[tuple[Task, Execution]]
    next_ready_at: float | None


@dataclass(frozen=True, slots=True)
class Finished:
    """A task's state after a change, and the dependents that change moved (their states)."""

    state: TaskState
    dependents: dict[int, TaskState]


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks a listing shows; it is always newest first (by creation, then id)."""

    state: TaskState | None = None
    agent: str | None = None
    since: float | None = None  # created at or after
    until: float | None = None  # created before
    before: int | None = None  # the cursor: only tasks listed after this one


EVERY_TASK = TaskFilter()


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[Task]
    next: int | None  # the cursor for the next page; None on the last one


@dataclass(frozen=True, slots=True)
class Pruned:
    """What a prune removed (or, dry, would remove); the log folders are the caller's to delete."""

    tasks: int
    executions: int
    log_dirs: list[str]


class Store(Protocol):
    """Tasks and executions; every method is safe to call concurrently."""

    node_id: str  # the daemon this store claims for, recorded on every execution it opens

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create_task(
        self,
        prompt: str,
        *,
        requested_agent: str | None = None,
        requested_model: str | None = None,
        agent: str | None = None,
        model: str | None = None,
        pinned: bool = False,
        classifier_reason: str | None = None,
        workdir: str | None = None,
        priority: int = 0,
        max_retries: int = 0,
        timeout_s: float | None = None,
        isolate: bool = True,
        base_ref: str | None = None,
        workspace: Callable[[int], Workspace] | None = None,
        after: Iterable[int] = (),
        max_cost_usd: float | None = None,
        schedule_id: int | None = None,
        node: str | None = None,
    ) -> Task: ...

    def on_task(self, changed: Callable[[int | None, TaskState | None], None]) -> None:
        """Call ``changed(task_id, state)`` when another process stores or changes a task
        (``(None, None)``: anything may have changed)."""
        ...

    # Whether other daemons share this store (nodes). Then each execution's log is copied
    # into it as it is written (``append_log``) for ``logs`` on any node (``read_log``,
    # ``on_log``), and a cancel reaches the node running the task (``request_cancel``,
    # ``on_cancel``).
    shared: bool

    def on_log(self, grew: Callable[[int], None]) -> None: ...

    def on_cancel(self, cancel: Callable[[int], None]) -> None: ...

    async def request_cancel(self, task_id: int) -> None:
        """Ask whichever node runs the task to cancel it."""
        ...

    async def nodes(self) -> list[dict[str, Any]]:
        """The daemons on this queue: id, host, pid, started, last heartbeat, agents."""
        ...

    async def append_log(self, execution_id: int, seq: int, data: bytes) -> None: ...

    async def read_log(self, execution_id: int, after_seq: int = -1, *,
                       limit_bytes: int = 1 << 20) -> list[tuple[int, bytes]]: ...

    async def set_workspace(self, task_id: int, ws: Workspace) -> None: ...

    async def workspaces(self, states: Iterable[str]) -> list[Task]: ...

    async def add_reply(self, task_id: int, prompt: str, *, agent: str | None) -> Task: ...

    async def get_task(self, task_id: int, *, with_executions: bool = False) -> Task: ...

    async def list_tasks(self, where: TaskFilter = EVERY_TASK, *, limit: int = 50) -> TaskPage:
        """A page of tasks; a cursor naming no task is a NotFound."""
        ...

    async def execution_totals(self, task_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Per task: executions, cost, tokens, duration and changes summed over its
        executions (tasks without any are left out)."""
        ...

    async def prune(self, finished_before: float, *, batch: int = 500,
                    dry_run: bool = False) -> Pruned:
        """Delete finished tasks last changed before ``finished_before``, with everything of
        theirs, in transactions of ``batch`` tasks; tasks with a worktree are kept."""
        ...

    async def claim_many(
        self, free: Mapping[str, int], balance: Balancer, executions_dir: Path, *, limit: int
    ) -> Claimed: ...

    async def unpin_unavailable(self, registered: Iterable[str]) -> int: ...

    async def unclassified(self) -> list[Task]: ...

    async def set_classification(
        self, task_id: int, *, agent: str, model: str | None, reason: str
    ) -> None: ...

    async def update_task(self, task_id: int, **fields: Any) -> Finished: ...

    async def cancel_queued(self, task_id: int) -> Finished | None: ...

    async def requeue(self, task_id: int) -> tuple[Task, list[int]]: ...

    async def set_execution_process(self, execution_id: int, proc: ProcessIdentity) -> None: ...

    async def finish(
        self,
        execution_id: int,
        task_id: int,
        *,
        execution: dict[str, Any],
        task: dict[str, Any],
        files: Iterable[FileChange] = (),
    ) -> Finished: ...

    async def get_execution(self, execution_id: int) -> Execution: ...

    async def executions_for(self, task_id: int) -> list[Execution]: ...

    async def running_executions(self) -> list[Execution]: ...

    async def running_processes(self) -> list[ProcessIdentity]: ...

    async def recover_interrupted(self) -> int: ...

    def stop_waiting_after(self, seconds: float) -> None:
        """From now on, a write waits at most ``seconds`` for a lost server (the daemon is
        stopping)."""
        ...

    async def release_orphans(self, live: Iterable[int], started_before: float) -> int:
        """This node's executions recorded running, started before ``started_before``, that
        are not in ``live`` (no worker has them: a claim whose commit was answered by a lost
        connection) are interrupted and their tasks requeued, counting the attempt."""
        ...

    async def stats(self) -> dict[str, Any]: ...

    async def spend_since(self, day: str) -> dict[str, float]: ...

    async def add_schedule(self, cron: str, prompt: str, options: dict[str, Any],
                           now: float) -> Schedule: ...

    async def schedules(self) -> list[Schedule]: ...

    async def remove_schedule(self, schedule_id: int) -> None: ...

    async def schedule_fired(self, schedule_id: int, at: float, task_id: int | None) -> None: ...

    async def take_firing(self, schedule_id: int, seen: float | None, at: float) -> bool:
        """Mark the schedule fired at ``at`` if its last firing is still ``seen``; False when
        another daemon took this firing first."""
        ...

    async def usage(self, by: str, since: str | None = None) -> list[dict[str, Any]]: ...
