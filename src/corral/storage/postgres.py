"""``PostgresStore``: one queue in PostgreSQL that several daemons (nodes) drain together.

The same protocol as the SQLite store, the way the trusted queues do it (procrastinate, Oban,
River): a claim is ``SELECT … FOR UPDATE SKIP LOCKED`` in the transaction that opens the
execution, so however many daemons race each attempt runs once; a task becoming ready
``NOTIFY``s (a trigger), so idle daemons wake at once; a per-agent cap across all nodes is an
advisory lock and a count inside the claim. Nodes, heartbeats and the dead are
:mod:`corral.storage.nodes`; connections and reconnecting are :mod:`corral.storage.pgconn`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import asyncpg

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
from corral.storage import pg_dependencies as dependencies
from corral.storage import rows
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
from corral.storage.nodes import NodeInfo, Nodes, interrupt
from corral.storage.pgconn import CANCEL_CHANNEL, LOG_CHANNEL, TASK_CHANNEL, Conn, Postgres

C = Conn
_TASK = f"SELECT {rows.TASK_COLS} FROM tasks WHERE id = $1"
_INSERT_TASK = (
    "INSERT INTO tasks (prompt, requested_agent, requested_model, agent, model, pinned,"
    " classifier_reason, workdir, priority, max_retries, timeout_s, isolate, base_ref,"
    " max_cost_usd, schedule_id, node, state, error, created_at, updated_at)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$19)"
    f" RETURNING {rows.TASK_COLS}"
)
_SET_WORKSPACE = (
    "UPDATE tasks SET ws_repo = $1, ws_path = $2, ws_branch = $3, ws_base_commit = $4,"
    " ws_subdir = $5, ws_state = $6, ws_base_branch = $7, updated_at = $8 WHERE id = $9"
)
# Candidates in (priority, id) order; those other daemons hold locked are skipped.
_CLAIM = (
    f"SELECT {rows.TASK_COLS} FROM tasks WHERE state = 'queued' AND run_after <= $1"
    " AND agent IS NOT NULL AND (node IS NULL OR node = $2)"
    " AND (NOT pinned OR agent = ANY($3::text[])) AND NOT id = ANY($4::bigint[])"
    " ORDER BY priority DESC, id LIMIT $5 FOR UPDATE SKIP LOCKED"
)
# The ids are drawn first so each log folder's name needs no second write.
_START = (
    "WITH picked AS (SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[],"
    " $5::text[], $6::text[]) AS p (id, attempts, agent, reason, model, prompt)),"
    " marked AS (UPDATE tasks t SET state = 'running', attempts = p.attempts, agent = p.agent,"
    " classifier_reason = p.reason, updated_at = $7 FROM picked p WHERE t.id = p.id),"
    " numbered AS (SELECT p.*, nextval(pg_get_serial_sequence('executions', 'id')) AS eid"
    " FROM picked p)"
    " INSERT INTO executions (id, task_id, agent, model, status, started_at, prompt, log_dir,"
    " node_id) SELECT eid, id, agent, model, 'running', $7, prompt, $8 || eid, $9"
    f" FROM numbered RETURNING {rows.EXEC_COLS}"
)
_NEXT_READY = ("SELECT MIN(run_after) FROM tasks WHERE state = 'queued' AND run_after > 0"
               " AND run_after > $1")
_PRUNABLE = ("state IN ('succeeded', 'failed', 'cancelled') AND updated_at < $1"
             " AND (ws_state IS NULL OR ws_state NOT IN ('planned', 'active'))")
_AGENT_LOCK = 0x636F72  # advisory locks (this, hashtext(agent)) serialise capped claims


def _placeholders(terms: list[tuple[str, Any]], first: int = 1) -> tuple[list[str], list[Any]]:
    """``("state = ?", v)`` pairs with their ``?`` numbered from ``first``."""
    out, params = [], []
    for term, value in terms:
        if value is not None:
            params.append(value)
            out.append(term.replace("?", f"${first + len(params) - 1}"))
    return out, params


async def _settled(c: C, task_id: int, state: TaskState | None, now: float) -> Finished:
    if state is None or not state.final:
        return Finished(state or TaskState.QUEUED, {})
    return Finished(state, await dependencies.settle_dependents(c, task_id, state, now))


class PostgresStore:
    """The shared store; use as ``async with PostgresStore(url, node_id=…) as store``."""

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        clock: Clock = time.time,
        heartbeat_s: float = 5.0,
        node_timeout_s: float = 30.0,
        global_max_concurrent: Mapping[str, int] | None = None,
        reconnect_s: float = 300.0,
        migrate_upto: int | None = None,
    ) -> None:
        self.node_id = node_id
        self._clock = clock
        self._db = Postgres(url, reconnect_s=reconnect_s, migrate_upto=migrate_upto)
        self._caps = dict(global_max_concurrent or {})
        self.membership = Nodes(self._db, NodeInfo.this_process(node_id),
                                heartbeat_s=heartbeat_s, node_timeout_s=node_timeout_s,
                                clock=clock)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, migrate (once, however many daemons start together) and register."""
        await self._db.open()
        try:
            await self.membership.start()
        except BaseException:
            await self._db.close()
            raise

    async def close(self) -> None:
        await self.membership.stop()
        await self._db.close()

    # Other nodes read this store, logs included.
    shared = True

    def on_task(self, changed: Callable[[int | None, TaskState | None], None]) -> None:
        """``changed(task_id, state)`` when a task is stored or changes state on any node;
        ``(None, None)`` after the listening connection was made again (anything may have)."""

        def heard(payload: str) -> None:
            if not payload:
                changed(None, None)
                return
            task_id, state = payload.split(" ", 1)
            changed(int(task_id), TaskState(state))

        self._db.listen(TASK_CHANNEL, heard)

    def on_log(self, grew: Callable[[int], None]) -> None:
        """``grew(execution_id)`` when an execution's log grows or it ends, on any node."""
        self._db.listen(LOG_CHANNEL, lambda payload: grew(int(payload)) if payload else None)

    def on_cancel(self, cancel: Callable[[int], None]) -> None:
        """``cancel(task_id)`` when any node asks for a task to be cancelled."""
        self._db.listen(CANCEL_CHANNEL, lambda payload: cancel(int(payload)) if payload else None)

    async def request_cancel(self, task_id: int) -> None:
        await self._db.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, str(task_id))

    async def nodes(self) -> list[dict[str, Any]]:
        found = await self._all("SELECT node_id, host, pid, started_at, heartbeat_at, agents"
                                " FROM nodes ORDER BY node_id")
        return [{"node_id": r[0], "host": r[1], "pid": r[2], "started_at": r[3],
                 "heartbeat_at": r[4], "agents": list(r[5])} for r in found]

    async def append_log(self, execution_id: int, seq: int, data: bytes) -> None:
        """Chunk ``seq`` of the execution's ``stdout.log`` (written again, the same)."""
        await self._db.execute(
            "INSERT INTO log_chunks (execution_id, seq, data) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING", execution_id, seq, data)

    async def read_log(self, execution_id: int, after_seq: int = -1, *,
                       limit_bytes: int = 1 << 20) -> list[tuple[int, bytes]]:
        """The log's chunks after ``after_seq`` in order, about ``limit_bytes`` at most (at
        least one)."""
        found = await self._all(
            "SELECT seq, data FROM (SELECT seq, data, SUM(length(data)) OVER (ORDER BY seq)"
            " AS upto FROM log_chunks WHERE execution_id = $1 AND seq > $2) c"
            " WHERE upto - length(data) < $3 ORDER BY seq", execution_id, after_seq,
            limit_bytes)
        return [(r[0], bytes(r[1])) for r in found]

    async def _one(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._db.fetchrow(sql, *args)

    async def _all(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._db.fetch(sql, *args)

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
        """Store a task (see ``SqliteStore.create_task``); ``node`` pins it to one node."""
        now = self._clock()
        waits_for = sorted(set(after))

        async def insert(c: C) -> Task:
            state, error = await dependencies.readiness(c, waits_for)
            task = rows.task(rows.got(await c.fetchrow(
                _INSERT_TASK, prompt, requested_agent, requested_model, agent, model, pinned,
                classifier_reason, workdir, priority, max_retries, timeout_s, isolate, base_ref,
                max_cost_usd, schedule_id, node, str(state), error, now)))
            if waits_for:
                await dependencies.record(c, task.id, waits_for)
            task.depends_on = waits_for
            if workspace is not None:
                task.workspace = workspace(task.id)
                await self._write_workspace(c, task.id, task.workspace, now)
            return task

        # A lone insert is atomic by itself: no BEGIN and COMMIT round trips.
        return await self._db.run(insert, transaction=bool(waits_for or workspace))

    @staticmethod
    async def _write_workspace(c: C, task_id: int, ws: Workspace, now: float) -> None:
        await c.execute(_SET_WORKSPACE, ws.repo, ws.path, ws.branch, ws.base_commit, ws.subdir,
                        ws.state, ws.base_branch, now, task_id)

    async def set_workspace(self, task_id: int, ws: Workspace) -> None:
        await self._db.run(lambda c: self._write_workspace(c, task_id, ws, self._clock()))

    async def workspaces(self, states: Iterable[str]) -> list[Task]:
        """Tasks whose workspace is in one of ``states`` (this node's: they live on it)."""
        found = await self._all(
            f"SELECT {rows.TASK_COLS} FROM tasks WHERE ws_state = ANY($1::text[])"
            " AND (node IS NULL OR node = $2) ORDER BY id", sorted(set(states)), self.node_id)
        return [rows.task(r) for r in found]

    async def add_reply(self, task_id: int, prompt: str, *, agent: str | None) -> Task:
        now = self._clock()

        async def reply(c: C) -> Task:
            row = await c.fetchrow(_TASK + " FOR UPDATE", task_id)
            if row is None:
                raise NotFound(f"task {task_id} does not exist")
            if rows.task(row).state.final:
                # It goes on where it ran last: the agent's session and the earlier logs
                # live on that node.
                await c.execute(
                    "UPDATE tasks SET state = 'queued', current_prompt = $1, attempts = 0,"
                    " rate_limit_requeues = 0, error = NULL, run_after = 0,"
                    " agent = COALESCE($2, agent), pinned = ($2::text IS NOT NULL OR pinned),"
                    " node = COALESCE(node, (SELECT node_id FROM executions WHERE task_id = $4"
                    " ORDER BY id DESC LIMIT 1)), updated_at = $3 WHERE id = $4",
                    prompt, agent, now, task_id)
            else:
                await c.execute("INSERT INTO replies (task_id, prompt, created_at)"
                                " VALUES ($1, $2, $3)", task_id, prompt, now)
            return rows.task(rows.got(await c.fetchrow(_TASK, task_id)))

        return await self._db.run(reply)

    async def get_task(self, task_id: int, *, with_executions: bool = False) -> Task:
        async def read(c: C) -> Task | None:
            row = await c.fetchrow(_TASK, task_id)
            if row is None:
                return None
            task = rows.task(row)
            task.depends_on, task.dependents = await dependencies.links(c, task_id)
            if with_executions:
                task.executions = [rows.execution(r) for r in await c.fetch(
                    f"SELECT {rows.EXEC_COLS} FROM executions WHERE task_id = $1 ORDER BY id",
                    task_id)]
                by_id = {e.id: e for e in task.executions}
                for r in await c.fetch(
                        "SELECT f.execution_id, f.path, f.insertions, f.deletions"
                        " FROM execution_files f JOIN executions e ON e.id = f.execution_id"
                        " WHERE e.task_id = $1 ORDER BY f.execution_id, f.path", task_id):
                    by_id[r[0]].files.append(FileChange(r[1], r[2], r[3]))
            return task

        task = await self._db.run(read, transaction=False)
        if task is None:
            raise NotFound(f"task {task_id} does not exist")
        return task

    async def list_tasks(self, where: TaskFilter = EVERY_TASK, *, limit: int = 50) -> TaskPage:
        terms, params = _placeholders([
            ("state = ?", None if where.state is None else str(where.state)),
            ("agent = ?", where.agent), ("created_at >= ?", where.since),
            ("created_at < ?", where.until)])

        async def read(c: C) -> list[asyncpg.Record] | None:
            clause, args = list(terms), list(params)
            if where.before is not None:
                created = await c.fetchval("SELECT created_at FROM tasks WHERE id = $1",
                                           where.before)
                if created is None:
                    return None
                n = len(args)
                clause.append(f"(created_at, id) < (${n + 1}, ${n + 2})")
                args += [created, where.before]
            sql = (f"SELECT {rows.TASK_COLS} FROM tasks"
                   + (f" WHERE {' AND '.join(clause)}" if clause else "")
                   + f" ORDER BY created_at DESC, id DESC LIMIT ${len(args) + 1}")
            return list(await c.fetch(sql, *args, limit + 1))

        found = await self._db.run(read, transaction=False)
        if found is None:
            raise NotFound(f"task {where.before} does not exist (the cursor is stale)")
        tasks = [rows.task(r) for r in found[:limit]]
        return TaskPage(tasks, tasks[-1].id if len(found) > limit else None)

    async def execution_totals(self, task_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        found = await self._all(
            "SELECT task_id, COUNT(*), SUM(cost_usd), SUM(tokens_in)::bigint,"
            " SUM(tokens_out)::bigint,"
            " trunc(SUM((finished_at - started_at) * 1000))::bigint, SUM(files_changed)::bigint,"
            " SUM(insertions)::bigint, SUM(deletions)::bigint FROM executions"
            " WHERE task_id = ANY($1::bigint[]) GROUP BY task_id", list(task_ids))
        return rows.totals(found)

    async def prune(self, finished_before: float, *, batch: int = 500,
                    dry_run: bool = False) -> Pruned:
        if dry_run:
            row = await self._one(
                "SELECT COUNT(*), COALESCE(SUM((SELECT COUNT(*) FROM executions e"
                f" WHERE e.task_id = t.id)), 0) FROM tasks t WHERE {_PRUNABLE}", finished_before)
            assert row is not None
            return Pruned(int(row[0]), int(row[1]), [])
        tasks = executions = 0
        log_dirs: list[str] = []
        while True:
            n_tasks, n_execs, dirs = await self._db.run(
                lambda c: self._prune_batch(c, finished_before, batch))
            tasks, executions = tasks + n_tasks, executions + n_execs
            log_dirs += dirs
            if n_tasks < batch:
                return Pruned(tasks, executions, log_dirs)

    @staticmethod
    async def _prune_batch(c: C, before: float, batch: int) -> tuple[int, int, list[str]]:
        ids = [r[0] for r in await c.fetch(
            f"SELECT id FROM tasks WHERE {_PRUNABLE} ORDER BY updated_at LIMIT $2"
            " FOR UPDATE SKIP LOCKED", before, batch)]
        if not ids:
            return 0, 0, []
        dirs = [r[0] for r in await c.fetch(
            "SELECT log_dir FROM executions WHERE task_id = ANY($1::bigint[])"
            " AND log_dir IS NOT NULL", ids)]
        execs = "SELECT id FROM executions WHERE task_id = ANY($1::bigint[])"
        await c.execute(f"DELETE FROM log_chunks WHERE execution_id IN ({execs})", ids)
        await c.execute(f"DELETE FROM execution_files WHERE execution_id IN ({execs})", ids)
        status = await c.execute("DELETE FROM executions WHERE task_id = ANY($1::bigint[])", ids)
        await c.execute("DELETE FROM replies WHERE task_id = ANY($1::bigint[])", ids)
        await c.execute("DELETE FROM task_deps WHERE task_id = ANY($1::bigint[])"
                        " OR depends_on = ANY($1::bigint[])", ids)
        await c.execute("DELETE FROM tasks WHERE id = ANY($1::bigint[])", ids)
        return len(ids), int(status.rsplit(" ", 1)[-1]), dirs

    async def claim_many(
        self, free: Mapping[str, int], balance: Balancer, executions_dir: Path, *, limit: int
    ) -> Claimed:
        """Atomically take up to ``limit`` ready tasks for this node (see
        ``SqliteStore.claim_many``); tasks other daemons hold locked are skipped, not
        waited for, and an agent under ``global_max_concurrent`` gets no more than the
        cap less what runs on every node."""
        slots = {a: n for a, n in free.items() if n > 0}
        if not slots or limit < 1:
            return Claimed([], None)
        now = self._clock()
        prefix = f"{executions_dir}{os.sep}"

        async def claim(c: C) -> Claimed:
            left = dict(slots)
            await self._apply_caps(c, left)
            claimed: list[tuple[Task, Execution]] = []
            seen: list[int] = []  # locked by this claim already (SKIP LOCKED does not skip them)
            while left and len(claimed) < limit:
                wanted = limit - len(claimed)
                found = await c.fetch(_CLAIM, now, self.node_id, sorted(left), seen, wanted)
                seen += [r[0] for r in found]
                picked = [t for t in map(rows.task, found) if self._fits(t, left, balance)]
                if picked:
                    claimed += await self._start(c, picked, now, prefix)
                if len(found) < wanted:
                    break
            return Claimed(claimed, await c.fetchval(_NEXT_READY, now))

        return await self._db.run(claim)

    async def _apply_caps(self, c: C, slots: dict[str, int]) -> None:
        capped = sorted(a for a in slots if a in self._caps)
        if not capped:
            return
        for agent in capped:  # in order, so two claimers never wait on each other in a ring
            await c.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _AGENT_LOCK, agent)
        running = {r[0]: r[1] for r in await c.fetch(
            "SELECT agent, COUNT(*) FROM executions WHERE status = 'running'"
            " AND agent = ANY($1::text[]) GROUP BY agent", capped)}
        for agent in capped:
            slots[agent] = min(slots[agent], self._caps[agent] - running.get(agent, 0))
            if slots[agent] <= 0:
                del slots[agent]

    @staticmethod
    def _fits(task: Task, slots: dict[str, int], balance: Balancer) -> bool:
        """Whether a candidate gets a slot (taken from ``slots``); an unpinned one is balanced."""
        if not slots or (task.pinned and task.agent not in slots):
            return False  # its agent filled up with the candidates before it
        chosen = str(task.agent) if task.pinned else balance(task.agent, slots)
        if chosen != task.agent:
            task.classifier_reason = f"{task.classifier_reason}; balanced to {chosen}"
            task.agent = chosen
        task.state = TaskState.RUNNING
        task.attempts += 1
        slots[chosen] -= 1
        if slots[chosen] <= 0:
            del slots[chosen]
        return True

    async def _start(self, c: C, tasks: list[Task], now: float,
                     prefix: str) -> list[tuple[Task, Execution]]:
        """The picked tasks marked running and their executions opened: one statement."""
        opened = await c.fetch(
            _START, [t.id for t in tasks], [t.attempts for t in tasks], [t.agent for t in tasks],
            [t.classifier_reason for t in tasks], [t.model for t in tasks],
            [t.current_prompt or t.prompt for t in tasks], now, prefix, self.node_id)
        by_task = {e.task_id: e for e in map(rows.execution, opened)}
        return [(t, by_task[t.id]) for t in tasks]

    async def unpin_unavailable(self, registered: Iterable[str]) -> int:
        """Queued tasks pinned to an agent that no live node has registered go back to the
        classifier (this node's agents are recorded first, for the others to see)."""
        agents = sorted(set(registered))

        async def unpin(c: C) -> int:
            await c.execute("UPDATE nodes SET agents = $1 WHERE node_id = $2",
                            agents, self.node_id)
            status = await c.execute(
                "UPDATE tasks SET pinned = FALSE, agent = NULL, updated_at = $1,"
                " classifier_reason = 'pinned to ' || agent || ', which is no longer registered'"
                " WHERE state = 'queued' AND pinned AND (node IS NULL OR node = $2)"
                " AND NOT agent = ANY($3::text[] || ARRAY(SELECT unnest(agents) FROM nodes"
                " WHERE node_id <> $2))", self._clock(), self.node_id, agents)
            return int(status.rsplit(" ", 1)[-1])

        return await self._db.run(unpin)

    async def unclassified(self) -> list[Task]:
        found = await self._all(
            f"SELECT {rows.TASK_COLS} FROM tasks WHERE state = 'queued' AND agent IS NULL"
            " AND (node IS NULL OR node = $1) ORDER BY created_at, id", self.node_id)
        return [rows.task(r) for r in found]

    async def set_classification(
        self, task_id: int, *, agent: str, model: str | None, reason: str
    ) -> None:
        await self._db.execute(
            "UPDATE tasks SET agent = $1, model = $2, classifier_reason = $3, updated_at = $4"
            " WHERE id = $5", agent, model, reason, self._clock(), task_id)

    def _task_update(self, task_id: int, fields: dict[str, Any],
                     first: int = 1) -> tuple[str, list[Any]]:
        """``UPDATE tasks …`` with its placeholders numbered from ``first``."""
        values = rows.task_values(fields)
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(values, first))
        n = first + len(values)
        return (f"UPDATE tasks SET {sets}, updated_at = ${n} WHERE id = ${n + 1}",
                [*values.values(), self._clock(), task_id])

    async def update_task(self, task_id: int, **fields: Any) -> Finished:
        sql, args = self._task_update(task_id, fields)
        state = TaskState(fields["state"]) if "state" in fields else None
        now = self._clock()

        async def write(c: C) -> Finished:
            await c.execute(sql, *args)
            return await _settled(c, task_id, state, now)

        return await self._db.run(write)

    async def cancel_queued(self, task_id: int) -> Finished | None:
        now = self._clock()

        async def cancel(c: C) -> Finished | None:
            status = await c.execute(
                "UPDATE tasks SET state = 'cancelled', error = 'cancelled while ' || state,"
                " updated_at = $1 WHERE id = $2 AND state IN ('queued', 'blocked')", now, task_id)
            if status.endswith(" 0"):
                return None
            return await _settled(c, task_id, TaskState.CANCELLED, now)

        return await self._db.run(cancel)

    async def requeue(self, task_id: int) -> tuple[Task, list[int]]:
        now = self._clock()

        async def requeue(c: C) -> tuple[Task, list[int]]:
            row = await c.fetchrow(_TASK + " FOR UPDATE", task_id)
            if row is None:
                raise NotFound(f"task {task_id} does not exist")
            task = rows.task(row)
            if not task.state.final:
                raise Conflict(f"task {task_id} is {task.state}; only a finished task can be"
                               " retried")
            await c.execute("UPDATE tasks SET state = 'queued', attempts = 0, error = NULL,"
                            " run_after = 0, updated_at = $1 WHERE id = $2", now, task_id)
            _, waited_by = await dependencies.links(c, task_id)
            cancelled = [r[0] for r in await c.fetch(
                "SELECT id FROM tasks WHERE id = ANY($1::bigint[]) AND state = 'cancelled'"
                " ORDER BY id", waited_by)]
            return rows.task(rows.got(await c.fetchrow(_TASK, task_id))), cancelled

        return await self._db.run(requeue)

    # -- executions ----------------------------------------------------------------------------

    async def set_execution_process(self, execution_id: int, proc: ProcessIdentity) -> None:
        await self._db.execute(
            "UPDATE executions SET pgid = $1, proc_started = $2, boot_id = $3 WHERE id = $4",
            proc.pgid, proc.started, proc.boot_id, execution_id)

    async def finish(
        self,
        execution_id: int,
        task_id: int,
        *,
        execution: dict[str, Any],
        task: dict[str, Any],
        files: Iterable[FileChange] = (),
    ) -> Finished:
        """Record an attempt's outcome (see ``SqliteStore.finish``). An execution that is no
        longer running (its node was presumed dead and its task went elsewhere) keeps what
        was recorded: the late outcome is not written over the task's newer life."""
        now = self._clock()
        values = rows.result_values(execution, now)
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(values, 1))
        exec_id = len(values) + 1
        task_sql, task_args = self._task_update(task_id, task, first=exec_id + 1)
        tid = f"${exec_id + len(task_args)}"  # the task's id, last of the task's arguments
        state = TaskState(task["state"]) if "state" in task else None
        changed = [(execution_id, f.path, f.insertions, f.deletions) for f in files]
        # One statement records both and says what else there is to do: most attempts have
        # no reply waiting and no task waiting for them.
        sql = (f"WITH e AS (UPDATE executions SET {sets} WHERE id = ${exec_id}"
               f" AND status = 'running' RETURNING id), t AS ({task_sql}"
               " AND EXISTS (SELECT 1 FROM e))"
               " SELECT EXISTS (SELECT 1 FROM e), EXISTS (SELECT 1 FROM replies"
               f" WHERE task_id = {tid} AND taken_at IS NULL), EXISTS (SELECT 1 FROM task_deps"
               f" WHERE depends_on = {tid}), (SELECT state FROM tasks WHERE id = {tid})")

        async def write(c: C) -> Finished:
            recorded, replies, dependents, current = rows.got(await c.fetchrow(
                sql, *values.values(), execution_id, *task_args))
            if not recorded:
                return Finished(TaskState(current or TaskState.QUEUED), {})
            if changed:
                await c.executemany(
                    "INSERT INTO execution_files VALUES ($1, $2, $3, $4) ON CONFLICT"
                    " (execution_id, path) DO UPDATE SET insertions = EXCLUDED.insertions,"
                    " deletions = EXCLUDED.deletions", changed)
            after = state
            if replies and state in (TaskState.SUCCEEDED, TaskState.FAILED):
                after = await self._take_reply(c, task_id, now) or state
            elif replies and state == TaskState.CANCELLED:
                await c.execute("UPDATE replies SET taken_at = $1 WHERE task_id = $2"
                                " AND taken_at IS NULL", now, task_id)
            if not dependents:
                return Finished(after or TaskState.QUEUED, {})
            return await _settled(c, task_id, after, now)

        return await self._db.run(write)

    @staticmethod
    async def _take_reply(c: C, task_id: int, now: float) -> TaskState | None:
        row = await c.fetchrow("SELECT id, prompt FROM replies WHERE task_id = $1"
                               " AND taken_at IS NULL ORDER BY id LIMIT 1", task_id)
        if row is None:
            return None
        await c.execute("UPDATE replies SET taken_at = $1 WHERE id = $2", now, row[0])
        await c.execute("UPDATE tasks SET state = 'queued', current_prompt = $1, attempts = 0,"
                        " rate_limit_requeues = 0, error = NULL, run_after = 0, updated_at = $2"
                        " WHERE id = $3", row[1], now, task_id)
        return TaskState.QUEUED

    async def get_execution(self, execution_id: int) -> Execution:
        row = await self._one(f"SELECT {rows.EXEC_COLS} FROM executions WHERE id = $1",
                              execution_id)
        if row is None:
            raise NotFound(f"execution {execution_id} does not exist")
        return rows.execution(row)

    async def executions_for(self, task_id: int) -> list[Execution]:
        found = await self._all(
            f"SELECT {rows.EXEC_COLS} FROM executions WHERE task_id = $1 ORDER BY id", task_id)
        return [rows.execution(r) for r in found]

    async def running_executions(self) -> list[Execution]:
        """Executions recorded as running on this node."""
        found = await self._all(f"SELECT {rows.EXEC_COLS} FROM executions"
                                " WHERE status = 'running' AND node_id = $1", self.node_id)
        return [rows.execution(r) for r in found]

    async def running_processes(self) -> list[ProcessIdentity]:
        """The agents' process groups of this node's executions still marked running."""
        found = await self._all(
            "SELECT pgid, proc_started, boot_id FROM executions"
            " WHERE status = 'running' AND pgid IS NOT NULL AND node_id = $1", self.node_id)
        return [ProcessIdentity(pgid=r[0], started=r[1], boot_id=r[2]) for r in found]

    async def recover_interrupted(self) -> int:
        """At start: what this node left running (it crashed) is interrupted and requeued."""
        now = self._clock()
        return await self._db.run(lambda c: interrupt(
            c, self.node_id, now, "daemon stopped while this execution was running"))

    def stop_waiting_after(self, seconds: float) -> None:
        self._db.give_up_after(seconds)

    async def release_orphans(self, live: Iterable[int], started_before: float) -> int:
        now = self._clock()
        return await self._db.run(lambda c: interrupt(
            c, self.node_id, now, "no worker held this execution", keep=sorted(set(live)),
            started_before=started_before))

    # -- schedules -----------------------------------------------------------------------------

    async def add_schedule(self, cron: str, prompt: str, options: dict[str, Any],
                           now: float) -> Schedule:
        row = await self._one(
            "INSERT INTO schedules (cron, prompt, options, created_at) VALUES ($1, $2, $3, $4)"
            f" RETURNING {rows.SCHEDULE_COLS}", cron, prompt, json.dumps(options), now)
        assert row is not None
        return rows.schedule(row)

    async def schedules(self) -> list[Schedule]:
        return [rows.schedule(r) for r in
                await self._all(f"SELECT {rows.SCHEDULE_COLS} FROM schedules ORDER BY id")]

    async def remove_schedule(self, schedule_id: int) -> None:
        if not await self._db.execute("DELETE FROM schedules WHERE id = $1", schedule_id):
            raise NotFound(f"schedule {schedule_id} does not exist")

    async def schedule_fired(self, schedule_id: int, at: float, task_id: int | None) -> None:
        await self._db.execute("UPDATE schedules SET last_fired_at = $1,"
                               " last_task_id = COALESCE($2, last_task_id) WHERE id = $3",
                               at, task_id, schedule_id)

    async def take_firing(self, schedule_id: int, seen: float | None, at: float) -> bool:
        return bool(await self._db.execute(
            "UPDATE schedules SET last_fired_at = $1 WHERE id = $2"
            " AND last_fired_at IS NOT DISTINCT FROM $3", at, schedule_id, seen))

    # -- stats ---------------------------------------------------------------------------------

    async def spend_since(self, day: str) -> dict[str, float]:
        """Recorded spend per agent from ``day`` on, on every node."""
        found = await self._all("SELECT agent, SUM(cost_usd) FROM usage_daily WHERE day >= $1"
                                " GROUP BY agent", day)
        return {r[0]: float(r[1] or 0.0) for r in found}

    async def usage(self, by: str, since: str | None = None) -> list[dict[str, Any]]:
        column = {"day": "day", "agent": "agent", "model": "model"}[by]
        found = await self._all(
            f"SELECT {column}, SUM(executions)::bigint, SUM(cost_usd), SUM(cost_estimated_usd),"
            f" SUM(tokens_in)::bigint, SUM(tokens_out)::bigint FROM usage_daily WHERE day >= $1"
            f" GROUP BY {column} ORDER BY {column}", since or "0000-00-00")
        return rows.usage_rows(found, by)

    async def stats(self) -> dict[str, Any]:
        async def read(c: C) -> tuple[list[Any], list[Any]]:
            states = await c.fetch("SELECT state, SUM(tasks)::bigint FROM task_counts"
                                   " GROUP BY state")
            agents = await c.fetch(
                "SELECT agent, SUM(executions)::bigint, SUM(succeeded)::bigint,"
                " SUM(failed)::bigint, SUM(rate_limited)::bigint, SUM(cost_usd),"
                " SUM(cost_estimated_usd), SUM(tokens_in)::bigint, SUM(tokens_out)::bigint,"
                " SUM(duration_ms)::bigint FROM usage_daily GROUP BY agent ORDER BY agent")
            return list(states), list(agents)

        states, agents = await self._db.run(read)
        return rows.stats(states, agents)

