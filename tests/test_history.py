"""A long history: counters that match the rows, reads on indexes, cursor paging, retention,
compressed logs. Large stores are built with bulk SQL (``bench.bigstore``), not by submitting."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from bench.bigstore import build

from corral.config import DaemonSettings, LocalModelSettings, Settings
from corral.executor.logfiles import COMPRESS_FROM_BYTES, compress, open_log, worth_compressing
from corral.executor.pool import balance
from corral.models import TaskState
from corral.storage.base import TaskFilter
from corral.storage.sqlite import SqliteStore
from tests.conftest import StartDaemon, until
from tests.daemon_proc import cli
from tests.fakes.base import Reply
from tests.fakes.openai import FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
MakeSettings = Callable[..., Settings]
DAY_S = 86400.0
HISTORY_TABLES = ("tasks", "executions", "execution_files", "task_deps", "replies")


def rows(path: Path, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One statement on a connection of the test's own, committed."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return [tuple(r) for r in conn.execute(statement, params)]


def assert_counters_match_the_rows(path: Path) -> None:
    counted = {s: n for s, n in rows(path, "SELECT state, tasks FROM task_counts") if n}
    assert counted == dict(rows(path, "SELECT state, COUNT(*) FROM tasks GROUP BY state"))
    usage = rows(path, "SELECT day, agent, model, executions, succeeded, failed, rate_limited,"
                 " round(cost_usd, 6), tokens_in, tokens_out FROM usage_daily ORDER BY 1, 2, 3")
    scanned = rows(path, (
        "SELECT date(finished_at, 'unixepoch', 'localtime'), agent, COALESCE(model, ''),"
        " COUNT(*), SUM(status = 'succeeded'), SUM(status = 'failed'),"
        " SUM(status = 'rate_limited'), round(COALESCE(SUM(cost_usd), 0), 6),"
        " COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0) FROM executions"
        " WHERE finished_at IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"))
    assert usage == scanned


def settings_on(make_settings: MakeSettings, fake: FakeOpenAI, data_dir: Path,
                **daemon: Any) -> Settings:
    base = make_settings()
    return make_settings(
        daemon=DaemonSettings(socket_path=base.daemon.socket_path, data_dir=data_dir,
                              shutdown_grace_seconds=2.0, **daemon),
        local_model=LocalModelSettings(endpoint=fake.endpoint, model="m"))


@pytest.fixture
def history(tmp_path: Path) -> Callable[..., Path]:
    """A data dir whose store already holds ``tasks`` finished tasks over the last year."""

    def make(tasks: int, **kwargs: Any) -> Path:
        data_dir = tmp_path / "data"
        data_dir.mkdir(exist_ok=True)
        build(data_dir / "corral.db", tasks, **kwargs)
        return data_dir

    return make


async def test_the_counters_follow_every_write_and_a_migration_fills_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    async with SqliteStore(path, migrate_upto=6):  # a store written before the counters
        rows(path, "INSERT INTO tasks (prompt, agent, state, created_at, updated_at)"
             " VALUES ('old', 'local', 'succeeded', 1.0, 2.0)")
        rows(path, "INSERT INTO executions (task_id, agent, model, status, started_at,"
             " finished_at, cost_usd, tokens_in, tokens_out) VALUES (1, 'local', 'm',"
             " 'succeeded', 1.0, 3.5, 0.25, 10, 4)")
    async with SqliteStore(path) as store:
        assert_counters_match_the_rows(path)
        assert (await store.stats())["agents"]["local"]["avg_duration_ms"] == 2500
        for n in range(6):
            await store.create_task(f"t{n}", agent="claude", pinned=True)
        claimed = (await store.claim_many({"claude": 3}, balance, tmp_path, limit=3)).tasks
        outcomes = [("succeeded", TaskState.SUCCEEDED), ("failed", TaskState.FAILED),
                    ("rate_limited", TaskState.QUEUED)]
        for (task, execution), (status, state) in zip(claimed, outcomes, strict=True):
            await store.finish(execution.id, task.id, task={"state": state},
                               execution={"status": status, "cost_usd": 0.5, "tokens_in": 7,
                                          "model": "sonnet", "cost_estimated": 1})
        await store.cancel_queued(claimed[2][0].id)
        assert_counters_match_the_rows(path)
        stats = await store.stats()
        assert stats["tasks"]["queued"] == 3 and stats["tasks"]["cancelled"] == 1
        assert stats["agents"]["claude"]["rate_limited"] == 1
        assert stats["agents"]["claude"]["cost_estimated_usd"] == 1.5


async def test_every_read_and_write_of_the_api_walks_an_index(
    tmp_path: Path, history: Callable[..., Path],
) -> None:
    data_dir = history(3000)
    seen: list[str] = []
    async with SqliteStore(data_dir / "corral.db", trace=seen.append) as store:
        now = time.time()
        for where in (TaskFilter(), TaskFilter(state=TaskState.FAILED),
                      TaskFilter(agent="codex"), TaskFilter(since=now - 30 * DAY_S),
                      TaskFilter(until=now - 300 * DAY_S), TaskFilter(before=2000),
                      TaskFilter(state=TaskState.SUCCEEDED, agent="gemini", before=100)):
            await store.list_tasks(where, limit=20)
        await store.get_task(1500, with_executions=True)
        await store.executions_for(1500)
        await store.execution_totals(range(1400, 1600))
        await store.stats()
        for by in ("day", "agent", "model"):
            await store.usage(by, since="2026-01-01")
        await store.spend_since("2026-11-01")
        await store.running_executions()
        await store.running_processes()
        await store.recover_interrupted()
        await store.unclassified()
        await store.workspaces(["active"])
        task = await store.create_task("new", agent="local", pinned=True)
        await store.claim_many({"local": 1}, balance, tmp_path, limit=1)
        await store.update_task(task.id, state=TaskState.SUCCEEDED)
        await store.prune(now - 200 * DAY_S, dry_run=True)
        await store.prune(now - 200 * DAY_S, batch=100)
    statements = {s for s in seen if re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT|WITH)", s, re.I)}
    assert len(statements) > 30
    with contextlib.closing(sqlite3.connect(data_dir / "corral.db")) as conn:
        for statement in statements:
            plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {statement}")]
            history_read = False
            for step in plan:
                table = re.match(r"(SCAN|SEARCH) (\w+)", step)
                if table and table.group(2) in HISTORY_TABLES:
                    history_read = True
                    assert "USING" in step, (statement, plan)  # an index, never the table
            # Sorting rows of history by hand (small counter tables may be sorted).
            assert not (history_read and any("TEMP B-TREE" in step for step in plan)), (
                statement, plan)


async def test_pages_walk_every_task_once_newest_first_and_filters_use_the_same_cursor(
    make_settings: MakeSettings, fake_openai: MakeFake, history: Callable[..., Path],
    daemon: StartDaemon,
) -> None:
    data_dir = history(2500)
    _, api = await daemon(settings_on(make_settings, await fake_openai(), data_dir))
    every: list[dict[str, Any]] = []
    before = None
    while True:
        status, page = await api.call("GET", "/tasks", params={
            "limit": "400", **({"before": str(before)} if before else {})})
        assert status == 200, page
        every += page["tasks"]
        before = page["next"]
        if before is None:
            break
    assert len(every) == 2500 and len({t["id"] for t in every}) == 2500
    order = [(t["created_at"], t["id"]) for t in every]
    assert order == sorted(order, reverse=True)
    db = data_dir / "corral.db"
    cutoff = time.time() - 100 * DAY_S
    for params, sql in (
        ({"state": "failed"}, "state = 'failed'"),
        ({"agent": "codex"}, "agent = 'codex'"),
        ({"since": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(cutoff))},
         f"created_at >= {int(cutoff)}"),
        ({"state": "cancelled", "until": "2100-01-01"}, "state = 'cancelled'"),
    ):
        found, before = [], None
        while True:
            _, page = await api.call("GET", "/tasks", params={
                **params, "limit": "97", **({"before": str(before)} if before else {})})
            found += [t["id"] for t in page["tasks"]]
            before = page["next"]
            if before is None:
                break
        expected = [r[0] for r in rows(db, f"SELECT id FROM tasks WHERE {sql}"  # noqa: S608
                                           " ORDER BY created_at DESC, id DESC")]
        assert found == expected and expected, params
    status, body = await api.call("GET", "/tasks", params={"before": "999999"})
    assert status == 404 and "cursor" in body["error"]["message"]
    status, body = await api.call("GET", "/tasks", params={"since": "last tuesday"})
    assert status == 400 and "since" in body["error"]["message"]
    code, out, err = await cli("ls", "--state", "failed", "--limit", "3", socket=api.socket_path)
    assert code == 0 and out.count("failed") == 3
    assert re.search(r"more: corral ls --before \d+", err)


async def test_prune_removes_old_finished_tasks_their_rows_and_their_folders_only(
    make_settings: MakeSettings, fake_openai: MakeFake, history: Callable[..., Path],
    daemon: StartDaemon, tmp_path: Path,
) -> None:
    data_dir = history(1000)
    db = data_dir / "corral.db"
    executions_dir = data_dir / "executions"
    old_ids = [r[0] for r in rows(db, "SELECT id FROM tasks WHERE updated_at < ?",
                                  (time.time() - 30 * DAY_S,))]
    elsewhere = tmp_path / "not-corrals"
    elsewhere.mkdir()
    for task_id in old_ids[:5]:  # log folders of its own, and one recorded outside
        (executions_dir / str(task_id)).mkdir(parents=True)
        (executions_dir / str(task_id) / "stdout.log").write_text("{}\n")
        rows(db, "UPDATE executions SET log_dir = ? WHERE task_id = ?",
             (str(executions_dir / str(task_id)), task_id))
    rows(db, "UPDATE executions SET log_dir = ? WHERE task_id = ?", (str(elsewhere), old_ids[5]))
    rows(db, "UPDATE tasks SET ws_state = 'active', ws_path = '/x' WHERE id = ?", (old_ids[6],))
    spent_before = rows(db, "SELECT SUM(cost_usd), SUM(executions) FROM usage_daily")
    _, api = await daemon(settings_on(make_settings, await fake_openai(), data_dir))
    status, body = await api.call("POST", "/prune", json={})
    assert status == 400 and "keep_days" in body["error"]["message"]
    code, out, err = await cli("prune", "--older-than", "30", "--dry-run", "--json",
                               socket=api.socket_path)
    assert code == 0, err
    dry = json.loads(out)
    assert dry["tasks"] == len(old_ids) - 1 and dry["executions"] == dry["tasks"]
    assert len(rows(db, "SELECT id FROM tasks")) == 1000  # nothing removed
    code, out, err = await cli("prune", "--older-than", "30", socket=api.socket_path)
    assert code == 0 and f"removed {dry['tasks']} tasks" in out, err
    left = {r[0] for r in rows(db, "SELECT id FROM tasks")}
    assert left.isdisjoint(set(old_ids) - {old_ids[6]}) and old_ids[6] in left
    assert len(left) == 1000 - dry["tasks"]
    assert not rows(db, "SELECT 1 FROM executions WHERE task_id NOT IN (SELECT id FROM tasks)")
    assert not any((executions_dir / str(t)).exists() for t in old_ids[:5])
    assert elsewhere.exists()  # not the daemon's folder: left alone
    assert rows(db, "SELECT SUM(cost_usd), SUM(executions) FROM usage_daily") == spent_before
    counted = {s: n for s, n in rows(db, "SELECT state, tasks FROM task_counts") if n}
    assert counted == dict(rows(db, "SELECT state, COUNT(*) FROM tasks GROUP BY state"))
    status, _ = await api.call("GET", f"/tasks/{old_ids[0]}")
    assert status == 404


async def test_keep_days_prunes_in_the_background_from_startup(
    make_settings: MakeSettings, fake_openai: MakeFake, history: Callable[..., Path],
    daemon: StartDaemon,
) -> None:
    data_dir = history(2000)
    db = data_dir / "corral.db"
    _, api = await daemon(settings_on(make_settings, await fake_openai(), data_dir,
                                      keep_days=90))

    async def pruned() -> bool:
        return not rows(db, "SELECT 1 FROM tasks WHERE updated_at < ? LIMIT 1",
                        (time.time() - 91 * DAY_S,))

    await until(pruned, timeout_s=30)
    assert 400 < len(rows(db, "SELECT id FROM tasks")) < 600  # about a quarter of a year left
    status, _ = await api.call("GET", "/stats")
    assert status == 200


def test_a_log_is_compressed_only_when_it_is_worth_it_and_reads_the_same(tmp_path: Path) -> None:
    small, big = tmp_path / "small.log", tmp_path / "big.log"
    small.write_bytes(b'{"type": "result"}\n')
    big.write_bytes(b'{"type": "stream_event"}\n' * (COMPRESS_FROM_BYTES // 10))
    assert not worth_compressing(small) and worth_compressing(big)
    assert not worth_compressing(tmp_path / "gone.log")
    before = big.read_bytes()
    assert compress(big) and not big.exists()
    assert big.with_name("big.log.gz").stat().st_size < len(before) // 20
    with open_log(big) as fh:
        assert fh.read() == before
    assert not compress(big)  # already done: nothing left to compress


async def test_a_finished_log_is_compressed_and_read_the_same_by_logs_and_a_reply(
    make_settings: MakeSettings, fake_openai: MakeFake, daemon: StartDaemon, tmp_path: Path,
) -> None:
    fake = await fake_openai()
    first_answer = "the first answer, at length:" + " word" * 15_000  # big enough to compress
    fake.push(Reply(text=first_answer))
    _, api = await daemon(settings_on(make_settings, fake, tmp_path / "data"))
    task = await api.wait((await api.submit(prompt="first", agent="local"))["id"])
    folder = Path(task["executions"][0]["log_dir"])

    async def compressed() -> bool:
        return (folder / "stdout.log.gz").exists() and not (folder / "stdout.log").exists()

    await until(compressed)
    assert (folder / "stdout.log.gz").stat().st_mode & 0o077 == 0  # as private as the log
    code, out, err = await cli("logs", str(task["id"]), "--raw", socket=api.socket_path)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["type"] == "result" and events[-1]["result"] == first_answer
    code, out, err = await cli("logs", str(task["id"]), socket=api.socket_path)
    assert code == 0 and "the first answer, at length" in out
    # A reply reads the earlier turns back from the compressed log.
    fake.push(Reply(text="the second answer"))
    code, out, err = await cli("reply", str(task["id"]), "and then?", "--wait",
                               socket=api.socket_path)
    assert code == 0, err
    sent = fake.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent] == ["first", first_answer, "and then?"]
