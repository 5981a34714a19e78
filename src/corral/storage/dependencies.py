"""Task dependencies in SQLite: readiness at submit, and what a final state does to dependents.

Run inside the store's own transactions (a plain ``sqlite3.Connection``), so a task's end and
its dependents' release (or cancellation) are one commit. Cycles cannot form: a task can only
name tasks that already exist.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from corral.errors import BadRequest
from corral.models import TaskState


def readiness(c: sqlite3.Connection, after: Iterable[int]) -> tuple[TaskState, str | None]:
    """The state a new task starts in given what it waits for, and why when cancelled."""
    wanted = sorted(set(after))
    if not wanted:
        return TaskState.QUEUED, None
    marks = ",".join("?" * len(wanted))
    states = dict(c.execute(f"SELECT id, state FROM tasks WHERE id IN ({marks})", wanted))
    return decide(wanted, states)


def decide(wanted: list[int], states: dict[int, str]) -> tuple[TaskState, str | None]:
    """Readiness from the states of the tasks waited for (either backend): an unknown one is
    a 400, a failed or cancelled one cancels, all succeeded queues, else blocked."""
    missing = [i for i in wanted if i not in states]
    if missing:
        raise BadRequest(f"--after names task {missing[0]}, which does not exist",
                         code="unknown_dependency")
    for task_id in wanted:
        if states[task_id] in (TaskState.FAILED, TaskState.CANCELLED):
            return TaskState.CANCELLED, f"dependency {task_id} {states[task_id]}"
    if all(states[i] == TaskState.SUCCEEDED for i in wanted):
        return TaskState.QUEUED, None
    return TaskState.BLOCKED, None


def record(c: sqlite3.Connection, task_id: int, after: Iterable[int]) -> None:
    c.executemany("INSERT OR IGNORE INTO task_deps (task_id, depends_on) VALUES (?, ?)",
                  [(task_id, d) for d in set(after)])


def settle_dependents(
    c: sqlite3.Connection, task_id: int, state: TaskState, now: float
) -> dict[int, TaskState]:
    """After ``task_id`` reached ``state``: unblock or cancel the blocked tasks waiting for it,
    and so on down the chain. Returns every task that changed, with its new state."""
    changed: dict[int, TaskState] = {}
    ended = [(task_id, state)]
    while ended:
        done_id, done_state = ended.pop()
        waiting = [row[0] for row in c.execute(
            "SELECT d.task_id FROM task_deps d JOIN tasks t ON t.id = d.task_id"
            " WHERE d.depends_on = ? AND t.state = 'blocked'", (done_id,))]
        for dependent in waiting:
            if done_state == TaskState.SUCCEEDED:
                open_deps = c.execute(
                    "SELECT COUNT(*) FROM task_deps d JOIN tasks t ON t.id = d.depends_on"
                    " WHERE d.task_id = ? AND t.state != 'succeeded'", (dependent,)).fetchone()[0]
                if open_deps == 0:
                    c.execute("UPDATE tasks SET state = 'queued', updated_at = ? WHERE id = ?",
                              (now, dependent))
                    changed[dependent] = TaskState.QUEUED
            else:  # fails closed, all the way down
                c.execute("UPDATE tasks SET state = 'cancelled', error = ?, updated_at = ?"
                          " WHERE id = ?", (f"dependency {done_id} {done_state}", now, dependent))
                changed[dependent] = TaskState.CANCELLED
                ended.append((dependent, TaskState.CANCELLED))
    return changed


def links(c: sqlite3.Connection, task_id: int) -> tuple[list[int], list[int]]:
    """What the task waits for, and what waits for it."""
    waits_for = [r[0] for r in c.execute(
        "SELECT depends_on FROM task_deps WHERE task_id = ? ORDER BY depends_on", (task_id,))]
    waited_by = [r[0] for r in c.execute(
        "SELECT task_id FROM task_deps WHERE depends_on = ? ORDER BY task_id", (task_id,))]
    return waits_for, waited_by
