"""``SqliteStore``: tasks and executions in one SQLite file. The store is the queue.

Claiming tasks happens inside one ``BEGIN IMMEDIATE`` transaction (pick, mark running, open the
execution), so two claimers, even two daemons on one file, never take the same task. Every
multi-statement change is one transaction on the writer thread (:mod:`corral.storage.engine`),
so a task and its execution always change together. Submissions, claims and finished attempts
go through group commit: what arrives while one commit is in flight shares the next. Reads go
through their own connections and never wait for a write.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from corral.errors import Conflict, NotFound
from corral.models import (
    Execution,
    FileChange,
    ProcessIdentity,
    Schedule,
    Task,
    TaskState,
    Workspace,
)
from corral.storage import dependencies, rows
from corral.storage.base import (
    EVERY_TASK,
    Balancer,
    Claimed,
    Clock,
    Finished,
    Pruned,
    TaskFilter,
    TaskPage,
)
from corral.storage.engine import Database, transaction

_TASK_COLS = rows.TASK_COLS
_EXEC_COLS = rows.EXEC_COLS
_task = rows.task
_execution = rows.execution
_INSERT_TASK = (
    "INSERT INTO tasks (prompt, requested_agent, requested_model, agent, model, pinned,"
    " classifier_reason, workdir, priority, max_retries, timeout_s, isolate, base_ref,"
    " max_cost_usd, schedule_id, node, state, error, created_at, updated_at)"
    f" VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING {_TASK_COLS}"
)
_SET_WORKSPACE = (
    "UPDATE tasks SET ws_repo = ?, ws_path = ?, ws_branch = ?, ws_base_commit = ?,"
    " ws_subdir = ?, ws_state = ?, ws_base_branch = ?, updated_at = ? WHERE id = ?"
)


# The terms of the partial index tasks_delayed are repeated so it applies; INDEXED BY, because
# without statistics the planner would rather walk every queued task in tasks_queue.
NEXT_READY_SQL = ("SELECT MIN(run_after) FROM tasks INDEXED BY tasks_delayed"
                  " WHERE state = 'queued' AND run_after > 0 AND run_after > ?")
_NEXT_EXEC_ID = "(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'executions'), 0) + 1)"
_INSERT_EXEC = (
    "INSERT INTO executions (id, task_id, agent, model, status, started_at, prompt, log_dir,"
    f" node_id) VALUES ({_NEXT_EXEC_ID}, ?, ?, ?, 'running', ?, ?, ? || {_NEXT_EXEC_ID}, ?)"
    f" RETURNING {_EXEC_COLS}"
)


def _settled(c: sqlite3.Connection, task_id: int, state: TaskState | None,
             now: float) -> Finished:
    if state is None or not state.final:
        return Finished(state or TaskState.QUEUED, {})
    return Finished(state, dependencies.settle_dependents(c, task_id, state, now))


_SCHEDULE_COLS = rows.SCHEDULE_COLS
_schedule = rows.schedule


def _take_reply(c: sqlite3.Connection, task_id: int, now: float) -> TaskState | None:
    """Queue the task again with its earliest waiting reply, if it has one."""
    row = c.execute("SELECT id, prompt FROM replies WHERE task_id = ? AND taken_at IS NULL"
                    " ORDER BY id LIMIT 1", (task_id,)).fetchone()
    if row is None:
        return None
    c.execute("UPDATE replies SET taken_at = ? WHERE id = ?", (now, row[0]))
    c.execute("UPDATE tasks SET state = 'queued', current_prompt = ?, attempts = 0,"
              " rate_limit_requeues = 0, error = NULL, run_after = 0, updated_at = ?"
              " WHERE id = ?", (row[1], now, task_id))
    return TaskState.QUEUED


def _write_workspace(c: sqlite3.Connection, task_id: int, ws: Workspace, now: float) -> None:
    c.execute(_SET_WORKSPACE, (ws.repo, ws.path, ws.branch, ws.base_commit, ws.subdir,
                               ws.state, ws.base_branch, now, task_id))


def claim_sql(agent_count: int) -> str:
    """The claim's pick: walks tasks_queue in (priority, id) order and stops at the first fit."""
    return (f"SELECT {_TASK_COLS} FROM tasks WHERE state = 'queued' AND run_after <= ?"
            " AND agent IS NOT NULL AND (node IS NULL OR node = ?)"
            f" AND (pinned = 0 OR agent IN ({','.join('?' * agent_count)}))"
            " ORDER BY priority DESC, id LIMIT 1")


def _claim_one(
    c: sqlite3.Connection, slots: dict[str, int], balance: Balancer, now: float, dir_prefix: str,
    node_id: str,
) -> tuple[Task, Execution] | None:
    """One claim inside an open transaction; takes a slot from ``slots``."""
    agents = sorted(slots)
    row = c.execute(claim_sql(len(agents)), (now, node_id, *agents)).fetchone()
    if row is None:
        return None
    task = _task(row)
    chosen = str(task.agent) if task.pinned else balance(task.agent, slots)
    if chosen != task.agent:
        task.classifier_reason = f"{task.classifier_reason}; balanced to {chosen}"
        task.agent = chosen
    task.state = TaskState.RUNNING
    task.attempts += 1
    c.execute(
        "UPDATE tasks SET state = 'running', attempts = ?, agent = ?,"
        " classifier_reason = ?, updated_at = ? WHERE id = ? AND state = 'queued'",
        (task.attempts, task.agent, task.classifier_reason, now, task.id),
    )
    # The id is chosen in the statement so the folder's name needs no second write.
    execution = _execution(
        c.execute(_INSERT_EXEC, (task.id, task.agent, task.model, now,
                                 task.current_prompt or task.prompt, dir_prefix,
                                 node_id)).fetchall()[0]
    )
    slots[chosen] -= 1
    if slots[chosen] <= 0:
        del slots[chosen]
    return task, execution


def _filter_terms(where: TaskFilter) -> tuple[list[str], list[Any]]:
    terms: list[str] = []
    params: list[Any] = []
    for term, value in (("state = ?", None if where.state is None else str(where.state)),
                        ("agent = ?", where.agent), ("created_at >= ?", where.since),
                        ("created_at < ?", where.until)):
        if value is not None:
            terms.append(term)
            params.append(value)
    return terms, params


# Finished, last changed before ?, and no worktree still on disk (cleanup removes it first).
# The state terms repeat those of the partial index tasks_finished, so it applies; INDEXED BY,
# because without statistics the planner would rather sort every finished task by hand.
_PRUNABLE = ("state IN ('succeeded', 'failed', 'cancelled') AND updated_at < ?"
             " AND (ws_state IS NULL OR ws_state NOT IN ('planned', 'active'))")


def _prune_batch(c: sqlite3.Connection, before: float, batch: int) -> tuple[int, int, list[str]]:
    with transaction(c):
        ids = [r[0] for r in c.execute(
            f"SELECT id FROM tasks INDEXED BY tasks_finished WHERE {_PRUNABLE}"
            " ORDER BY updated_at LIMIT ?",
            (before, batch))]
        if not ids:
            return 0, 0, []
        chosen = (json.dumps(ids),)
        some = "IN (SELECT value FROM json_each(?))"
        dirs = [r[0] for r in c.execute(
            f"SELECT log_dir FROM executions WHERE task_id {some} AND log_dir IS NOT NULL",
            chosen)]
        c.execute("DELETE FROM execution_files WHERE execution_id IN"
                  f" (SELECT id FROM executions WHERE task_id {some})", chosen)
        executions = c.execute(f"DELETE FROM executions WHERE task_id {some}", chosen).rowcount
        c.execute(f"DELETE FROM replies WHERE task_id {some}", chosen)
        c.execute(f"DELETE FROM task_deps WHERE task_id {some} OR depends_on {some}", chosen * 2)
        c.execute(f"DELETE FROM tasks WHERE id {some}", chosen)
    return len(ids), int(executions), dirs


class SqliteStore:
    """The embedded store; use as ``async with SqliteStore(path) as store``."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = 5000,
        clock: Clock = time.time,
        migrate_upto: int | None = None,
        readers: int = 2,
        trace: Callable[[str], None] | None = None,
        node_id: str = "local",
    ) -> None:
        self.path = path
        self.node_id = node_id  # recorded on the executions it claims
        self._opened_at: float | None = None
        self._clock = clock
        self._db = Database(path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms,
                            readers=readers, migrate_upto=migrate_upto, trace=trace)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        await self._db.open()
        self._opened_at = self._clock()

    async def close(self) -> None:
        await self._db.close()

    # One daemon owns the file: its logs are its own files, never copied in here.
    shared = False

    def on_task(self, changed: Callable[[int | None, TaskState | None], None]) -> None:
        """Nothing to do: one daemon owns the file, and it hears of its own writes."""

    def on_log(self, grew: Callable[[int], None]) -> None:
        """Nothing to do: every execution's log is this daemon's own file."""

    def on_cancel(self, cancel: Callable[[int], None]) -> None:
        """Nothing to do: every running task is this daemon's own."""

    async def request_cancel(self, task_id: int) -> None:
        raise NotImplementedError("the SQLite store has one node (shared is false)")

    async def nodes(self) -> list[dict[str, Any]]:
        return [{"node_id": self.node_id, "host": socket.gethostname(), "pid": os.getpid(),
                 "started_at": self._opened_at, "heartbeat_at": None, "agents": None}]

    async def append_log(self, execution_id: int, seq: int, data: bytes) -> None:
        raise NotImplementedError("the SQLite store keeps no logs (shared is false)")

    async def read_log(self, execution_id: int, after_seq: int = -1, *,
                       limit_bytes: int = 1 << 20) -> list[tuple[int, bytes]]:
        return []

    async def _one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        return await self._db.fetch_one(sql, tuple(params))

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        return await self._db.fetch_all(sql, tuple(params))

    async def _write(self, sql: str, params: Iterable[Any] = ()) -> int:
        return await self._db.execute(sql, tuple(params))

    # -- tasks -------------------------------------------------------------------------------

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
    ) -> Task:
        """Store a task: queued, or blocked until every task in ``after`` has succeeded (or
        cancelled at once when one of them already failed). ``workspace`` names the task's
        workspace from its new id."""
        now = self._clock()
        waits_for = sorted(set(after))

        def insert(c: sqlite3.Connection) -> Task:
            state, error = dependencies.readiness(c, waits_for)
            values = (prompt, requested_agent, requested_model, agent, model, int(pinned),
                      classifier_reason, workdir, priority, max_retries, timeout_s, int(isolate),
                      base_ref, max_cost_usd, schedule_id, node, str(state), error, now, now)
            task = _task(c.execute(_INSERT_TASK, values).fetchall()[0])
            dependencies.record(c, task.id, waits_for)
            task.depends_on = waits_for
            if workspace is not None:
                task.workspace = workspace(task.id)
                _write_workspace(c, task.id, task.workspace, now)
            return task

        return await self._db.group.write(insert)

    async def set_workspace(self, task_id: int, ws: Workspace) -> None:
        await self._db.group.write(lambda c: _write_workspace(c, task_id, ws, self._clock()))

    async def workspaces(self, states: Iterable[str]) -> list[Task]:
        """Tasks whose workspace is in one of ``states``, oldest first."""
        wanted = sorted(set(states))
        found = await self._all(
            f"SELECT {_TASK_COLS} FROM tasks WHERE ws_state IN ({','.join('?' * len(wanted))})"
            " ORDER BY id", wanted)
        return [_task(r) for r in found]

    async def add_reply(self, task_id: int, prompt: str, *, agent: str | None) -> Task:
        """A follow-up: a finished task is queued again with it (on ``agent``, to continue its
        session); a queued or running one keeps it until the current prompt is done."""
        now = self._clock()

        def reply(c: sqlite3.Connection) -> Task:
            row = c.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise NotFound(f"task {task_id} does not exist")
            task = _task(row)
            if task.state.final:
                c.execute(
                    "UPDATE tasks SET state = 'queued', current_prompt = ?, attempts = 0,"
                    " rate_limit_requeues = 0, error = NULL, run_after = 0,"
                    " agent = COALESCE(?, agent), pinned = CASE WHEN ? IS NULL THEN pinned"
                    " ELSE 1 END, updated_at = ? WHERE id = ?",
                    (prompt, agent, agent, now, task_id))
            else:
                c.execute("INSERT INTO replies (task_id, prompt, created_at) VALUES (?, ?, ?)",
                          (task_id, prompt, now))
            return _task(c.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE id = ?",
                                   (task_id,)).fetchone())

        return await self._db.group.write(reply)

    async def get_task(self, task_id: int, *, with_executions: bool = False) -> Task:
        def read(c: sqlite3.Connection) -> Task | None:
            row = c.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            task = _task(row)
            task.depends_on, task.dependents = dependencies.links(c, task_id)
            if with_executions:
                task.executions = [_execution(r) for r in c.execute(
                    f"SELECT {_EXEC_COLS} FROM executions WHERE task_id = ? ORDER BY id",
                    (task_id,))]
                by_id = {e.id: e for e in task.executions}
                for execution_id, path, added, deleted in c.execute(
                        "SELECT f.execution_id, f.path, f.insertions, f.deletions"
                        " FROM execution_files f JOIN executions e ON e.id = f.execution_id"
                        " WHERE e.task_id = ? ORDER BY f.execution_id, f.path", (task_id,)):
                    by_id[execution_id].files.append(FileChange(path, added, deleted))
            return task

        task = await self._db.read(read)
        if task is None:
            raise NotFound(f"task {task_id} does not exist")
        return task

    async def list_tasks(self, where: TaskFilter = EVERY_TASK, *, limit: int = 50) -> TaskPage:
        terms, params = _filter_terms(where)

        def read(c: sqlite3.Connection) -> list[Any] | None:
            after = list(params)
            clause = list(terms)
            if where.before is not None:
                row = c.execute("SELECT created_at FROM tasks WHERE id = ?",
                                (where.before,)).fetchone()
                if row is None:
                    return None
                clause.append("(created_at, id) < (?, ?)")
                after += [row[0], where.before]
            sql = (f"SELECT {_TASK_COLS} FROM tasks"
                   + (f" WHERE {' AND '.join(clause)}" if clause else "")
                   + " ORDER BY created_at DESC, id DESC LIMIT ?")
            return c.execute(sql, (*after, limit + 1)).fetchall()

        found = await self._db.read(read)
        if found is None:
            raise NotFound(f"task {where.before} does not exist (the cursor is stale)")
        tasks = [_task(r) for r in found[:limit]]
        return TaskPage(tasks, tasks[-1].id if len(found) > limit else None)

    async def execution_totals(self, task_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        found = await self._all(
            "SELECT task_id, COUNT(*), SUM(cost_usd), SUM(tokens_in), SUM(tokens_out),"
            " CAST(SUM((finished_at - started_at) * 1000) AS INTEGER), SUM(files_changed),"
            " SUM(insertions), SUM(deletions) FROM executions"
            " WHERE task_id IN (SELECT value FROM json_each(?)) GROUP BY task_id",
            (json.dumps(list(task_ids)),))
        return rows.totals(found)

    async def prune(self, finished_before: float, *, batch: int = 500,
                    dry_run: bool = False) -> Pruned:
        if dry_run:
            row = await self._one(
                f"SELECT COUNT(*), COALESCE(SUM((SELECT COUNT(*) FROM executions e"
                f" WHERE e.task_id = t.id)), 0) FROM tasks t INDEXED BY tasks_finished"
                f" WHERE {_PRUNABLE}",
                (finished_before,))
            return Pruned(int(row[0]), int(row[1]), [])
        tasks = executions = 0
        log_dirs: list[str] = []
        while True:
            # One short transaction per batch: a submit or a claim waits for one at most.
            n_tasks, n_execs, dirs = await self._db.write_now(
                lambda c: _prune_batch(c, finished_before, batch))
            tasks, executions = tasks + n_tasks, executions + n_execs
            log_dirs += dirs
            if n_tasks < batch:
                return Pruned(tasks, executions, log_dirs)

    async def claim_many(
        self, free: Mapping[str, int], balance: Balancer, executions_dir: Path, *, limit: int
    ) -> Claimed:
        """Atomically take up to ``limit`` ready tasks and open their executions: one transaction.

        ``free`` holds the free slots per agent; each claim uses one. Pinned tasks are claimable
        only for agents with a slot left, so a saturated agent never holds back another's work;
        an unpinned task goes where ``balance(classifier_choice, slots_left)`` says. Priority
        first, then age. Each task moves to ``running`` with the attempt counted, and a
        ``running`` execution is created whose ``log_dir`` is ``executions_dir/<its id>``. The
        same transaction says when the next delayed task becomes ready.
        """
        slots = {a: n for a, n in free.items() if n > 0}
        if not slots or limit < 1:
            return Claimed([], None)
        now = self._clock()
        prefix = f"{executions_dir}{os.sep}"

        def claim(c: sqlite3.Connection) -> Claimed:
            # A copy per run: a failed shared transaction runs this again from the start.
            left = dict(slots)
            claimed: list[tuple[Task, Execution]] = []
            while left and len(claimed) < limit:
                one = _claim_one(c, left, balance, now, prefix, self.node_id)
                if one is None:
                    break
                claimed.append(one)
            (ready_at,) = c.execute(NEXT_READY_SQL, (now,)).fetchone()
            return Claimed(claimed, ready_at)

        # Through group commit: a claim shares its transaction with the submissions and
        # finished attempts that arrive meanwhile, instead of making them wait for its own.
        return await self._db.group.write(claim)

    async def unpin_unavailable(self, registered: Iterable[str]) -> int:
        """Queued tasks pinned to an agent that is no longer registered go back to the classifier.

        Otherwise a config change (say, the claude CLI uninstalled) would strand them forever.
        """
        agents = sorted(set(registered))
        marks = ",".join("?" * len(agents)) or "NULL"
        return await self._write(
            "UPDATE tasks SET pinned = 0, agent = NULL, updated_at = ?,"
            " classifier_reason = 'pinned to ' || agent || ', which is no longer registered'"
            f" WHERE state = 'queued' AND pinned = 1 AND agent NOT IN ({marks})",
            (self._clock(), *agents),
        )

    async def unclassified(self) -> list[Task]:
        found = await self._all(
            f"SELECT {_TASK_COLS} FROM tasks WHERE state = 'queued' AND agent IS NULL"
            " ORDER BY created_at, id"
        )
        return [_task(r) for r in found]

    async def set_classification(
        self, task_id: int, *, agent: str, model: str | None, reason: str
    ) -> None:
        await self._write(
            "UPDATE tasks SET agent = ?, model = ?, classifier_reason = ?, updated_at = ?"
            " WHERE id = ?",
            (agent, model, reason, self._clock(), task_id),
        )

    async def update_task(self, task_id: int, **fields: Any) -> Finished:
        """Change a task's fields; a final state settles its dependents in the same commit."""
        task_sql = self._task_update(task_id, fields)
        state = TaskState(fields["state"]) if "state" in fields else None
        now = self._clock()

        def write(c: sqlite3.Connection) -> Finished:
            c.execute(*task_sql)
            return _settled(c, task_id, state, now)

        return await self._db.group.write(write)

    def _task_update(self, task_id: int, fields: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
        fields = rows.task_values(fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        return (f"UPDATE tasks SET {sets}, updated_at = ? WHERE id = ?",
                (*fields.values(), self._clock(), task_id))

    async def cancel_queued(self, task_id: int) -> Finished | None:
        """Cancel a task that no worker holds (queued or blocked), and what waits for it.

        None when it is running or already final.
        """
        now = self._clock()

        def cancel(c: sqlite3.Connection) -> Finished | None:
            changed = c.execute(
                "UPDATE tasks SET state = 'cancelled', error = 'cancelled while ' || state,"
                " updated_at = ? WHERE id = ? AND state IN ('queued', 'blocked')",
                (now, task_id)).rowcount
            return _settled(c, task_id, TaskState.CANCELLED, now) if changed else None

        return await self._db.group.write(cancel)

    async def requeue(self, task_id: int) -> tuple[Task, list[int]]:
        """Put a finished task back in the queue with a fresh attempt budget.

        Returns it and the dependents its failure cancelled: they stay cancelled.
        """
        now = self._clock()

        def requeue(c: sqlite3.Connection) -> tuple[Task, list[int]]:
            row = c.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise NotFound(f"task {task_id} does not exist")
            task = _task(row)
            if not task.state.final:
                raise Conflict(f"task {task_id} is {task.state}; only a finished task can be"
                               " retried")
            c.execute("UPDATE tasks SET state = 'queued', attempts = 0, error = NULL,"
                      " run_after = 0, updated_at = ? WHERE id = ?", (now, task_id))
            _, waited_by = dependencies.links(c, task_id)
            cancelled = [i for i in waited_by if c.execute(
                "SELECT state FROM tasks WHERE id = ?", (i,)).fetchone()[0] == "cancelled"]
            fresh = _task(c.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE id = ?",
                                    (task_id,)).fetchone())
            return fresh, cancelled

        return await self._db.group.write(requeue)

    # -- executions ----------------------------------------------------------------------------

    async def set_execution_process(self, execution_id: int, proc: ProcessIdentity) -> None:
        """Record the agent's process group, so a restart can end exactly that one."""
        await self._write(
            "UPDATE executions SET pgid = ?, proc_started = ?, boot_id = ? WHERE id = ?",
            (proc.pgid, proc.started, proc.boot_id, execution_id),
        )

    async def finish(
        self,
        execution_id: int,
        task_id: int,
        *,
        execution: dict[str, Any],
        task: dict[str, Any],
        files: Iterable[FileChange] = (),
    ) -> Finished:
        """Record an attempt's outcome, its changed files and the task's next state in one
        transaction (a trigger counts its day's usage); returns the state the task is in after
        it, and what that did to the tasks waiting for it.

        A task that succeeded or failed with a reply waiting is queued again with the reply
        (its attempts start over); a cancelled one drops its waiting replies.
        """
        now = self._clock()
        values = rows.result_values(execution, now)
        sets = ", ".join(f"{k} = ?" for k in values)
        task_sql = self._task_update(task_id, task)
        state = TaskState(task["state"]) if "state" in task else None
        changed = [(execution_id, f.path, f.insertions, f.deletions) for f in files]

        def write(c: sqlite3.Connection) -> Finished:
            c.execute(f"UPDATE executions SET {sets} WHERE id = ?",
                      (*values.values(), execution_id))
            c.executemany("INSERT OR REPLACE INTO execution_files VALUES (?, ?, ?, ?)", changed)
            c.execute(*task_sql)
            after = state
            if state in (TaskState.SUCCEEDED, TaskState.FAILED):
                after = _take_reply(c, task_id, now) or state
            elif state == TaskState.CANCELLED:
                c.execute("UPDATE replies SET taken_at = ? WHERE task_id = ? AND taken_at IS NULL",
                          (now, task_id))
            return _settled(c, task_id, after, now)

        return await self._db.group.write(write)

    async def get_execution(self, execution_id: int) -> Execution:
        row = await self._one(f"SELECT {_EXEC_COLS} FROM executions WHERE id = ?", (execution_id,))
        if row is None:
            raise NotFound(f"execution {execution_id} does not exist")
        return _execution(row)

    async def executions_for(self, task_id: int) -> list[Execution]:
        found = await self._all(
            f"SELECT {_EXEC_COLS} FROM executions WHERE task_id = ? ORDER BY id", (task_id,)
        )
        return [_execution(r) for r in found]

    async def running_executions(self) -> list[Execution]:
        """Executions recorded as running (after a crash: what the dead daemon left behind)."""
        found = await self._all(f"SELECT {_EXEC_COLS} FROM executions WHERE status = 'running'")
        return [_execution(r) for r in found]

    async def running_processes(self) -> list[ProcessIdentity]:
        """The agents' process groups recorded for executions still marked running."""
        found = await self._all(
            "SELECT pgid, proc_started, boot_id FROM executions"
            " WHERE status = 'running' AND pgid IS NOT NULL")
        return [ProcessIdentity(pgid=r[0], started=r[1], boot_id=r[2]) for r in found]

    async def recover_interrupted(self) -> int:
        """After a crash: mark executions left ``running`` interrupted and requeue their tasks.

        Tasks whose attempts are spent fail with the reason recorded. Returns how many
        executions were interrupted.
        """
        now = self._clock()

        def recover(c: sqlite3.Connection) -> int:
            with transaction(c):
                count = c.execute(
                    "UPDATE executions SET status = 'interrupted', finished_at = ?,"
                    " error = 'daemon stopped while this execution was running'"
                    " WHERE status = 'running'",
                    (now,),
                ).rowcount
                spent = [r[0] for r in c.execute(
                    "SELECT id FROM tasks WHERE state = 'running' AND attempts > max_retries")]
                c.execute(
                    "UPDATE tasks SET state = 'failed', updated_at = ?,"
                    " error = 'interrupted by a daemon restart and out of attempts'"
                    " WHERE state = 'running' AND attempts > max_retries",
                    (now,),
                )
                for task_id in spent:
                    dependencies.settle_dependents(c, task_id, TaskState.FAILED, now)
                c.execute(
                    "UPDATE tasks SET state = 'queued', updated_at = ? WHERE state = 'running'",
                    (now,),
                )
            return int(count)

        return await self._db.write_now(recover)

    def stop_waiting_after(self, seconds: float) -> None:
        """Nothing to do: a local file has no server to lose."""

    async def release_orphans(self, live: Iterable[int], started_before: float) -> int:
        """Nothing to release: a commit to a local file is never in doubt, so every running
        execution has its worker until the daemon stops (then ``recover_interrupted``)."""
        return 0

    # -- schedules -----------------------------------------------------------------------------

    async def add_schedule(self, cron: str, prompt: str, options: dict[str, Any],
                           now: float) -> Schedule:
        row = await self._db.group.write(lambda c: c.execute(
            "INSERT INTO schedules (cron, prompt, options, created_at) VALUES (?, ?, ?, ?)"
            f" RETURNING {_SCHEDULE_COLS}", (cron, prompt, json.dumps(options), now)).fetchone())
        return _schedule(row)

    async def schedules(self) -> list[Schedule]:
        return [_schedule(r) for r in
                await self._all(f"SELECT {_SCHEDULE_COLS} FROM schedules ORDER BY id")]

    async def remove_schedule(self, schedule_id: int) -> None:
        if not await self._write("DELETE FROM schedules WHERE id = ?", (schedule_id,)):
            raise NotFound(f"schedule {schedule_id} does not exist")

    async def schedule_fired(self, schedule_id: int, at: float, task_id: int | None) -> None:
        """A firing happened at ``at``: it submitted ``task_id`` (None: it was skipped)."""
        await self._write("UPDATE schedules SET last_fired_at = ?,"
                          " last_task_id = COALESCE(?, last_task_id) WHERE id = ?",
                          (at, task_id, schedule_id))

    async def take_firing(self, schedule_id: int, seen: float | None, at: float) -> bool:
        return bool(await self._write(
            "UPDATE schedules SET last_fired_at = ? WHERE id = ? AND last_fired_at IS ?",
            (at, schedule_id, seen)))

    # -- stats ---------------------------------------------------------------------------------

    async def spend_since(self, day: str) -> dict[str, float]:
        """Recorded spend per agent from ``day`` (``YYYY-MM-DD``, local calendar) on."""
        found = await self._all("SELECT agent, SUM(cost_usd) FROM usage_daily WHERE day >= ?"
                               " GROUP BY agent", (day,))
        return {agent: float(cost or 0.0) for agent, cost in found}

    async def usage(self, by: str, since: str | None = None) -> list[dict[str, Any]]:
        """Executions, cost and tokens per day, agent or model, from ``since`` on."""
        column = {"day": "day", "agent": "agent", "model": "model"}[by]
        found = await self._all(
            f"SELECT {column}, SUM(executions), SUM(cost_usd), SUM(cost_estimated_usd),"
            f" SUM(tokens_in), SUM(tokens_out) FROM usage_daily WHERE day >= ?"
            f" GROUP BY {column} ORDER BY {column}", (since or "0000-00-00",))
        return rows.usage_rows(found, by)

    async def stats(self) -> dict[str, Any]:
        """Tasks per state and executions per agent, from the counters the triggers keep."""

        def read(c: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            states = c.execute("SELECT state, tasks FROM task_counts").fetchall()
            agents = c.execute(
                "SELECT agent, SUM(executions), SUM(succeeded), SUM(failed), SUM(rate_limited),"
                " SUM(cost_usd), SUM(cost_estimated_usd), SUM(tokens_in), SUM(tokens_out),"
                " SUM(duration_ms) FROM usage_daily GROUP BY agent ORDER BY agent").fetchall()
            return states, agents

        states, agents = await self._db.read(read)
        return rows.stats(states, agents)
