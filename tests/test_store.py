"""The stores: claiming is atomic and in order, crash recovery requeues (both backends, through
``make_store``); SQLite's migrations, group commit, readers and query plans."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from corral.errors import BadRequest, Conflict, NotFound
from corral.executor.pool import balance
from corral.models import ExecStatus, Execution, Task, TaskState
from corral.storage.base import Finished, Store, TaskFilter
from corral.storage.migrate import load_migrations
from corral.storage.sqlite import SqliteStore
from tests.conftest import MakeStore


def sql(path: Path, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """One statement on a connection of the test's own, committed."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return list(conn.execute(statement, params).fetchall())


async def claim(
    store: Store, free: dict[str, int], tmp: Path
) -> tuple[Task, Execution] | None:
    claimed = (await store.claim_many(free, balance, tmp, limit=1)).tasks
    return claimed[0] if claimed else None


async def test_migrations_recorded_in_order(store: SqliteStore) -> None:
    rows = sql(store.path, "SELECT version, name FROM schema_migrations ORDER BY 1")
    assert [r[0] for r in rows] == [m.version for m in load_migrations()]
    assert rows[0][1] == "0001_tasks_executions"
    assert rows[1][1] == "0002_execution_tokens"


async def test_upgrade_from_0001_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    async with SqliteStore(path, migrate_upto=1):
        columns = {row[1] for row in sql(path, "PRAGMA table_info(executions)")}
        assert "cost_usd" in columns and "tokens_in" not in columns
        for i in range(5):  # rows as the version-1 daemon wrote them
            (task_id,), = sql(path, "INSERT INTO tasks (prompt, agent, pinned, created_at,"
                              " updated_at) VALUES (?, 'local', 1, 1.0, 1.0) RETURNING id",
                              (f"prompt {i}",))
            sql(path, "INSERT INTO executions (task_id, agent, status, started_at, cost_usd,"
                " log_path) VALUES (?, 'claude', 'succeeded', 1.0, ?, ?)",
                (task_id, 0.25 * i, f"/logs/{i}"))
    async with SqliteStore(path) as new:
        tasks = (await new.list_tasks(limit=100)).tasks
        assert sorted(t.prompt for t in tasks) == [f"prompt {i}" for i in range(5)]
        executions = [e for t in tasks for e in await new.executions_for(t.id)]
        assert sorted(e.cost_usd or 0 for e in executions) == [0, 0.25, 0.5, 0.75, 1.0]
        assert all(e.tokens_in is None and e.tokens_out is None for e in executions)
        assert sorted(e.log_dir or "" for e in executions) == [f"/logs/{i}" for i in range(5)]
    assert sql(path, "PRAGMA integrity_check") == [("ok",)]


async def test_claim_is_atomic_under_concurrency(make_store: MakeStore, tmp_path: Path) -> None:
    a, b = await make_store(), await make_store()
    for i in range(40):
        await a.create_task(f"t{i}", agent="local", pinned=True)

    async def drain(s: Store) -> list[int]:
        got = []
        while (claimed := await claim(s, {"local": 100}, tmp_path)):
            got.append(claimed[0].id)
        return got

    first, second = await asyncio.gather(drain(a), drain(b))
    assert len(first) + len(second) == 40
    assert not set(first) & set(second)


async def test_claim_order_priority_then_age_and_agent_filter(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = await make_store()
    low = await store.create_task("low", agent="local", pinned=True)
    high = await store.create_task("high", agent="local", pinned=True, priority=5)
    other = await store.create_task("claude", agent="claude", pinned=True, priority=9)
    unclassified = await store.create_task("auto")
    first = await claim(store, {"local": 2}, tmp_path)
    second = await claim(store, {"local": 1}, tmp_path)
    assert first and second and (first[0].id, second[0].id) == (high.id, low.id)
    assert first[0].attempts == 1 and first[0].state == TaskState.RUNNING
    assert first[1].status == ExecStatus.RUNNING and first[1].task_id == high.id
    assert first[1].log_dir == str(tmp_path / str(first[1].id))
    assert await claim(store, {"local": 1}, tmp_path) is None
    assert (await store.get_task(other.id)).state == TaskState.QUEUED
    assert (await store.get_task(unclassified.id)).state == TaskState.QUEUED


async def test_claim_many_fills_each_agent_only_up_to_its_free_slots(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = await make_store()
    local = [await store.create_task(f"l{i}", agent="local", pinned=True) for i in range(5)]
    claude = [await store.create_task(f"c{i}", agent="claude", pinned=True) for i in range(3)]
    auto = await store.create_task("auto", agent="claude", classifier_reason="pick claude",
                                   priority=1)
    claimed = (await store.claim_many({"local": 3, "claude": 1}, balance, tmp_path,
                                      limit=10)).tasks
    by_agent: dict[str, list[int]] = {}
    for task, execution in claimed:
        by_agent.setdefault(task.agent or "", []).append(task.id)
        assert execution.task_id == task.id and execution.agent == task.agent
        assert execution.log_dir == str(tmp_path / str(execution.id))
        assert (await store.get_execution(execution.id)).log_dir == execution.log_dir
    # The unpinned task went first (priority) to the freest agent, so only two pinned local
    # tasks fit; a full agent's pinned tasks wait while the other agent's still get claimed.
    assert by_agent == {"local": [auto.id, local[0].id, local[1].id], "claude": [claude[0].id]}
    assert len({e.id for _, e in claimed}) == 4
    rest = (await store.claim_many({"local": 9, "claude": 9}, balance, tmp_path, limit=2)).tasks
    assert [t.id for t, _ in rest] == [local[2].id, local[3].id]
    assert (await store.claim_many({"local": 0}, balance, tmp_path, limit=5)).tasks == []


async def test_a_claim_in_a_failed_shared_commit_is_redone_in_full(
    store: SqliteStore, tmp_path: Path
) -> None:
    for i in range(3):
        await store.create_task(f"t{i}", agent="local", pinned=True)

    async def broken_write() -> None:
        await store._db.group.write(lambda c: c.execute("INSERT INTO no_such_table VALUES (1)"))

    # Both join one group commit, the claim first; the broken write sinks the shared
    # transaction, and each write is then retried on its own.
    claimed, failed = await asyncio.gather(
        store.claim_many({"local": 3}, balance, tmp_path, limit=3), broken_write(),
        return_exceptions=True)
    assert isinstance(failed, Exception) and "no_such_table" in str(failed)
    assert not isinstance(claimed, BaseException) and len(claimed.tasks) == 3
    assert len(await store.running_executions()) == 3


async def test_recover_interrupted(make_store: MakeStore, tmp_path: Path) -> None:
    store = await make_store()
    again = await store.create_task("again", agent="local", pinned=True, max_retries=1)
    spent = await store.create_task("spent", agent="local", pinned=True, max_retries=0)
    for _ in (again, spent):
        assert await claim(store, {"local": 2}, tmp_path) is not None
    assert len(await store.running_executions()) == 2
    assert await store.recover_interrupted() == 2
    assert await store.running_executions() == []
    assert (await store.get_task(again.id)).state == TaskState.QUEUED
    failed = await store.get_task(spent.id, with_executions=True)
    assert failed.state == TaskState.FAILED and "out of attempts" in (failed.error or "")
    assert failed.executions[0].status == ExecStatus.INTERRUPTED


async def test_unpinned_tasks_are_balanced_to_the_freest_agent(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = await make_store()
    task = await store.create_task("auto", agent="claude", classifier_reason="pick claude")
    claimed = await claim(store, {"claude": 1, "local": 3}, tmp_path)
    assert claimed is not None
    assert claimed[0].agent == "local" and claimed[1].agent == "local"
    assert (await store.get_task(task.id)).classifier_reason == "pick claude; balanced to local"


def test_balance_prefers_free_capacity_then_the_classifier() -> None:
    assert balance("claude", {"claude": 1, "local": 3}) == "local"
    assert balance("claude", {"claude": 2, "local": 2}) == "claude"
    assert balance(None, {"gemini": 2, "local": 2}) == "gemini"


async def test_tasks_pinned_to_a_vanished_agent_go_back_to_the_classifier(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    stranded = await store.create_task("x", agent="claude", pinned=True)
    kept = await store.create_task("y", agent="local", pinned=True)
    assert await store.unpin_unavailable(["local", "gemini"]) == 1
    again = await store.get_task(stranded.id)
    assert (again.pinned, again.agent) == (False, None)
    assert again.classifier_reason == "pinned to claude, which is no longer registered"
    assert [t.id for t in await store.unclassified()] == [stranded.id]
    assert (await store.get_task(kept.id)).pinned


async def test_group_commit_keeps_every_write_and_isolates_a_bad_one(store: SqliteStore) -> None:
    import asyncio
    import sqlite3

    def bad(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO no_such_table VALUES (1)")

    results = await asyncio.gather(
        *(store.create_task(f"burst {n}") for n in range(50)),
        store._db.group.write(bad),
        return_exceptions=True,
    )
    assert isinstance(results[-1], sqlite3.OperationalError)
    created = [r for r in results[:-1] if not isinstance(r, BaseException)]
    assert len(created) == 50
    stored = (await store.list_tasks(limit=100)).tasks
    assert sorted(t.prompt for t in stored) == sorted(f"burst {n}" for n in range(50))


async def test_reads_do_not_wait_for_a_long_write(tmp_path: Path) -> None:
    """A read runs on its own connection while the writer is busy inside a transaction."""
    import threading

    async with SqliteStore(tmp_path / "rw.db") as store:
        task = await store.create_task("kept", agent="local", pinned=True)
        release = threading.Event()

        def slow(c: sqlite3.Connection) -> None:
            c.execute("UPDATE tasks SET priority = 5 WHERE id = ?", (task.id,))
            release.wait(10)

        writing = asyncio.create_task(store._db.group.write(slow))
        try:
            async with asyncio.timeout(5):
                seen = await store.get_task(task.id)
        finally:
            release.set()
        await writing
        assert seen.priority == 0  # the committed state, not the write in flight
        assert (await store.get_task(task.id)).priority == 5


async def test_recorded_process_identity_round_trips(make_store: MakeStore, tmp_path: Path) -> None:
    store = await make_store()
    from corral.models import ProcessIdentity

    await store.create_task("p", agent="local", pinned=True)
    claimed = await claim(store, {"local": 1}, tmp_path)
    assert claimed is not None
    proc = ProcessIdentity(pgid=4242, started=123456, boot_id="boot-x")
    await store.set_execution_process(claimed[1].id, proc)
    assert await store.running_processes() == [proc]
    assert (await store.get_execution(claimed[1].id)).pgid == 4242


async def test_the_queue_reads_use_their_indexes(store: SqliteStore) -> None:
    """The claim walks tasks_queue in order (no sort); the next due retry is an index read."""
    from corral.storage.sqlite import NEXT_READY_SQL, claim_sql

    def plan(statement: str, params: tuple[object, ...]) -> str:
        rows = sql(store.path, f"EXPLAIN QUERY PLAN {statement}", params)
        return " | ".join(str(r[-1]) for r in rows)

    claim = plan(claim_sql(2), (1.0, "node-a", "local", "claude"))
    assert "USING INDEX tasks_queue" in claim and "TEMP B-TREE" not in claim, claim
    ready = plan(NEXT_READY_SQL, (1.0,))
    assert "tasks_delayed" in ready and "SCAN tasks" not in ready.replace(
        "SCAN tasks USING", ""), ready


async def test_a_claim_says_when_the_next_delayed_task_is_due(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = await make_store()
    import time

    soon = await store.create_task("soon", agent="local", pinned=True)
    later = await store.create_task("later", agent="local", pinned=True)
    now = time.time()
    await store.update_task(soon.id, run_after=now + 30)
    await store.update_task(later.id, run_after=now + 60)
    claim = await store.claim_many({"local": 2}, balance, tmp_path, limit=2)
    assert claim.tasks == [] and claim.next_ready_at == now + 30


# -- the rest of the protocol, on both backends -----------------------------------------------


async def finish(store: Store, task: Task, execution: Execution, state: TaskState, *,
                 cost: float = 0.0) -> Finished:
    status = ExecStatus.SUCCEEDED if state == TaskState.SUCCEEDED else ExecStatus.FAILED
    return await store.finish(execution.id, task.id, task={"state": state},
                              execution={"status": status, "cost_usd": cost, "tokens_in": 10,
                                         "tokens_out": 5, "cost_estimated": 0})


async def test_dependencies_release_and_cancel_down_the_chain(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = await make_store()
    first = await store.create_task("1", agent="local", pinned=True)
    second = await store.create_task("2", agent="local", pinned=True, after=[first.id])
    third = await store.create_task("3", agent="local", pinned=True, after=[second.id])
    fourth = await store.create_task("4", agent="local", pinned=True, after=[third.id])
    assert (second.state, second.depends_on) == (TaskState.BLOCKED, [first.id])
    running = await claim(store, {"local": 4}, tmp_path)
    assert running is not None and running[0].id == first.id  # the blocked ones wait
    assert await claim(store, {"local": 4}, tmp_path) is None
    done = await finish(store, *running, TaskState.SUCCEEDED)
    assert done.dependents == {second.id: TaskState.QUEUED}
    running = await claim(store, {"local": 4}, tmp_path)
    assert running is not None and running[0].id == second.id
    failed = await finish(store, *running, TaskState.FAILED)
    assert failed.dependents == {third.id: TaskState.CANCELLED,
                                             fourth.id: TaskState.CANCELLED}
    assert (await store.get_task(fourth.id)).error == f"dependency {third.id} cancelled"
    doomed = await store.create_task("5", agent="local", pinned=True, after=[second.id])
    assert doomed.state == TaskState.CANCELLED
    again, cancelled = await store.requeue(second.id)
    assert again.state == TaskState.QUEUED and again.attempts == 0
    assert cancelled == [third.id, doomed.id]
    with pytest.raises(BadRequest):
        await store.create_task("x", after=[999_999])
    with pytest.raises(Conflict):
        await store.requeue(again.id)
    assert (await store.get_task(second.id)).dependents == [third.id, doomed.id]


async def test_a_reply_waits_for_the_run_and_queues_the_task_again(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = await make_store()
    task = await store.create_task("first", agent="local", pinned=True)
    running = await claim(store, {"local": 1}, tmp_path)
    assert running is not None
    waiting = await store.add_reply(task.id, "and then?", agent=None)
    assert waiting.state == TaskState.RUNNING  # kept until the run ends
    after = await finish(store, *running, TaskState.SUCCEEDED)
    assert after.state == TaskState.QUEUED
    again = await claim(store, {"local": 1}, tmp_path)
    assert again is not None and again[1].prompt == "and then?"
    await finish(store, *again, TaskState.SUCCEEDED)
    resumed = await store.add_reply(task.id, "one more", agent="local")
    assert (resumed.state, resumed.current_prompt, resumed.pinned) == (
        TaskState.QUEUED, "one more", True)
    with pytest.raises(NotFound):
        await store.add_reply(999_999, "x", agent=None)


async def test_pages_filters_totals_and_counters(make_store: MakeStore, tmp_path: Path) -> None:
    store = await make_store()
    made = [await store.create_task(f"t{n}", agent=("claude" if n % 3 else "local"),
                                    pinned=True) for n in range(25)]
    seen: list[int] = []
    before = None
    while True:
        page = await store.list_tasks(TaskFilter(before=before), limit=7)
        seen += [t.id for t in page.tasks]
        if (before := page.next) is None:
            break
    assert seen == sorted((t.id for t in made), reverse=True)
    local = await store.list_tasks(TaskFilter(agent="local"), limit=100)
    assert [t.id for t in local.tasks] == sorted((t.id for t in made[::3]), reverse=True)
    with pytest.raises(NotFound):
        await store.list_tasks(TaskFilter(before=999_999))
    claimed = (await store.claim_many({"local": 2, "claude": 1}, balance, tmp_path,
                                      limit=3)).tasks
    for n, (task, execution) in enumerate(claimed):
        await finish(store, task, execution,
                     TaskState.SUCCEEDED if n else TaskState.FAILED, cost=0.5)
    totals = await store.execution_totals([t.id for t, _ in claimed] + [made[-1].id])
    assert sorted(totals) == sorted(t.id for t, _ in claimed)
    assert all(v["executions"] == 1 and v["cost_usd"] == 0.5 and v["tokens_in"] == 10
               for v in totals.values())
    stats = await store.stats()
    assert stats["tasks"]["queued"] == 22 and stats["tasks"]["succeeded"] == 2
    assert stats["tasks"]["failed"] == 1
    assert sum(a["executions"] for a in stats["agents"].values()) == 3
    assert sum(a["tokens_out"] for a in stats["agents"].values()) == 15
    by_agent = {g["agent"]: g for g in await store.usage("agent")}
    assert sum(g["cost_usd"] for g in by_agent.values()) == 1.5
    assert sum((await store.spend_since("2000-01-01")).values()) == 1.5
    assert await store.spend_since("2999-01-01") == {}


async def test_prune_cancel_classify_and_workspaces(make_store: MakeStore, tmp_path: Path) -> None:
    from corral.models import Workspace

    store = await make_store()
    old = await store.create_task("old", agent="local", pinned=True)
    running = await claim(store, {"local": 1}, tmp_path)
    assert running is not None
    await finish(store, *running, TaskState.SUCCEEDED)
    kept = await store.create_task("kept", agent="local", pinned=True)
    import time

    dry = await store.prune(time.time() + 10, dry_run=True)
    assert (dry.tasks, dry.executions) == (1, 1)
    gone = await store.prune(time.time() + 10)
    assert (gone.tasks, gone.executions, gone.log_dirs) == (1, 1, [running[1].log_dir])
    with pytest.raises(NotFound):
        await store.get_task(old.id)
    assert (await store.stats())["tasks"]["succeeded"] == 0
    cancelled = await store.cancel_queued(kept.id)
    assert cancelled is not None and cancelled.state == TaskState.CANCELLED
    assert await store.cancel_queued(kept.id) is None
    auto = await store.create_task("auto")
    assert [t.id for t in await store.unclassified()] == [auto.id]
    await store.set_classification(auto.id, agent="local", model=None, reason="because")
    assert await store.unclassified() == []
    ws = Workspace(repo="/r", path="/w", branch="corral/1", base_commit="abc", state="active")
    await store.set_workspace(auto.id, ws)
    assert [t.workspace for t in await store.workspaces(["active"])] == [ws]


async def test_schedules_and_one_firing_between_two_daemons(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    schedule = await a.add_schedule("* * * * *", "tick", {"agent": "local"}, 100.0)
    assert [s.options for s in await b.schedules()] == [{"agent": "local"}]
    taken = await asyncio.gather(a.take_firing(schedule.id, None, 160.0),
                                 b.take_firing(schedule.id, None, 160.0))
    assert sorted(taken) == [False, True]
    assert await b.take_firing(schedule.id, 160.0, 220.0)
    await a.schedule_fired(schedule.id, 220.0, 7)
    fired = (await b.schedules())[0]
    assert (fired.last_fired_at, fired.last_task_id) == (220.0, 7)
    await b.remove_schedule(schedule.id)
    with pytest.raises(NotFound):
        await a.remove_schedule(schedule.id)
