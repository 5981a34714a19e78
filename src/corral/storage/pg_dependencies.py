"""Task dependencies in PostgreSQL: the same rules as :mod:`corral.storage.dependencies`,
run inside the caller's transaction on an ``asyncpg`` connection, so a task's end and its
dependents' release (or cancellation) are one commit."""

from __future__ import annotations

from collections.abc import Iterable

from corral.models import TaskState
from corral.storage.dependencies import decide
from corral.storage.pgconn import Conn


async def readiness(c: Conn, after: Iterable[int]) -> tuple[TaskState, str | None]:
    """The state a new task starts in given what it waits for, and why when cancelled."""
    wanted = sorted(set(after))
    if not wanted:
        return TaskState.QUEUED, None
    # FOR SHARE: a dependency cannot finish between this look and the dependent's insert.
    states = {r[0]: r[1] for r in await c.fetch(
        "SELECT id, state FROM tasks WHERE id = ANY($1::bigint[]) FOR SHARE", wanted)}
    return decide(wanted, states)


async def record(c: Conn, task_id: int, after: Iterable[int]) -> None:
    await c.executemany("INSERT INTO task_deps (task_id, depends_on) VALUES ($1, $2)"
                        " ON CONFLICT DO NOTHING", [(task_id, d) for d in set(after)])


async def settle_dependents(
    c: Conn, task_id: int, state: TaskState, now: float
) -> dict[int, TaskState]:
    """After ``task_id`` reached ``state``: unblock or cancel the blocked tasks waiting for it,
    and so on down the chain. Returns every task that changed, with its new state."""
    changed: dict[int, TaskState] = {}
    ended = [(task_id, state)]
    while ended:
        done_id, done_state = ended.pop()
        waiting = [r[0] for r in await c.fetch(
            "SELECT d.task_id FROM task_deps d JOIN tasks t ON t.id = d.task_id"
            " WHERE d.depends_on = $1 AND t.state = 'blocked' FOR UPDATE OF t", done_id)]
        for dependent in waiting:
            if done_state == TaskState.SUCCEEDED:
                open_deps = await c.fetchval(
                    "SELECT COUNT(*) FROM task_deps d JOIN tasks t ON t.id = d.depends_on"
                    " WHERE d.task_id = $1 AND t.state != 'succeeded'", dependent)
                if open_deps == 0:
                    await c.execute("UPDATE tasks SET state = 'queued', updated_at = $1"
                                    " WHERE id = $2", now, dependent)
                    changed[dependent] = TaskState.QUEUED
            else:  # fails closed, all the way down
                await c.execute("UPDATE tasks SET state = 'cancelled', error = $1,"
                                " updated_at = $2 WHERE id = $3",
                                f"dependency {done_id} {done_state}", now, dependent)
                changed[dependent] = TaskState.CANCELLED
                ended.append((dependent, TaskState.CANCELLED))
    return changed


async def links(c: Conn, task_id: int) -> tuple[list[int], list[int]]:
    """What the task waits for, and what waits for it."""
    waits_for = [r[0] for r in await c.fetch(
        "SELECT depends_on FROM task_deps WHERE task_id = $1 ORDER BY depends_on", task_id)]
    waited_by = [r[0] for r in await c.fetch(
        "SELECT task_id FROM task_deps WHERE depends_on = $1 ORDER BY task_id", task_id)]
    return waits_for, waited_by
