"""Several daemons, one PostgreSQL queue: real daemon processes, a real server, real faults."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from corral.executor.pool import balance
from corral.storage.pgconn import LOST
from corral.storage.postgres import PostgresStore
from tests import pg
from tests.conftest import ApiClient, until
from tests.daemon_proc import DaemonProcess, cli
from tests.fakes.base import Reply
from tests.fakes.openai import FakeOpenAI
from tests.gitrepo import make_repo

MakeFake = Callable[[], Awaitable[FakeOpenAI]]


def node_config(folder: Path, sock: Path, url: str, fake: FakeOpenAI, node_id: str,
                extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.toml"
    config.write_text(
        f'[daemon]\nsocket_path = "{sock}"\ndata_dir = "{folder / "data"}"\n'
        f'node_id = "{node_id}"\nshutdown_grace_seconds = 1.0\n'
        f'[store]\nurl = "{url}"\nheartbeat_seconds = 0.5\nnode_timeout_seconds = 3\n'
        "[pool]\nmax_workers = 8\nkill_grace_seconds = 1.0\nretry_base_seconds = 0.05\n"
        "retry_max_seconds = 0.2\n[pool.max_concurrent]\nlocal = 4\n"
        f'[local_model]\nendpoint = "{fake.endpoint}"\nmodel = "fake-model"\n'
        "[claude]\nenabled = false\n[gemini]\nenabled = false\n[codex]\nenabled = false\n"
        + extra)
    return config


class Nodes:
    """Daemon processes on one database, each with its own folder, socket and node id."""

    def __init__(self, tmp_path: Path, url: str, fake: FakeOpenAI,
                 socket_path: Callable[[], Path], api_client: Callable[[Path], ApiClient]):
        self.tmp_path, self.url, self.fake = tmp_path, url, fake
        self._socket_path, self._api_client = socket_path, api_client
        self.daemons: dict[str, DaemonProcess] = {}

    async def start(self, node_id: str, *, extra: str = "") -> ApiClient:
        if node_id not in self.daemons:
            sock = self._socket_path()
            folder = self.tmp_path / node_id
            self.daemons[node_id] = DaemonProcess(
                node_config(folder, sock, self.url, self.fake, node_id, extra), sock,
                log=folder / "daemon.log")
        daemon = self.daemons[node_id]
        await daemon.start()
        return self._api_client(daemon.socket_path)

    def kill(self, node_id: str) -> None:
        proc = self.daemons[node_id].proc
        assert proc is not None
        proc.kill()

    async def stop_all(self) -> None:
        """SIGTERM each; whatever is still running after that (a failed test) is killed."""
        try:
            for daemon in self.daemons.values():
                if daemon.proc is not None and daemon.proc.returncode is None:
                    await daemon.stop()
        finally:
            for daemon in self.daemons.values():
                if daemon.proc is not None and daemon.proc.returncode is None:
                    daemon.proc.kill()
                    await daemon.proc.wait()


MakeNodes = Callable[..., Awaitable[Nodes]]


@pytest.fixture
async def shared_queue(
    tmp_path: Path, pg_cluster: pg.PgCluster, fake_openai: MakeFake,
    socket_path: Callable[[], Path], api_client: Callable[[Path], ApiClient],
) -> AsyncIterator[MakeNodes]:
    """Daemon processes on a fresh database of ``server`` (default: the session's cluster),
    with a loopback OpenAI fake of their own; whatever they leave running is stopped."""
    made: list[Nodes] = []

    async def make(server: pg.PgCluster | None = None) -> Nodes:
        url = await (server or pg_cluster).new_database()
        nodes = Nodes(tmp_path / f"q{len(made)}", url, await fake_openai(), socket_path,
                      api_client)
        made.append(nodes)
        return nodes

    yield make
    for nodes in made:
        await nodes.stop_all()


async def db_rows(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def assert_each_ran_once(rows: list[asyncpg.Record], task_ids: list[int]) -> None:
    """Every task succeeded in exactly one execution, and no two of a task's overlap."""
    by_task: dict[int, list[asyncpg.Record]] = {}
    for row in rows:
        by_task.setdefault(row["task_id"], []).append(row)
    assert sorted(by_task) == sorted(task_ids)
    for task_id, runs in by_task.items():
        assert [r["status"] for r in runs].count("succeeded") == 1, (task_id, runs)
        assert all(r["status"] in ("succeeded", "interrupted") for r in runs), runs
        spans = sorted((r["started_at"], r["finished_at"]) for r in runs)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"task {task_id} ran twice at the same time"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_three_daemons_drain_600_tasks_once_each_through_a_kill_and_a_restart(
    shared_queue: MakeNodes,
) -> None:
    nodes = await shared_queue()
    url, fake = nodes.url, nodes.fake
    fake.default = Reply(text="done", chunks=4, chunk_delay_s=0.03)
    apis = [await nodes.start(n) for n in ("a", "b", "c")]
    ids = []
    for n in range(600):  # submitted through every node in turn
        ids.append((await apis[n % 3].submit(prompt=f"task {n}", agent="local",
                                             max_retries=3))["id"])

    async def done_count() -> int:
        rows = await db_rows(url, "SELECT COUNT(*) FROM tasks WHERE state = 'succeeded'")
        return int(rows[0][0])

    async def c_is_busy() -> bool:
        rows = await db_rows(url, "SELECT COUNT(*) FROM executions WHERE node_id = 'c'"
                             " AND status = 'running'")
        return await done_count() >= 100 and rows[0][0] > 0

    await until(c_is_busy, timeout_s=60, every_s=0.05)
    nodes.kill("c")  # SIGKILL mid-run: its running tasks go to a and b
    killed_at = asyncio.get_running_loop().time()

    async def c_reaped() -> bool:
        rows = await db_rows(url, "SELECT COUNT(*) FROM executions WHERE node_id = 'c'"
                             " AND status = 'running'")
        return int(rows[0][0]) == 0

    await until(c_reaped, timeout_s=20, every_s=0.1)
    # Within the node timeout (3 s) and a heartbeat or two.
    assert asyncio.get_running_loop().time() - killed_at < 8
    await nodes.start("c")  # the same id comes back

    async def all_done() -> bool:
        return await done_count() == 600

    await until(all_done, timeout_s=180, every_s=0.2)
    rows = await db_rows(url, "SELECT task_id, status, started_at, finished_at, node_id"
                         " FROM executions")
    assert_each_ran_once(rows, ids)
    interrupted = [r for r in rows if r["status"] == "interrupted"]
    assert interrupted and all(r["node_id"] == "c" for r in interrupted)
    ran_on = {r["node_id"] for r in rows if r["status"] == "succeeded"}
    assert ran_on == {"a", "b", "c"}
    # Every node's CLI sees the whole queue.
    code, out, err = await cli("stats", "--json", socket=nodes.daemons["a"].socket_path)
    assert code == 0 and '"succeeded": 600' in out, err
    await nodes.stop_all()
    assert await db_rows(url, "SELECT node_id FROM nodes") == []  # clean stops leave


async def test_a_second_daemon_with_a_live_node_id_refuses_to_start(
    tmp_path: Path, shared_queue: MakeNodes, socket_path: Callable[[], Path],
) -> None:
    nodes = await shared_queue()
    url, fake = nodes.url, nodes.fake
    await nodes.start("same")
    config = node_config(tmp_path / "twin", socket_path(), url, fake, "same")
    code, _, err = await cli("serve", "--config", str(config))
    assert code != 0
    assert err.strip().count("\n") == 0, err
    assert "node 'same' is already running" in err and f"pid {nodes.daemons['same'].pid}" in err


async def test_a_node_killed_and_restarted_at_once_takes_back_its_own_tasks(
    shared_queue: MakeNodes,
) -> None:
    nodes = await shared_queue()
    url, fake = nodes.url, nodes.fake
    fake.default = Reply(text="slow", chunks=10, chunk_delay_s=0.1)
    api = await nodes.start("solo")
    task = await api.submit(prompt="long", agent="local", max_retries=2)

    async def running() -> bool:
        return bool(await db_rows(url, "SELECT 1 FROM executions WHERE status = 'running'"))

    await until(running, timeout_s=20, every_s=0.05)
    nodes.kill("solo")
    await nodes.daemons["solo"].proc.wait()  # type: ignore[union-attr]
    # Its heartbeat is still fresh, but its process is provably gone: it may start.
    api = await nodes.start("solo")
    done = await api.wait(task["id"], timeout_s=60)
    assert done["state"] == "succeeded"
    assert [e["status"] for e in done["executions"]] == ["interrupted", "succeeded"]


@pytest.mark.parametrize("case", ["refused", "no such role", "no such database",
                                  "wrong password"])
async def test_a_store_that_cannot_be_reached_is_one_line_and_a_failed_start(
    case: str, tmp_path: Path, pg_cluster: pg.PgCluster, fake_openai: MakeFake,
    socket_path: Callable[[], Path],
) -> None:
    url = {"refused": f"postgresql://corral:hunter2@127.0.0.1:{pg.free_port()}/x",
           "no such role": f"postgresql://nobody:hunter2@127.0.0.1:{pg_cluster.port}/postgres",
           "no such database": f"postgresql://corral:hunter2@127.0.0.1:{pg_cluster.port}/nope",
           "wrong password": f"postgresql://keyed:hunter2@127.0.0.1:{pg_cluster.port}/postgres",
           }[case]
    if case == "wrong password":
        await pg_cluster.role_with_password("keyed", "the-right-one")
    config = node_config(tmp_path, socket_path(), url, await fake_openai(), "x")
    code, out, err = await cli("serve", "--config", str(config))
    assert code == 1 and out == ""
    assert err.startswith("corral: cannot connect to postgresql://") and err.count("\n") == 1
    assert "hunter2" not in err
    assert {"refused": "refused", "no such role": "nobody", "no such database": "nope",
            "wrong password": "password authentication failed"}[case] in err


async def test_a_global_cap_holds_across_nodes(pg_cluster: pg.PgCluster, tmp_path: Path) -> None:
    url = await pg_cluster.new_database()
    caps = {"local": 3}
    async with PostgresStore(url, node_id="n1", global_max_concurrent=caps) as first, \
            PostgresStore(url, node_id="n2", global_max_concurrent=caps) as second:
        for n in range(10):
            await first.create_task(f"t{n}", agent="local", pinned=True)
            await first.create_task(f"c{n}", agent="claude", pinned=True)
        got = await asyncio.gather(*(
            s.claim_many({"local": 4, "claude": 1}, balance, tmp_path, limit=5)
            for s in (first, second, first, second)))
        agents = [t.agent for c in got for t, _ in c.tasks]
        assert agents.count("local") == 3 and agents.count("claude") == 4  # claude: no cap
        running = {e.node_id for s in (first, second) for e in await s.running_executions()}
        assert running == {"n1", "n2"}


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_the_database_restarting_under_running_daemons_loses_nothing(
    shared_queue: MakeNodes,
) -> None:
    with pg.cluster() as server:  # a server of its own, to restart
        nodes = await shared_queue(server)
        url, fake = nodes.url, nodes.fake
        fake.default = Reply(text="done", chunks=5, chunk_delay_s=0.1)
        try:
            apis = [await nodes.start(n) for n in ("a", "b")]
            ids = [(await apis[n % 2].submit(prompt=f"t{n}", agent="local"))["id"]
                   for n in range(40)]

            async def some_running() -> bool:
                return bool(await db_rows(url, "SELECT 1 FROM executions"
                                          " WHERE status = 'running'"))

            await until(some_running, timeout_s=20, every_s=0.05)
            await asyncio.to_thread(server.stop)  # results meanwhile wait in memory
            await asyncio.sleep(2.0)  # the outage lasts: the agents finish during it
            await asyncio.to_thread(server.start)
            done = [await apis[0].wait(i, timeout_s=120) for i in ids]
            assert all(d["state"] == "succeeded" for d in done), [
                (d["id"], d["state"], d["error"]) for d in done if d["state"] != "succeeded"]
            rows = await db_rows(url, "SELECT task_id, status, started_at, finished_at,"
                                 " node_id FROM executions")
            assert_each_ran_once(rows, ids)
            for node in ("a", "b"):  # both kept serving
                assert nodes.daemons[node].proc.returncode is None  # type: ignore[union-attr]
        finally:
            await nodes.stop_all()



async def test_logs_follow_on_one_node_a_task_running_on_another(
    shared_queue: MakeNodes,
) -> None:
    nodes = await shared_queue()
    url, fake = nodes.url, nodes.fake
    fake.default = Reply(text="word " * 40, chunks=40, chunk_delay_s=0.1)
    a = await nodes.start("a")
    await nodes.start("b")
    task = await a.submit(prompt="talk", agent="local", node="b")
    assert task["node"] == "b"
    env = {**os.environ, "CORRAL_SOCKET": str(nodes.daemons["a"].socket_path)}
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "logs", "-f", "--raw", str(task["id"]), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert follower.stdout is not None
    first = await asyncio.wait_for(follower.stdout.readline(), 30)
    assert first.strip()
    states = await db_rows(url, "SELECT status, node_id FROM executions WHERE task_id = $1",
                           task["id"])
    assert [(r["status"], r["node_id"]) for r in states] == [("running", "b")]  # live
    rest = await asyncio.wait_for(follower.stdout.read(), 60)
    assert await asyncio.wait_for(follower.wait(), 10) == 0
    done = await a.wait(task["id"])
    assert done["state"] == "succeeded" and done["executions"][0]["node_id"] == "b"
    local_copy = Path(done["executions"][0]["log_dir"]) / "stdout.log"
    assert (first + rest) == local_copy.read_bytes()  # b's own file, byte for byte
    status, body = await a.call("GET", f"/tasks/{task['id']}/log",
                                params={"stream": "stderr"})
    assert status == 404 and "node b" in body["error"]["message"]


async def test_a_task_with_a_dir_stays_on_its_node_unless_told(
    tmp_path: Path, shared_queue: MakeNodes,
) -> None:
    nodes = await shared_queue()
    a = await nodes.start("a")
    here = await a.submit(prompt="p", agent="local", workdir=str(tmp_path), isolate=False)
    anywhere = await a.submit(prompt="p", agent="local", workdir=str(tmp_path),
                              isolate=False, node="any")
    free = await a.submit(prompt="p", agent="local")
    assert (here["node"], anywhere["node"], free["node"]) == ("a", None, None)
    code, out, err = await cli("submit", "--agent", "local", "--node", "b", "--json",
                               "hello", socket=nodes.daemons["a"].socket_path)
    assert code == 0 and '"node": "b"' in out, err
    status, body = await a.call("POST", "/tasks", json={"prompt": "x", "node": "no spaces"})
    assert status == 400 and "node" in body["error"]["message"]
    # A task in a repository gets its worktree on its node; the branch is landed there.
    b = await nodes.start("b")
    repo = make_repo(tmp_path / "repo", {"a.txt": "one\n"})
    in_repo = await a.submit(prompt="p", agent="local", workdir=str(repo))
    assert in_repo["node"] == "a" and in_repo["workspace"] is not None
    done = await a.wait(in_repo["id"])
    assert done["executions"][0]["node_id"] == "a"
    status, body = await b.call("POST", f"/tasks/{in_repo['id']}/discard")
    assert status == 409 and "on node a" in body["error"]["message"], body
    status, _ = await a.call("POST", f"/tasks/{in_repo['id']}/discard")
    assert status == 200


async def test_an_execution_no_worker_holds_goes_back_to_the_queue(
    pg_cluster: pg.PgCluster, tmp_path: Path
) -> None:
    url = await pg_cluster.new_database()
    async with PostgresStore(url, node_id="n1") as store:
        kept = await store.create_task("kept", agent="local", pinned=True)
        lost = await store.create_task("lost", agent="local", pinned=True, max_retries=1)
        claimed = await store.claim_many({"local": 2}, balance, tmp_path, limit=2)
        by_task = {t.id: e.id for t, e in claimed.tasks}
        started = max(e.started_at for _, e in claimed.tasks)
        assert await store.release_orphans([by_task[kept.id]], started + 1) == 1
        assert (await store.get_task(kept.id)).state == "running"
        again = await store.get_task(lost.id, with_executions=True)
        assert again.state == "queued" and again.executions[0].status == "interrupted"
        assert await store.release_orphans([], started - 1) == 0  # too young to judge


async def test_daemons_starting_together_migrate_once(pg_cluster: pg.PgCluster) -> None:
    from corral.storage.migrate import load_migrations

    url = await pg_cluster.new_database()
    stores = [PostgresStore(url, node_id=f"n{n}") for n in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        rows = await db_rows(url, "SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in rows] == [m.version for m in load_migrations("postgres")]
        nodes = await db_rows(url, "SELECT node_id FROM nodes ORDER BY node_id")
        assert [r[0] for r in nodes] == ["n0", "n1", "n2", "n3"]
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_cancel_nodes_and_reply_across_nodes(
    shared_queue: MakeNodes,
) -> None:
    nodes = await shared_queue()
    url, fake = nodes.url, nodes.fake
    fake.default = Reply(text="slow " * 50, chunks=50, chunk_delay_s=0.1)
    a = await nodes.start("a")
    await nodes.start("b")
    code, out, err = await cli("nodes", socket=nodes.daemons["a"].socket_path)
    assert code == 0, err
    assert out.splitlines()[0].startswith("a (this one): ") and out.splitlines()[1][:3] == "b: "
    task = await a.submit(prompt="long", agent="local", node="b")

    async def running() -> bool:
        return bool(await db_rows(url, "SELECT 1 FROM executions WHERE status = 'running'"))

    await until(running, timeout_s=20, every_s=0.05)
    status, cancelled = await a.call("POST", f"/tasks/{task['id']}/cancel")
    assert status == 200 and cancelled["state"] == "cancelled", cancelled
    assert cancelled["executions"][0]["node_id"] == "b"
    assert cancelled["executions"][0]["status"] == "cancelled"
    # Waiting on one node for a task on another ends when it does (a notification).
    fake.default = Reply(text="a second", chunks=10, chunk_delay_s=0.1)
    other = await a.submit(prompt="a second", agent="local", node="b")
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, waited = await a.call("GET", f"/tasks/{other['id']}/wait",
                                  params={"timeout_s": "30"})
    assert status == 200 and waited["state"] == "succeeded", waited
    assert loop.time() - started < 10
    # A reply goes on where the task ran: its session and logs are on b.
    fake.default = Reply(text="short")
    status, replied = await a.call("POST", f"/tasks/{task['id']}/reply",
                                   json={"prompt": "again, briefly"})
    assert status == 200 and replied["node"] == "b"
    done = await a.wait(task["id"])
    assert done["state"] == "succeeded"
    assert [e["node_id"] for e in done["executions"]] == ["b", "b"]


async def test_a_transaction_whose_connection_dies_runs_again_and_a_misuse_does_not(
    pg_cluster: pg.PgCluster,
) -> None:
    from corral.storage.pgconn import Conn, Postgres

    url = await pg_cluster.new_database()
    db = Postgres(url, reconnect_s=20)
    await db.open()
    try:
        await db.execute("CREATE TABLE t (n INTEGER)")
        calls = 0

        async def write(c: Conn) -> int:
            nonlocal calls
            calls += 1
            await c.execute("INSERT INTO t VALUES ($1)", calls)
            if calls == 1:  # the server ends this very connection mid-transaction
                with contextlib.suppress(*LOST):
                    await c.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return calls

        assert await db.run(write) == 2
        assert [r[0] for r in await db.fetch("SELECT n FROM t")] == [2]  # the first rolled back

        async def misuse(c: Conn) -> None:
            raise asyncpg.exceptions.InterfaceError("a bug, on a connection still open")

        started = asyncio.get_running_loop().time()
        with pytest.raises(asyncpg.exceptions.InterfaceError):
            await db.run(misuse)
        assert asyncio.get_running_loop().time() - started < 1  # raised, not retried
    finally:
        await db.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_daemon_stopped_while_its_server_is_away_stops_within_its_grace(
    shared_queue: MakeNodes,
) -> None:
    with pg.cluster() as server:
        nodes = await shared_queue(server)
        url, fake = nodes.url, nodes.fake
        fake.default = Reply(text="slow " * 40, chunks=40, chunk_delay_s=0.2)
        try:
            api = await nodes.start("a")
            task = await api.submit(prompt="long", agent="local", max_retries=2)

            async def running() -> bool:
                return bool(await db_rows(url, "SELECT 1 FROM executions"
                                          " WHERE status = 'running'"))

            await until(running, timeout_s=20, every_s=0.05)
            await asyncio.to_thread(server.stop)
            daemon = nodes.daemons["a"]
            assert daemon.proc is not None
            loop = asyncio.get_running_loop()
            stopping = loop.time()
            # grace 1 s + kill grace 1 s + 5 s of slack, and a backoff step of at most 5 s
            assert await daemon.stop() == 0
            assert loop.time() - stopping < 20
            await asyncio.to_thread(server.start)
            fake.default = Reply(text="done")
            api = await nodes.start("a")  # what it could not write is recovered at start
            done = await api.wait(task["id"], timeout_s=60)
            assert done["state"] == "succeeded"
            assert [e["status"] for e in done["executions"]] == ["interrupted", "succeeded"]
        finally:
            await nodes.stop_all()
